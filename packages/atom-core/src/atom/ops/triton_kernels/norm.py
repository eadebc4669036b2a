"""RMSNorm kernels: one program per row, statistics in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait


@triton.jit
def rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, x_stride, res_stride, eps, HAS_RES: tl.constexpr,
                 BLOCK: tl.constexpr):
    """One row of (fused add +) RMSNorm: stores x + residual (HAS_RES) and returns norm(x) * w in float32, before
    the cast to the output dtype. Shared by the float kernel below and the FP8-emitting one
    (fp8_producers.py), so their outputs agree bit for bit."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
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
                     eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    y = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, x_stride, res_stride, eps, HAS_RES, BLOCK)
    cols = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=cols < n_cols)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if a.itemsize > b.itemsize else b


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    x2 = _rows(x)
    # Plain dtype logic, not torch.result_type: torch.compile (vLLM's Dynamo) cannot trace an op that returns a dtype.
    out_dtype = x.dtype if weight.dtype == x.dtype else _promote(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res2 = _rows(residual) if residual is not None else x2
    res_out = torch.empty_like(x2) if residual is not None else out
    block = triton.next_power_of_2(n)
    num_warps = min(max(block // 256, 1), 16)
    _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out, res_out, n, x2.stride(0), res2.stride(0),
                                     out.stride(0), eps, HAS_RES=residual is not None, BLOCK=block,
                                     num_warps=num_warps, **pdl_args(x.device))
    return out.view(x.shape), res_out.view(x.shape)


@register("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


@register("fused_add_rms_norm", "triton")
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rms_norm(residual), residual), both new tensors like the reference."""
    return _launch(x, residual, weight, eps)
