#!/usr/bin/env python3
"""A random checkpoint on disk (safetensors, the hub's tensor names) that every engine of a benchmark loads.

Why: under `load_format=dummy` each engine draws its own weights (uniform +-1e-3, vLLM's rule). MoE routers
then produce near-uniform logits (about 5e-5), so which experts a batch reads hangs on each engine's rounding
of the router softmax: on the H200 vLLM 0.24's DeepSeek-V2-Lite decode at batch 32 ran at 156% of the roofline
of the experts a random batch touches, i.e. it read far fewer experts than ATOM (BENCHMARKS.md). Loading one
checkpoint, whose router weights are large enough (`router_scale`) that the routing is spread and decided the
same way everywhere, makes the engines do the same work.

Every tensor is uniform(-1e-3, 1e-3) from a generator seeded per tensor (vLLM's dummy rule), except the MoE
routers, uniform(-router_scale, router_scale), and the biases, 0 (see fill: constant biases concentrated GPT-OSS's
routing). transformers builds the model from the config on `device` and
writes it with `save_pretrained` (its MoE conversions give the hub's per-expert names). A GPT-OSS config with MXFP4
experts (`quantization_config.quant_method: mxfp4`, the gpt-oss-20b preset) is built in float and written with its
experts quantized by tools/quantize_mxfp4.py (the released layout, ~13 GB for 20b instead of 42); other quantized
configs are refused (their packed tensors are not what transformers builds).

    python3 tools/device/materialize_checkpoint.py CONFIG_FOLDER OUT_FOLDER [--router-scale 1.0] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

import torch

# parameter names of the MoE routers (DeepSeek / Qwen-MoE / GLM: mlp.gate; Mixtral: block_sparse_moe.gate;
# GPT-OSS: mlp.router)
ROUTER_SUFFIXES = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight")
DONE = ".materialized.json"
FILL_RULE = 2  # fill()'s rules (2: a seed a tensor, biases 0); a checkpoint written under others is rewritten


def is_router(name: str) -> bool:
    return name.endswith(ROUTER_SUFFIXES)


def is_bias(name: str) -> bool:
    """A bias: `*.bias`, GPT-OSS's experts' `*_bias`, DeepSeek's router `e_score_correction_bias`."""
    return name.endswith("bias")


def fill_tensor(name: str, t: torch.Tensor, index: int, router_scale: float, seed: int = 1234) -> bool:
    """Overwrite one tensor in place (its own seed, seed + index); True when it is a router weight."""
    if is_bias(name):
        t.zero_()
    elif t.is_floating_point():
        gen = torch.Generator(device=t.device).manual_seed(seed + index)
        t.uniform_(-(router_scale if is_router(name) else 1e-3), router_scale if is_router(name) else 1e-3,
                   generator=gen)
    return is_router(name)


@torch.no_grad()
def fill(model: torch.nn.Module, router_scale: float, seed: int = 1234) -> int:
    """Overwrite every parameter in place; returns how many router weights got router_scale.

    Each tensor draws from its own seed (seed + its index): one seed for all made every layer the same layer.
    Biases are 0: a bias is the same for every token, and GPT-OSS adds several a layer (attention, experts) to the
    residual, which outgrew the token's own part (its +-1e-3 embedding) within two layers and sent a whole batch to
    the same few experts, as dummy weights do (CPU, gpt-oss-20b's widths: 6-8 of the 32 experts for 32 tokens from
    the third layer on, each token's top-4 sharing one expert; with these rules 31-32 in every layer)."""
    return sum(fill_tensor(name, p, index, router_scale, seed)
               for index, (name, p) in enumerate(model.named_parameters()))


