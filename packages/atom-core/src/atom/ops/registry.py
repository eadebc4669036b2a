"""Kernel dispatch: one table of implementations per op, chosen once at model build time.

ATOM_KERNEL_BACKEND=auto|torch|triton|aiter sets the default for every op; per-op overrides go in
ATOM_KERNEL_OVERRIDES="rms_norm=torch,paged_attention=triton". An op without an implementation in the
chosen backend falls back to its torch reference.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

from atom.platform import backend_status, kernel_backend

logger = logging.getLogger(__name__)

_IMPLS: dict[str, dict[str, Callable]] = {}
# Modules that register non-reference implementations, imported on first use of their backend.
_BACKEND_MODULES = {"triton": "atom.ops.triton_kernels", "aiter": "atom.ops.aiter_bindings"}
_loaded_backends: set[str] = set()


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def _load_backend(backend: str) -> None:
    if backend in _loaded_backends or backend not in _BACKEND_MODULES:
        return
    importlib.import_module(_BACKEND_MODULES[backend])
    _loaded_backends.add(backend)


def _overrides() -> dict[str, str]:
    spec = os.environ.get("ATOM_KERNEL_OVERRIDES", "").strip()
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise ValueError(f"ATOM_KERNEL_OVERRIDES entry {item!r} is not of the form op=backend")
        op, backend = (s.strip() for s in item.split("=", 1))
        if op not in _OP_FAMILY:  # a typo would otherwise be silently ignored
            raise ValueError(f"ATOM_KERNEL_OVERRIDES names unknown op {op!r}; ops: {', '.join(sorted(_OP_FAMILY))}")
        out[op] = backend.lower()
    return out


def backend_for(op: str) -> str:
    backend = _overrides().get(op) or kernel_backend()
    ok, reason = backend_status(backend)
    if not ok:
        raise RuntimeError(f"kernel backend {backend!r} requested for op {op!r} is not usable here: {reason}")
    return backend


def resolve(op: str, backend: str | None = None) -> Callable:
    """The implementation of `op` for `backend` (default: the configured one), torch as fallback."""
    importlib.import_module(f"atom.ops.{_OP_FAMILY[op]}")
    if backend is None:
        backend = backend_for(op)
    else:
        ok, reason = backend_status(backend)
        if not ok:
            raise RuntimeError(f"kernel backend {backend!r} requested for op {op!r} is not usable here: {reason}")
    _load_backend(backend)
    impls = _IMPLS[op]
    if backend in impls:
        return impls[backend]
    logger.debug("op %s has no %s implementation; using the torch reference", op, backend)
    return impls["torch"]


def available_impls(op: str) -> list[str]:
    importlib.import_module(f"atom.ops.{_OP_FAMILY[op]}")
    for backend in _BACKEND_MODULES:
        if backend_status(backend)[0]:
            _load_backend(backend)
    return sorted(_IMPLS[op])


# op name -> module in atom.ops holding its torch reference
_OP_FAMILY = {
    "rms_norm": "norm",
    "fused_add_rms_norm": "norm",
    "rotary_embedding": "rope",
    "silu_and_mul": "activation",
    "gelu_tanh_and_mul": "activation",
    "moe_topk_softmax": "moe",
    "fused_experts": "moe",
    "reshape_and_cache": "attention",
    "paged_attention": "attention",
    "sample": "sampling",
    "qk_norm_rope_cache": "qk_norm_rope_cache",
    "fp8_quant_group": "quant_fp8",
    "fp8_quant_token": "quant_fp8",
    "fp8_quantize_weight": "quant_fp8",
    "fp8_linear": "quant_fp8",
    "fp8_fused_experts": "quant_fp8",
}
