"""atom.testing.speed_up_triton_interpreter, which the suites' conftests install under TRITON_INTERPRET=1: a launch
patches triton.language once, and helper calls inside it no longer walk the module again (the triton-interpret
lane's largest overhead). Under the interpreter only: a GPU compiles kernels and never calls these paths.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton's CPU interpreter only (TRITON_INTERPRET=1)", allow_module_level=True)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from atom.testing import speed_up_triton_interpreter  # noqa: E402
from triton.runtime import interpreter as ti  # noqa: E402


@triton.jit
def _inner(x, k: tl.constexpr):
    return tl.where(x > 0, x * k, -x) + tl.sum(x, axis=0)


@triton.jit
def _outer(x, k: tl.constexpr):
    return _inner(x, k) + _inner(x * 0.5, k + 1)


@triton.jit
def _kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    tl.store(y_ptr + offs, _outer(tl.load(x_ptr + offs), 3))


def _reference(x: torch.Tensor) -> torch.Tensor:
    def inner(v, k):
        return torch.where(v > 0, v * k, -v) + v.sum(-1, keepdim=True)

    return inner(x, 3) + inner(x * 0.5, 4)


def _launch_counting_patches() -> tuple[list[str], bool]:
    """One launch of _kernel (3 programs, each calling _outer, which calls _inner twice, and tl.sum inside), with
    triton.language's patches counted by the function they were for; whether it matched the reference."""
    calls = []
    real = ti._patch_lang
    ti._patch_lang = lambda fn: calls.append(fn.__name__) or real(fn)
    try:
        x = torch.randn(3, 16)
        y = torch.empty_like(x)
        _kernel[(3,)](x, y, N=16)
    finally:
        ti._patch_lang = real
    return calls, torch.allclose(y, _reference(x), rtol=1e-6, atol=1e-6)


def test_installed_and_one_language_patch_a_launch():
    """Installed with CI's Triton (the conftest did it; a second call keeps it), and a launch of a kernel whose
    helpers call helpers patches triton.language once, not once a helper call; the helpers still run the
    interpreted builtins (the reference's result), and the builtins are restored after the grid."""
    assert speed_up_triton_interpreter()
    assert speed_up_triton_interpreter()
    calls, ok = _launch_counting_patches()
    assert ok
    assert calls.count("_kernel") == 1 and "_outer" not in calls and "_inner" not in calls, calls
    assert tl.core.is_builtin(tl.load)  # restored after the grid


def test_a_helper_whose_language_the_launch_left_unpatched_still_patches_it():
    """The skip needs every triton.language module in the helper's globals patched. tl.sum lives in
    triton.language.standard, whose globals hold triton.language.core, a module the launch's own patch (of the
    kernel's `tl`) does not reach: in a fresh process its first call patches it, as Triton does, and the kernel
    runs (skipping it there fails with Triton's "_semantic argument must be provided"). A fresh process, because
    Triton leaves that patch of triton.language.core in place for the rest of a process."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_triton_interpreter as t; "
            "from atom.testing import speed_up_triton_interpreter as s; assert s(); "
            "calls, ok = t._launch_counting_patches(); print(calls, ok)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['_kernel', 'sum'] True", proc.stdout
