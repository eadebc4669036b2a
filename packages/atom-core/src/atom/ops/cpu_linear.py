"""Linear layers on CPU through oneDNN with the weight packed once into its blocked layout (what vLLM's CPU
backend does with its own `onednn_mm`), here with torch's built-in mkldnn ops: F.linear on a plain
bf16 weight re-lays the weight out on every call, which at decode batch sizes costs more than the GEMM
(SmolLM2-135M, one core, a whole decode step's GEMMs: 96 ms plain against 57 ms packed at batch 1, 216
against 163 ms at batch 32; BENCHMARKS.md, CPU).

The packed copy lives on the weight tensor itself (the plain weight stays: the embedding, tied heads, reloads
and other hosts read it), made on the weight's first CPU forward and dropped when its weights are (re)loaded.
Only 16-bit weights are packed (float32 keeps F.linear's exact results), and only in the dtypes this CPU's
oneDNN runs (bf16 needs AVX512 or AVX-NE-CONVERT: an AVX2-only CPU keeps F.linear); ATOM_CPU_PACKED_LINEAR=0
turns it off. Under torch.compile the call is the custom op `torch.ops.atom.cpu_packed_linear` (Inductor cannot
hold oneDNN's opaque packed tensor), so a compiled CPU forward keeps the packed GEMMs; the op receives the
parameter itself and finds its packed copy there.

A host with faster CPU GEMMs of its own hands them in with `set_host_packer` (atom-vllm: vLLM's CPU GEMM
dispatch, a cached oneDNN matmul primitive per weight or SGL's AMX kernel for small ones; torch's
`_linear_pointwise` sets its oneDNN primitive up on every call, 7-35 us more per GEMM at decode sizes on a
2-core Xeon); the packed copy is then the host's callable.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_KEY = "_atom_cpu_packed_weight"
_DTYPES = (torch.bfloat16, torch.float16)
_MKLDNN = torch.backends.mkldnn.is_available()  # (read once: torch.compile cannot trace the query)


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The 16-bit dtypes torch's oneDNN linear runs on this CPU: its bf16 path needs AVX512 (bw, vl, dq) or
    AVX-NE-CONVERT, its fp16 path AVX512-FP16 or AVX-NE-CONVERT; on others (AVX2-only CPUs: many AMD and
    laptop parts) `_reorder_linear_weight` raises, so those weights keep F.linear."""
    checks = ((torch.bfloat16, "_is_mkldnn_bf16_supported"), (torch.float16, "_is_mkldnn_fp16_supported"))
    out = []
    for dtype, name in checks:
        try:
            if getattr(torch.ops.mkldnn, name)():
                out.append(dtype)
        except (AttributeError, RuntimeError):  # a torch without the query: do not pack that dtype
            pass
    return tuple(out)


_ONEDNN_DTYPES = _onednn_dtypes() if _MKLDNN else ()  # (read once, as _MKLDNN)


def enabled() -> bool:
    return os.environ.get("ATOM_CPU_PACKED_LINEAR", "1").lower() not in ("0", "false", "no", "off") and _MKLDNN


def _packs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # a host packer (set_host_packer) brings its own GEMMs; torch's oneDNN ops only the dtypes this CPU runs
    dtypes = _DTYPES if _host_packer is not None else _ONEDNN_DTYPES
    return weight.device.type == "cpu" and weight.dtype in dtypes and x.dtype == weight.dtype and enabled()


PackedLinear = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (x, bias) -> x @ weight^T + bias
_host_packer: Callable[[torch.Tensor], PackedLinear] | None = None
_host_name = ""
_OWNER_KEY = "_atom_cpu_gemm"  # a host GEMM attached to its layer (attach), what a compiled forward calls


def set_host_packer(packer: Callable[[torch.Tensor], PackedLinear] | None, name: str = "") -> None:
    """Pack every 16-bit CPU weight with `packer(weight) -> fn(x, bias)` from now on (None: torch's oneDNN
    ops again). fn must be traceable by Dynamo (the host's own ops, no data-dependent Python): a compiled
    forward calls it inline (see attach). Copies packed before stay as they are; call before loading."""
    global _host_packer, _host_name
    _host_packer, _host_name = packer, name if packer is not None else ""


def attach(owner: nn.Module, weight: torch.Tensor) -> bool:
    """Pack `weight` now with the host's packer and keep the GEMM on `owner`, so that a compiled forward
    calls the host's ops inline (as the host's own models do) instead of through the opaque
    atom::cpu_packed_linear, whose Python body costs ~10-20 us a call. Call after the weights are loaded
    (forget drops it); False where no host packer is set or the weight is not packed."""
    owner.__dict__.pop(_OWNER_KEY, None)
    if _host_packer is None or not _packs(weight, weight):
        return False
    owner.__dict__[_OWNER_KEY] = packed_linear(weight)
    return True


def host_packer_name() -> str:
    return _host_name


def _mkldnn_packer(weight: torch.Tensor) -> PackedLinear:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    return lambda x, bias: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_linear(weight: torch.Tensor) -> PackedLinear:
    """The packed GEMM of `weight` (fn(x, bias)), made on first use and kept on the tensor."""
    cached = weight.__dict__.get(_KEY)
    if cached is None or cached[0] != (weight.data_ptr(), weight.shape):
        cached = ((weight.data_ptr(), weight.shape), (_host_packer or _mkldnn_packer)(weight.detach()))
        weight.__dict__[_KEY] = cached
    return cached[1]


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return packed_linear(weight)(x.contiguous(), bias)


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
    layer holding the weight (the packed copy lives on the weight; a host GEMM attached for compiled forwards
    on the layer)."""
    if not _packs(x, weight):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        gemm = getattr(owner, _OWNER_KEY, None)
        if gemm is not None:  # the host's GEMM, attached after loading: traced as the host's own ops
            return gemm(x, bias)
        return torch.ops.atom.cpu_packed_linear(x, weight, bias)
    return packed_linear(weight)(x, bias)


def has_packed_copy(weight: torch.Tensor) -> bool:
    return _KEY in weight.__dict__


def forget(module: nn.Module) -> None:
    """Drop the packed copies of the weights of `module` and its children (their weights are being replaced)."""
    for p in module.parameters(recurse=True):
        p.__dict__.pop(_KEY, None)
    for m in module.modules():  # copies an older version kept on the layer; attached host GEMMs
        m.__dict__.pop(_KEY, None)
        m.__dict__.pop(_OWNER_KEY, None)
