"""Gated activations: [..., 2*d] = (gate | up) -> [..., d], in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait


@triton.jit
def _tanh(x):
    # tanh through exp keeps to tl core (no libdevice), so the interpreter runs it too
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(gate, ACT: tl.constexpr):
    """act(gate) in float32: 0 = silu, 1 = gelu (tanh approximation)."""
    if ACT == 0:
        a = gate * tl.sigmoid(gate)
    else:
        a = 0.5 * gate * (1.0 + _tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))
    return a


@triton.jit
def gated_cols(x_ptr, row, cols, d, x_stride, ACT: tl.constexpr):
    """act(gate) * up for columns `cols` of one row of (gate | up), in float32 before the cast to the output
    dtype. Shared by the float kernel below and the FP8-emitting one (fp8_producers.py), so their outputs agree
    bit for bit."""
    mask = cols < d
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0)
    # act(gate) is rounded to the input dtype before the product, as the torch reference does
    a = _act(gate.to(tl.float32), ACT)
    return a.to(gate.dtype).to(tl.float32) * up.to(tl.float32)


@triton.jit
def _gated_kernel(x_ptr, out_ptr, d, x_stride, out_stride, ACT: tl.constexpr, BLOCK: tl.constexpr,
                  PDL: tl.constexpr, parts_ptr=None, parts_stride=0, PARTS: tl.constexpr = False):
    """PARTS: also the absolute maximum of this program's BLOCK columns of the stored output, at parts_ptr[row,
    column block] (float32; silu_and_mul_rowmax)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y = gated_cols(x_ptr, row, cols, d, x_stride, ACT).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, y, mask=cols < d)
    if PARTS:  # columns past d hold act(0) * 0 = 0
        tl.store(parts_ptr + row * parts_stride + tl.program_id(1) + tl.arange(0, 1),
                 tl.max(tl.abs(y.to(tl.float32)), axis=0, keep_dims=True))


GATED_BLOCK = 1024  # columns a program (atom.ops.fp8_producers.ROWMAX_CHUNK: one partial maximum each)


def _gated(x: torch.Tensor, act: int, parts: bool = False):
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(d), GATED_BLOCK)
    maxima = torch.empty(x2.shape[0], triton.cdiv(d, block), dtype=torch.float32, device=x.device) if parts else None
    extra = dict(parts_ptr=maxima, parts_stride=maxima.stride(0), PARTS=True) if parts else {}
    if x2.shape[0]:
        _gated_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, d, x2.stride(0), out.stride(0), ACT=act,
                                                            BLOCK=block, num_warps=4, **pdl_args(x2.device), **extra)
    y = out.view(*x.shape[:-1], d)
    return (y, maxima.view(*x.shape[:-1], maxima.shape[1])) if parts else y


@register("silu_and_mul", "triton")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gated(x, 0)


@register("gelu_tanh_and_mul", "triton")
def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gated(x, 1)
