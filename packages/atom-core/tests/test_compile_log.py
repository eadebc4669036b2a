"""atom.ops.compile_log on a GPU: every Triton compile is recorded under the caller's label, a recompile
names the specialisation that caused it, and do_not_specialize keeps ATOM's per-batch scalars from
compiling again (the cold-start fix of issue 16)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a GPU and compiled Triton (the log does nothing under the interpreter)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from atom.ops.compile_log import CompileLog  # noqa: E402


def _kernels():
    # defined here so each test run compiles them afresh in this process (the on-disk cache may still serve)
    @triton.jit
    def _scale(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    @triton.jit(do_not_specialize=["n"])
    def _scale_ns(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    return _scale, _scale_ns


def test_compiles_are_logged_with_the_specialisation_that_differs():
    scale, scale_ns = _kernels()
    x = torch.ones(64, device="cuda")
    log = CompileLog()
    assert log.install()
    try:
        log.label = "first"
        for n in (3, 16, 1):  # plain int, divisible by 16, equal to 1: three specialisations
            scale[(1,)](x, n, BLOCK=64)
        log.label = "second"
        for n in (3, 16, 1):
            scale_ns[(1,)](x, n, BLOCK=64)
        torch.cuda.synchronize()
    finally:
        log.uninstall()
    by_label = log.by_label()
    assert by_label["first"]["compiles"] >= 2
    assert by_label["second"]["compiles"] == 1  # do_not_specialize: one variant for every n
    rows = {r["kernel"]: r for r in log.by_kernel()}
    assert "n" in rows["_scale"]["varying"] and rows["_scale"]["variants"] >= 2  # ==1 hint: Triton-version dependent
    assert rows["_scale_ns"]["variants"] == 1
    assert f"Triton JIT: {len(log.compiles)} compiles" in log.format()
