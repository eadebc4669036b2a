"""RMSNorm kernels: one program per row, statistics in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.norm import norm_out_dtype
from atom.ops.registry import register
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait


@triton.jit
def rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, x_stride, res_stride, eps, HAS_RES: tl.constexpr,
                 BLOCK: tl.constexpr, PARTS: tl.constexpr, part_stride):
    """One row of (fused add +) RMSNorm: stores x + residual (HAS_RES) and returns norm(x) * w in float32, before
    the cast to the output dtype. Shared by the float kernel below and the FP8-emitting one
    (fp8_producers.py), so their outputs agree bit for bit.

    PARTS > 0 (with HAS_RES): x is a split-K GEMM's float32 partials (x_ptr [PARTS, rows, n_cols], part_stride
    apart), added here in split order and rounded to the residual's dtype, as quant_fp8's _split_k_sum_kernel
    adds and stores them: the same x, without that kernel."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if PARTS > 0:
        acc = tl.zeros([BLOCK], tl.float32)
        for s in tl.static_range(PARTS):
            acc += tl.load(x_ptr + s * part_stride + row * x_stride + cols, mask=mask, other=0.0)
        x = acc.to(res_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RES:
        # residual = x + residual, rounded to the activation dtype as the reference does
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return normed * w


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, x_stride, res_stride, out_stride,
                     eps, part_stride, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
                     PARTS: tl.constexpr = 0):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    y = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, x_stride, res_stride, eps, HAS_RES, BLOCK,
                     PARTS, part_stride)
    cols = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=cols < n_cols)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def row_source(x2: torch.Tensor, parts: torch.Tensor | None) -> tuple[torch.Tensor, int, int, int]:
    """(x_ptr, x_stride, part_stride, PARTS) of rms_norm_row: the rows x2 [rows, N], or a split-K GEMM's float32
    partials [S, rows, N] standing for them."""
    if parts is None:
        return x2, x2.stride(0), 0, 0
    return parts, parts.stride(1), parts.stride(0), parts.shape[0]


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            parts: torch.Tensor | None = None):
    """parts: x given as a split-K GEMM's float32 partials [S, rows, N]; x is then the residual (its shape and
    dtype), as in fp8_producers._norm_quant."""
    n = x.shape[-1]
    x2 = _rows(x)
    src, src_stride, part_stride, n_parts = row_source(x2, parts)
    out = torch.empty(x2.shape, dtype=norm_out_dtype(x.dtype, weight.dtype), device=x.device)
    res2 = _rows(residual) if residual is not None else x2
    res_out = torch.empty_like(x2) if residual is not None else out
    block = triton.next_power_of_2(n)
    num_warps = min(max(block // 256, 1), 16)
    _rms_norm_kernel[(x2.shape[0],)](src, res2, weight, out, res_out, n, src_stride, res2.stride(0),
                                     out.stride(0), eps, part_stride, HAS_RES=residual is not None, BLOCK=block,
                                     num_warps=num_warps, PARTS=n_parts, **pdl_args(x.device))
    return out.view(x.shape), res_out.view(x.shape)


def check_split_parts(parts: torch.Tensor, residual: torch.Tensor) -> None:
    """parts: a split-K GEMM's float32 partials [S, rows, N] of an output shaped like residual (rows x N)."""
    if parts.dim() != 3 or parts.dtype != torch.float32 or not parts.is_contiguous():
        raise ValueError(f"split-K partials must be a contiguous float32 [splits, rows, N] tensor, got "
                         f"{parts.dtype} {tuple(parts.shape)}")
    if parts.shape[1] * parts.shape[2] != residual.numel() or parts.shape[2] != residual.shape[-1]:
        raise ValueError(f"split-K partials {tuple(parts.shape)} do not match the residual {tuple(residual.shape)}")


def fused_add_rms_norm_parts(parts: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm(x, residual, weight, eps) with x given as a split-K GEMM's float32 partials [S, rows, N]
    (x = their sum in split order, in the residual's dtype: what _split_k_sum_kernel would store). Bit-identical to
    the sum kernel followed by fused_add_rms_norm; one kernel fewer. Triton only (atom.layers.linear's split-sum
    hand-off runs where the GEMM and this norm are both Triton)."""
    check_split_parts(parts, residual)
    return _launch(residual, residual, weight, eps, parts=parts)


@register("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


@register("fused_add_rms_norm", "triton")
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rms_norm(residual), residual), both new tensors like the reference."""
    return _launch(x, residual, weight, eps)
