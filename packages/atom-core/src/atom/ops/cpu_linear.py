"""Linear layers on CPU through oneDNN with the weight packed once into its blocked layout (what vLLM's CPU
backend does with its own `onednn_mm`), here with torch's built-in mkldnn ops: F.linear on a plain
bf16 weight re-lays the weight out on every call, which at decode batch sizes costs more than the GEMM
(SmolLM2-135M, one core, a whole decode step's GEMMs: 96 ms plain against 57 ms packed at batch 1, 216
against 163 ms at batch 32; BENCHMARKS.md, CPU).

The packed copy lives on the weight tensor itself (the plain weight stays: the embedding, tied heads, reloads
and other hosts read it), made on the weight's first CPU forward and dropped when its weights are (re)loaded.
Only 16-bit weights are packed (float32 keeps F.linear's exact results); ATOM_CPU_PACKED_LINEAR=0 turns
it off. Under torch.compile the call is the custom op `torch.ops.atom.cpu_packed_linear` (Inductor cannot
hold oneDNN's opaque packed tensor), so a compiled CPU forward keeps the packed GEMMs; the op receives the
parameter itself and finds its packed copy there.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_KEY = "_atom_cpu_packed_weight"
_DTYPES = (torch.bfloat16, torch.float16)
_MKLDNN = torch.backends.mkldnn.is_available()  # (read once: torch.compile cannot trace the query)


def enabled() -> bool:
    return os.environ.get("ATOM_CPU_PACKED_LINEAR", "1").lower() not in ("0", "false", "no", "off") and _MKLDNN


def _packs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in _DTYPES and x.dtype == weight.dtype and enabled()


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of `weight`, made on first use and kept on the tensor."""
    cached = weight.__dict__.get(_KEY)
    if cached is None or cached[0] != (weight.data_ptr(), weight.shape):
        cached = ((weight.data_ptr(), weight.shape), torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        weight.__dict__[_KEY] = cached
    return cached[1]


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(weight), bias, "none", [], "")


# A plain Library op on the CPU key: the least dispatch cost a Python kernel gets (a compiled decode step
# makes ~120 of these calls).
_LIB = torch.library.Library("atom", "FRAGMENT")
_LIB.define("cpu_packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIB.impl("cpu_packed_linear", _packed_linear, "CPU")


@torch.library.register_fake("atom::cpu_packed_linear", lib=_LIB)
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, owner: nn.Module) -> torch.Tensor:
    """F.linear(x, weight, bias), through the packed copy of `weight` where that is faster. `owner`: the
    layer holding the weight (kept for callers; the packed copy lives on the weight)."""
    if not _packs(x, weight):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.atom.cpu_packed_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")


def has_packed_copy(weight: torch.Tensor) -> bool:
    return _KEY in weight.__dict__


def forget(module: nn.Module) -> None:
    """Drop the packed copies of the weights of `module` and its children (their weights are being replaced)."""
    for p in module.parameters(recurse=True):
        p.__dict__.pop(_KEY, None)
    for m in module.modules():  # copies an older version kept on the layer
        m.__dict__.pop(_KEY, None)
