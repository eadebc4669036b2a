"""What we run on (rocm | cuda | cpu) and which kernel backend that implies."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "aiter")


@functools.cache
def device_kind() -> str:
    """'rocm', 'cuda' or 'cpu' for this process."""
    if torch.cuda.is_available():
        return "rocm" if torch.version.hip else "cuda"
    return "cpu"


def default_device() -> torch.device:
    return torch.device("cpu") if device_kind() == "cpu" else torch.device("cuda", torch.cuda.current_device())


@functools.cache
def backend_status(backend: str) -> tuple[bool, str]:
    """(available, reason) for one kernel backend on this machine."""
    if backend == "torch":
        return True, "pure PyTorch reference, runs everywhere"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "the 'triton' package is not installed"
        if device_kind() == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "no GPU (set TRITON_INTERPRET=1 to run Triton kernels on CPU, for tests only)"
        return True, f"triton on {device_kind()}"
    if backend == "aiter":
        if device_kind() != "rocm":
            return False, f"AITER needs a ROCm GPU; this process runs on {device_kind()}"
        try:  # aiter looks for hipconfig at import time, so only try on ROCm
            import aiter  # noqa: F401
        except Exception as e:  # pragma: no cover - needs ROCm
            return False, f"'import aiter' failed: {e}"
        return True, "amd-aiter on ROCm"
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)} or auto")


def auto_backend() -> str:
    kind = device_kind()
    if kind == "rocm" and backend_status("aiter")[0]:
        return "aiter"
    if kind in ("rocm", "cuda") and backend_status("triton")[0]:
        return "triton"
    return "torch"


def kernel_backend() -> str:
    """The process-wide backend: ATOM_KERNEL_BACKEND=auto|torch|triton|aiter (default auto)."""
    requested = os.environ.get("ATOM_KERNEL_BACKEND", "auto").strip().lower() or "auto"
    if requested == "auto":
        return auto_backend()
    ok, reason = backend_status(requested)
    if not ok:
        raise RuntimeError(f"ATOM_KERNEL_BACKEND={requested} is not usable here: {reason}")
    return requested
