"""Linear layers on CPU through oneDNN with the weight packed once into its blocked layout (what vLLM's CPU
backend does with its own `onednn_mm`), here with torch's built-in mkldnn ops: F.linear on a plain
bf16 weight re-lays the weight out on every call, which at decode batch sizes costs more than the GEMM
(SmolLM2-135M, one core, a whole decode step's GEMMs: 96 ms plain against 57 ms packed at batch 1, 216
against 163 ms at batch 32; BENCHMARKS.md, CPU).

The packed copy lives beside the weight (the plain weight stays: the embedding, tied heads, reloads and
other hosts read it), made on a layer's first CPU forward and dropped when its weights are (re)loaded.
Only 16-bit weights are packed (float32 keeps F.linear's exact results); ATOM_CPU_PACKED_LINEAR=0 turns
it off; torch.compile traces F.linear.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_KEY = "_atom_cpu_packed_weight"
_DTYPES = (torch.bfloat16, torch.float16)


def enabled() -> bool:
    return (os.environ.get("ATOM_CPU_PACKED_LINEAR", "1").lower() not in ("0", "false", "no", "off")
            and torch.backends.mkldnn.is_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, owner: nn.Module) -> torch.Tensor:
    """F.linear(x, weight, bias), through `owner`'s packed copy of `weight` where that is faster."""
    if (weight.device.type != "cpu" or weight.dtype not in _DTYPES or x.dtype != weight.dtype
            or torch.compiler.is_compiling() or not enabled()):
        return F.linear(x, weight, bias)
    cached = owner.__dict__.get(_KEY)
    if cached is None or cached[0] != (weight.data_ptr(), weight.shape):
        cached = ((weight.data_ptr(), weight.shape), torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        owner.__dict__[_KEY] = cached
    return torch.ops.mkldnn._linear_pointwise(x, cached[1], bias, "none", [], "")


def forget(module: nn.Module) -> None:
    """Drop the packed copies of `module` and its children (their weights are being replaced)."""
    for m in module.modules():
        m.__dict__.pop(_KEY, None)