def _layer_of(name: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


@torch.no_grad()
def write_layerwise(model: torch.nn.Module, out: str, router_scale: float, device: str) -> int:
    """Write a meta-device model's checkpoint one decoder layer at a time: each layer's tensors are made on
    `device`, filled (fill's rules, the same seeds: the index in named_parameters), turned into the hub's names
    (transformers' revert_weight_conversion: fused experts back to one tensor an expert) and written as one
    safetensors shard, then freed. Peak memory is one layer, not the model: save_pretrained on the GPU ran out of
    memory for qwen3-30b-a3b (61 GB of bf16 and the per-expert copies of its conversion, 2026-12-06). Returns the
    router count."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    params = list(model.named_parameters())
    need = sum(p.numel() * p.element_size() for _, p in params)
    free = shutil.disk_usage(out).free
    if need + (1 << 30) > free:  # refuse before writing: a full disk half-way costs a device call
        raise OSError(f"{out}: the checkpoint needs {need / 2**30:.1f} GiB, the disk has {free / 2**30:.1f} GiB free "
                      "(1 GiB kept spare)")
    saved = set(model.state_dict())
    # persistent buffers are in a checkpoint too (DeepSeek-V3's e_score_correction_bias): biases, so 0
    buffers = [(name, b) for name, b in model.named_buffers() if name in saved]
    if odd := [name for name, _ in buffers if not is_bias(name)]:
        raise ValueError(f"persistent buffers without a fill rule: {odd[:4]}")
    groups: dict[int, list[tuple[int, str, torch.Tensor]]] = {}
    for index, (name, p) in enumerate(params + buffers):
        groups.setdefault(_layer_of(name), []).append((index, name, p))
    weight_map: dict[str, str] = {}
    routers = total = 0
    order = sorted(groups)
    for n, layer in enumerate(order):
        tensors = {}
        for index, name, p in groups[layer]:
            t = torch.empty(p.shape, dtype=p.dtype, device=device)
            routers += fill_tensor(name, t, index, router_scale)
            tensors[name] = t
        shard = f"model-{n + 1:05d}-of-{len(order):05d}.safetensors"
        reverted = {k: v.contiguous().cpu() for k, v in revert_weight_conversion(model, tensors).items()}
        del tensors
        save_file(reverted, os.path.join(out, shard), metadata={"format": "pt"})
        for k, v in reverted.items():
            weight_map[k] = shard
            total += v.numel() * v.element_size()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return routers


def materialize(config_folder: str, out: str, router_scale: float = 1.0, device: str | None = None) -> str:
    """Write the checkpoint into out (kept when an earlier call wrote it with the same settings); returns out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(os.path.join(config_folder, "config.json")) as f:
        config = json.load(f)
    quant = (config.get("quantization_config") or {}).get("quant_method")
    mxfp4 = quant == "mxfp4" and config.get("model_type") == "gpt_oss"
    if quant and not mxfp4:
        raise ValueError(f"{config_folder}: a quantized config ({quant}) cannot be materialized; run it with "
                         "load_format=dummy")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    stamp = dict(config=config, router_scale=router_scale, fill=FILL_RULE)
    done = os.path.join(out, DONE)
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f) == stamp:
                return out
    dtype = getattr(torch, str(config.get("torch_dtype", "bfloat16")).removeprefix("torch."))
    hf_config = AutoConfig.from_pretrained(config_folder)
    if mxfp4:  # built in float, written with its experts quantized (the released gpt-oss layout)
        delattr(hf_config, "quantization_config")
    moe = bool(config.get("n_routed_experts") or config.get("num_experts") or config.get("num_local_experts"))
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # shards of an earlier fill or shape
        if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            os.remove(os.path.join(out, name))
    if mxfp4:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        routers = fill(model, router_scale)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        import quantize_mxfp4

        float_config = {k: v for k, v in config.items() if k != "quantization_config"}
        quantize_mxfp4.write_checkpoint(model.state_dict().items(), float_config, out)
        del model
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        routers = write_layerwise(model, out, router_scale, device)
    if moe and not routers:
        raise ValueError(f"{config_folder}: an MoE config, but no router weight matched {ROUTER_SUFFIXES}")
    for name in os.listdir(config_folder):  # the tokenizer files, and the preset's own config
        if name.startswith("tokenizer") or name.endswith(".jinja") or name == "config.json":
            shutil.copy(os.path.join(config_folder, name), out)
    with open(done, "w") as f:
        json.dump(stamp, f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config_folder")
    ap.add_argument("out")
    ap.add_argument("--router-scale", type=float, default=1.0)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    print(materialize(a.config_folder, a.out, a.router_scale, a.device))


if __name__ == "__main__":
    main()
