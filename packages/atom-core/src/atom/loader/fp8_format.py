"""FP8 checkpoint formats: read a `quantization_config`, name and check the scale tensors, and write the
config of each format (tools/quantize_fp8.py).

Formats (auto-detected from config.json, as vLLM does):
- `quant_method: fp8` with `weight_block_size: [bn, bk]` (DeepSeek-V3, Qwen3-*-FP8): an e4m3 `weight` with
  a float32 `weight_scale_inv` of [ceil(N/bn), ceil(K/bk)] per linear; activations in 1 x bk groups.
- `quant_method: fp8` without a block size: a per-tensor `weight_scale` (shape [] or [1]); activations per
  token.
- `quant_method: compressed-tensors`, format `float-quantized` (llm-compressor's FP8_DYNAMIC): a per-channel
  `weight_scale` [N, 1] (strategy channel; tensor and block strategies are read too), activations dynamic
  per token (per 1 x bk group for blocks).
- `--quantization fp8` on a float checkpoint: quantized per output channel at load time.
Only `activation_scheme: dynamic` is supported (ATOM quantizes activations itself); anything else is a
ValueError naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from atom.ops.quant_fp8 import FP8_DTYPES, check_weight_scale, dequantize_weight

LAYOUTS = ("block", "tensor", "channel")


@dataclass(frozen=True)
class Fp8Format:
    method: str  # "fp8", "compressed-tensors", or "fp8-online" (a float checkpoint quantized at load time)
    layout: str  # "block", "tensor" or "channel" (weight scales; activations follow: groups or per token)
    block_size: tuple[int, int] | None = None
    ignored: tuple[str, ...] = ()  # module names (or "re:" patterns, compressed-tensors) kept in float
    kv_cache_scheme: dict | None = field(default=None, compare=False)

    @property
    def scale_suffix(self) -> str:
        """The checkpoint name of a weight's scale, after the module prefix."""
        return "weight_scale_inv" if self.method == "fp8" and self.layout == "block" else "weight_scale"

    def scale_name(self, weight_name: str) -> str:
        if not weight_name.endswith("weight"):
            raise ValueError(f"{weight_name!r} is not a weight name")
        return weight_name[: -len("weight")] + self.scale_suffix

    def is_quantized(self, module_name: str) -> bool:
        """Whether the checkpoint stores this linear module in FP8 (False for the ignored ones)."""
        for pattern in self.ignored:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module_name):
                    return False
            elif module_name == pattern or module_name.startswith(pattern + ".") or module_name.endswith("." + pattern):
                return False
        return True


def _field(qc: dict, key: str, where: str = "quantization_config"):
    if key not in qc:
        raise ValueError(f"{where} lacks the field {key!r}")
    return qc[key]


def _block_size(value, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{where} must be two positive integers [block_n, block_k], got {value!r}")
    return int(value[0]), int(value[1])


def _parse_fp8(qc: dict) -> Fp8Format:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt {fmt!r} is not supported (ATOM reads e4m3 FP8)")
    scheme = _field(qc, "activation_scheme")
    if scheme != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme {scheme!r} is not supported: ATOM quantizes "
                         "activations dynamically (activation_scheme: dynamic)")
    ignored = tuple(qc.get("ignored_layers") or ()) + tuple(qc.get("modules_to_not_convert") or ())
    block = qc.get("weight_block_size")
    if block is None:
        return Fp8Format("fp8", "tensor", None, ignored)
    return Fp8Format("fp8", "block", _block_size(block, "quantization_config.weight_block_size"), ignored)


def _check_float8(args: dict, where: str) -> None:
    if args.get("type") != "float" or args.get("num_bits") != 8:
        raise ValueError(f"{where}: only 8-bit float quantization (FP8) is supported, got type "
                         f"{args.get('type')!r} num_bits {args.get('num_bits')!r}")
    if args.get("symmetric", True) is not True:
        raise ValueError(f"{where}: only symmetric FP8 quantization is supported")


