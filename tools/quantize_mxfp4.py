#!/usr/bin/env python
"""Write a GPT-OSS checkpoint with MXFP4 experts from a bf16/fp32 one, in the layout of the released gpt-oss.

    python tools/quantize_mxfp4.py SRC_DIR DST_DIR [--max-shard-gb 5]

SRC_DIR is an HF folder of `GptOssForCausalLM` as transformers saves it (experts as `mlp.experts.gate_up_proj`
[E, H, 2I] with gate/up interleaved in the last dim, `down_proj` [E, I, H]). DST_DIR gets:
  - `mlp.experts.gate_up_proj_blocks` uint8 [E, 2I, H/32, 16] and `gate_up_proj_scales` uint8 [E, 2I, H/32]
    (rows are the output features, still interleaved gate/up), `down_proj_blocks` [E, H, I/32, 16] and
    `down_proj_scales` [E, H, I/32]; see atom.ops.mxfp4 for the element and scale encoding;
  - every other tensor (attention, sinks, router, expert biases, norms, embeddings, LM head) unchanged;
  - config.json with the released checkpoints' quantization_config (quant_method mxfp4, and attention,
    router, embeddings and LM head in modules_to_not_convert), and the folder's other files copied.
transformers loads the result (on a CPU it dequantizes the experts), as do vLLM and SGLang. The conversion is
weight-only: a model on the dequantized weights is the exact reference for one running the MXFP4 experts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atom.ops.mxfp4 import BLOCK, quantize_mxfp4

MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
_EXPERT_WEIGHTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def quantize_expert_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' [E, in, out] expert weight -> {name_blocks: [E, out, in/32, 16], name_scales: [E, out, in/32]}."""
    if tensor.dim() != 3 or tensor.shape[1] % BLOCK:
        raise ValueError(f"{name}: expected [experts, in, out] with in a multiple of {BLOCK}, got {tuple(tensor.shape)}")
    blocks, scales = quantize_mxfp4(tensor.transpose(1, 2).contiguous())
    return {f"{name}_blocks": blocks.unflatten(-1, (-1, BLOCK // 2)).contiguous(), f"{name}_scales": scales}


def _source_files(src: str) -> list[str]:
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {src}")
    return files


def write_checkpoint(tensors: Iterable[tuple[str, torch.Tensor]], config: dict, dst: str,
                     max_shard_bytes: int = 5 << 30) -> None:
    """Write (name, tensor) pairs as a GPT-OSS checkpoint with MXFP4 experts into dst: the expert weights quantized
    (on their own device, stored from the CPU), the rest as they are, in shards of at most max_shard_bytes, with
    config (no quantization_config) plus the released checkpoints' quantization_config as config.json."""
    os.makedirs(dst, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    found = 0
    for name, tensor in tensors:
        if name.endswith(_EXPERT_WEIGHTS):
            out = quantize_expert_tensor(name, tensor)
            found += 1
        else:
            out = {name: tensor}
        for key, value in out.items():
            value = value.detach().cpu().contiguous()
            nbytes = value.numel() * value.element_size()
            if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
                shards.append({})
                sizes.append(0)
            shards[-1][key] = value
            sizes[-1] += nbytes
    if not found:
        raise ValueError(f"no expert weights ({', '.join(_EXPERT_WEIGHTS)}) to quantize")
    if len(shards) == 1:
        save_file(shards[0], os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(dst, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
    config = {**config, "quantization_config": {"modules_to_not_convert": MODULES_TO_NOT_CONVERT,
                                                "quant_method": "mxfp4"}}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def convert(src: str, dst: str, max_shard_bytes: int = 5 << 30) -> None:
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "gpt_oss":
        raise ValueError(f"{src} is not a GPT-OSS checkpoint (model_type {config.get('model_type')!r})")
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")

    def tensors():
        for file in _source_files(src):
            with safe_open(os.path.join(src, file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    try:
        write_checkpoint(tensors(), config, dst, max_shard_bytes)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    for file in os.listdir(src):
        if file.endswith(".safetensors") or file in ("config.json", "model.safetensors.index.json"):
            continue
        path = os.path.join(src, file)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, file))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="HF folder of a bf16/fp32 GptOssForCausalLM checkpoint")
    ap.add_argument("dst", help="output folder")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (GB)")
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.dst, int(args.max_shard_gb * (1 << 30)))
    except (ValueError, FileNotFoundError) as e:
        print(f"quantize_mxfp4: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} (MXFP4 experts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
