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
def _gate_or_up(x_ptr, offs, mask, part_stride, PARTS_IN: tl.constexpr, dtype: tl.constexpr):
    """(gate | up) values at offs: loaded, or (PARTS_IN > 0) the sum of a split-K GEMM's PARTS_IN float32 partials
    in split order, rounded to dtype: quant_fp8._split_k_sum_kernel's arithmetic, so the same bits as its output."""
    if PARTS_IN == 0:
        v = tl.load(x_ptr + offs, mask=mask, other=0.0)
    else:
        acc = tl.zeros(offs.shape, tl.float32)
        for s in tl.static_range(PARTS_IN):
            acc += tl.load(x_ptr + s * part_stride + offs, mask=mask, other=0.0)
        v = acc.to(dtype)
    return v


@triton.jit
def gated_cols(x_ptr, row, cols, d, x_stride, ACT: tl.constexpr, part_stride=0, PARTS_IN: tl.constexpr = 0,
               DTYPE: tl.constexpr = tl.float32):
    """act(gate) * up for columns `cols` of one row of (gate | up), in float32 before the cast to the output
    dtype. Shared by the float kernel below and the FP8-emitting one (fp8_producers.py), so their outputs agree
    bit for bit. PARTS_IN > 0: x_ptr holds the gate_up GEMM's split-K partials [PARTS_IN, rows, 2d] (part_stride
    apart), added here and rounded to DTYPE (the GEMM's output dtype) instead of read from its summed output."""
    mask = cols < d
    gate = _gate_or_up(x_ptr, row * x_stride + cols, mask, part_stride, PARTS_IN, DTYPE)
    up = _gate_or_up(x_ptr, row * x_stride + d + cols, mask, part_stride, PARTS_IN, DTYPE)
    # act(gate) is rounded to the input dtype before the product, as the torch reference does
    a = _act(gate.to(tl.float32), ACT)
    return a.to(gate.dtype).to(tl.float32) * up.to(tl.float32)


@triton.jit
def _gated_kernel(x_ptr, out_ptr, d, x_stride, out_stride, ACT: tl.constexpr, BLOCK: tl.constexpr,
                  PDL: tl.constexpr, parts_ptr=None, parts_stride=0, PARTS: tl.constexpr = False, part_stride=0,
                  PARTS_IN: tl.constexpr = 0):
    """PARTS: also the absolute maximum of this program's BLOCK columns of the stored output, at parts_ptr[row,
    column block] (float32; silu_and_mul_rowmax). PARTS_IN: x as split-K partials (gated_cols)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y = gated_cols(x_ptr, row, cols, d, x_stride, ACT, part_stride, PARTS_IN,
                   out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, y, mask=cols < d)
    if PARTS:  # columns past d hold act(0) * 0 = 0
        tl.store(parts_ptr + row * parts_stride + tl.program_id(1) + tl.arange(0, 1),
                 tl.max(tl.abs(y.to(tl.float32)), axis=0, keep_dims=True))


GATED_BLOCK = 1024  # columns a program (atom.ops.fp8_producers.ROWMAX_CHUNK: one partial maximum each)


def _gated(x: torch.Tensor, act: int, parts: bool = False, split_parts: torch.Tensor | None = None):
    """act(gate) * up of x [..., 2d] (parts: with the rows' partial maxima). split_parts: x's values as a split-K
    GEMM's float32 partials [S, rows, 2d] (contiguous) whose in-order sum rounded to x's dtype is x; x itself (the
    GEMM's unwritten output) gives only the shape and dtype."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if split_parts is not None:
        if (split_parts.dtype != torch.float32 or split_parts.dim() != 3 or not split_parts.is_contiguous()
                or split_parts.shape[1:] != x2.shape):
            raise ValueError(f"gated activation: split-K partials must be contiguous float32 [splits, "
                             f"{x2.shape[0]}, {2 * d}], got {split_parts.dtype} {tuple(split_parts.shape)}")
        src, part_args = split_parts, dict(part_stride=split_parts.stride(0), PARTS_IN=split_parts.shape[0])
        x_stride = split_parts.stride(1)
    else:
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        src, part_args, x_stride = x2, {}, x2.stride(0)
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(d), GATED_BLOCK)
    maxima = torch.empty(x2.shape[0], triton.cdiv(d, block), dtype=torch.float32, device=x.device) if parts else None
    extra = dict(parts_ptr=maxima, parts_stride=maxima.stride(0), PARTS=True) if parts else {}
    if x2.shape[0]:
        _gated_kernel[(x2.shape[0], triton.cdiv(d, block))](src, out, d, x_stride, out.stride(0), ACT=act,
                                                            BLOCK=block, num_warps=4, **pdl_args(x2.device), **extra,
                                                            **part_args)
    y = out.view(*x.shape[:-1], d)
    return (y, maxima.view(*x.shape[:-1], maxima.shape[1])) if parts else y


_ACT_CODES = {"silu_and_mul": 0, "gelu_tanh_and_mul": 1}  # the gated ops' ACT (_act)


def gated_from_split_parts(name: str, split_parts: torch.Tensor, out: torch.Tensor, rowmax: bool = False):
    """The gated op `name` (silu_and_mul / gelu_tanh_and_mul) on a split-K GEMM's partials (atom.layers.fp8_input's
    SplitKPartials: parts [S, rows, 2d], out the unwritten [..., 2d] output): the partials are added inside the
    activation's kernel, no sum kernel; the same bits as the op on the summed output. rowmax: silu_and_mul_rowmax's
    form (the output and its rows' partial maxima)."""
    return _gated(out, _ACT_CODES[name], parts=rowmax, split_parts=split_parts)


@register("silu_and_mul", "triton")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gated(x, _ACT_CODES["silu_and_mul"])


@register("gelu_tanh_and_mul", "triton")
def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gated(x, _ACT_CODES["gelu_tanh_and_mul"])