def _parse_compressed_tensors(qc: dict) -> Fp8Format:
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise ValueError(f"quantization_config.format {fmt!r} is not supported; ATOM reads compressed-tensors "
                         "FP8 checkpoints (format float-quantized)")
    groups = _field(qc, "config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("quantization_config.config_groups must be a non-empty mapping")
    layouts = set()
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        weights = _field(group, "weights", where)
        _check_float8(weights, f"{where}.weights")
        strategy = weights.get("strategy")
        if strategy not in LAYOUTS:
            raise ValueError(f"{where}.weights.strategy {strategy!r} is not supported (channel, tensor, block)")
        if weights.get("dynamic"):
            raise ValueError(f"{where}.weights.dynamic must be false (weights carry stored scales)")
        block = None
        if strategy == "block":
            block = _block_size(weights.get("block_structure"), f"{where}.weights.block_structure")
        acts = group.get("input_activations")
        if acts is None:
            raise ValueError(f"{where}.input_activations is missing: weight-only FP8 (W8A16) is not supported")
        _check_float8(acts, f"{where}.input_activations")
        if acts.get("dynamic") is not True:
            raise ValueError(f"{where}.input_activations.dynamic must be true: ATOM quantizes activations "
                             "dynamically (static input scales are not supported)")
        want = "group" if strategy == "block" else "token"
        if acts.get("strategy") != want:
            raise ValueError(f"{where}.input_activations.strategy {acts.get('strategy')!r} does not go with "
                             f"{strategy} weights (expected {want!r})")
        if strategy == "block" and acts.get("group_size") != block[1]:
            raise ValueError(f"{where}.input_activations.group_size {acts.get('group_size')!r} must equal the "
                             f"weight block's K size {block[1]}")
        layouts.add((strategy, block))
    if len(layouts) != 1:
        raise ValueError(f"quantization_config.config_groups mix weight schemes {sorted(map(str, layouts))}; "
                         "ATOM reads one FP8 scheme per checkpoint")
    (layout, block), = layouts
    return Fp8Format("compressed-tensors", layout, block, tuple(qc.get("ignore") or ()), qc.get("kv_cache_scheme"))


def parse_quantization_config(qc: dict | None, quantization: str | None = None) -> Fp8Format | None:
    """The FP8 format of a checkpoint from its config.json `quantization_config` (None: not quantized),
    with `quantization` the user's --quantization flag (None, or "fp8")."""
    if quantization not in (None, "fp8"):
        raise ValueError(f"--quantization {quantization!r} is not supported; ATOM supports fp8")
    if qc is None:
        return Fp8Format("fp8-online", "channel") if quantization == "fp8" else None
    if hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    method = _field(qc, "quant_method")
    if method == "fp8":
        fmt = _parse_fp8(qc)
    elif method == "compressed-tensors":
        fmt = _parse_compressed_tensors(qc)
    else:
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported; ATOM reads fp8 and "
                         "compressed-tensors (float-quantized) checkpoints")
    if quantization == "fp8" and method != "fp8":
        raise ValueError(f"--quantization fp8 does not match the checkpoint's quantization_config.quant_method "
                         f"{method!r}; leave --quantization out to use the checkpoint's own")
    return fmt


def quantization_config(fmt: Fp8Format) -> dict:
    """config.json's `quantization_config` for a format, as the reference checkpoints write it
    (DeepSeek-V3 / Qwen3-FP8 for block fp8, vLLM/AutoFP8 for per-tensor fp8, llm-compressor's FP8_DYNAMIC
    for compressed-tensors)."""
    if fmt.method == "fp8":
        qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
        if fmt.layout == "block":
            qc["weight_block_size"] = list(fmt.block_size)
        elif fmt.layout != "tensor":
            raise ValueError("quant_method fp8 stores block or per-tensor scales")
        if fmt.ignored:
            qc["ignored_layers" if fmt.layout == "tensor" else "modules_to_not_convert"] = list(fmt.ignored)
        return qc
    if fmt.method != "compressed-tensors":
        raise ValueError(f"no checkpoint config for method {fmt.method!r}")
    block = fmt.layout == "block"

    def args(strategy: str, dynamic: bool, observer: str | None, group_size=None, block_structure=None) -> dict:
        return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": group_size, "strategy": strategy,
                "block_structure": block_structure, "dynamic": dynamic, "actorder": None, "scale_dtype": None,
                "zp_dtype": None, "observer": observer, "observer_kwargs": {}}

    return {
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": args(fmt.layout, False, "memoryless_minmax",
                            block_structure=list(fmt.block_size) if block else None),
            "input_activations": args("group" if block else "token", True, None,
                                      group_size=fmt.block_size[1] if block else None),
            "output_activations": None,
            "format": None,
        }},
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": fmt.kv_cache_scheme,
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(fmt.ignored),
    }


def check_scale(fmt: Fp8Format, weight_name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
    """A ValueError naming the tensor when an FP8 weight's scale is missing or does not fit it."""
    scale_name = fmt.scale_name(weight_name)
    if weight.dtype not in FP8_DTYPES:
        raise ValueError(f"{weight_name} has dtype {weight.dtype}, but the checkpoint's quantization_config "
                         f"({fmt.method}) says it is FP8")
    if scale is None:
        raise ValueError(f"checkpoint has the FP8 weight {weight_name} but not its scale {scale_name}")
    if fmt.layout == "tensor" and scale.numel() != 1:
        raise ValueError(f"{scale_name} has shape {tuple(scale.shape)}; a per-tensor scale has one element")
    if fmt.layout == "channel" and tuple(scale.shape) not in ((weight.shape[0],), (weight.shape[0], 1)):
        raise ValueError(f"{scale_name} has shape {tuple(scale.shape)}; a per-channel scale of {weight_name} "
                         f"{tuple(weight.shape)} is ({weight.shape[0]}, 1)")
    check_weight_scale(scale, *weight.shape, fmt.block_size, scale_name)


def check_block_partition(fmt: Fp8Format, layer: str, in_features_per_rank: int, tp_size: int) -> None:
    """Row-parallel sharding cuts K: each rank's slice must start on a block boundary, or its activation
    groups would straddle the weight's blocks (vLLM's rule). Output-side (N) boundaries need no alignment:
    block scales can be expanded to one row per output channel (block_size [1, bk])."""
    if fmt.layout != "block" or tp_size == 1:
        return
    bk = fmt.block_size[1]
    if in_features_per_rank % bk:
        raise ValueError(f"{layer}: input features per rank {in_features_per_rank} (tensor parallel {tp_size}) "
                         f"are not a multiple of the weight block's K size {bk} (weight_block_size "
                         f"{list(fmt.block_size)})")


def row_expanded_block_scale(scale: torch.Tensor, n_rows: int, block_n: int) -> torch.Tensor:
    """Block scales [ceil(N/bn), KB] as [N, KB]: one row per output channel (block_size [1, bk]), so shards
    of merged layers (QKV, gate|up) and TP slices can be cut or stacked at any row."""
    return scale.repeat_interleave(block_n, 0)[:n_rows].contiguous()


def is_kv_cache_scale(name: str) -> bool:
    """A per-tensor FP8 KV-cache scale (`...self_attn.k_scale`, `k_proj.k_scale`, the old `kv_scale`)."""
    return name.endswith((".k_scale", ".v_scale", ".kv_scale"))


def dequantize_tensors(fmt: Fp8Format, tensors: dict[str, torch.Tensor],
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with every FP8 weight dequantized to `dtype` and the scales (KV-cache scales
    too) dropped: what a float reference model (transformers) runs. Errors name missing or misfit scales,
    and scales without a weight."""
    out, used = {}, set()
    for name, t in tensors.items():
        if t.dtype in FP8_DTYPES:
            scale_name = fmt.scale_name(name)
            scale = tensors.get(scale_name)
            check_scale(fmt, name, t, scale)
            out[name] = dequantize_weight(t, scale, fmt.block_size).to(dtype)
            used.add(scale_name)
    for name, t in tensors.items():
        if t.dtype in FP8_DTYPES or name in used or is_kv_cache_scale(name):
            continue
        if name.endswith(("." + fmt.scale_suffix, ".weight_scale", ".weight_scale_inv")):
            raise ValueError(f"checkpoint has the scale {name} but no FP8 weight it belongs to")
        out[name] = t
    return out
