"""RMSNorm / SiLU-and-mul that write FP8 codes + scales instead of their float output, and the FP8 GEMM on
pre-quantized activations (`fp8_linear_quantized`): together they replace norm -> quantization kernel -> GEMM
(three kernels, the float activations written and read back once more) by two kernels.

Bit-identity with the unfused path: the float part is the same code as the float kernels (norm.py,
activation.py: same block sizes, same reductions, same roundings), its result is rounded to the float op's
output dtype, and the quantization is fp8_common's dynamic_scale / quantize on the same 1 x GROUP slices (or
the whole row), as quant_fp8's quantization kernels do. fp8_linear_quantized runs quant_fp8's
fp8_gemm_quantized (torch._scaled_mm or the tl.dot GEMM, chosen the same way), so its output equals
fp8_linear's wherever fp8_linear runs that GEMM (M > GEMV_MAX_M; the layers hand plain activations to the GEMV
below that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.fp8_producers import ROWMAX_CHUNK, check_quantized_input, check_rowmax_input
from atom.ops.norm import norm_out_dtype
from atom.ops.quant_fp8 import check_weight_scale
from atom.ops.registry import register
from atom.ops.triton_kernels.activation import GATED_BLOCK, _gated, gated_cols
from atom.ops.triton_kernels.common import interpreting
from atom.ops.triton_kernels.fp8_common import dynamic_scale, fp8_consts, quantize
from atom.ops.triton_kernels.norm import check_split_parts, rms_norm_row, row_source
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait
from atom.ops.triton_kernels.quant_fp8 import (
    _rows,
    _swap_gemm,
    check_group_size,
    fp8_gemm_quantized,
    gemm_quantizes_rows,
    per_token_quant_fp8,
    row_block,
)

# one partial maximum a program of the gated kernel: its block is the references' chunk
assert GATED_BLOCK == ROWMAX_CHUNK, "the gated kernel's block must be atom.ops.fp8_producers.ROWMAX_CHUNK"

_TL_FLOAT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _store_quantized(y, q_row, s_row, col0, n_cols, num_groups, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                     ROW_SCALE: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                     MIN_EXP: tl.constexpr, EMULATE: tl.constexpr):
    """Quantize y (float32 [BLOCK], the row's columns col0 + [0, BLOCK); columns past n_cols are 0) and store
    the codes at q_row + col and the scales at s_row. ROW_SCALE: y is the whole row and gets one scale (per
    token, or a single group); otherwise BLOCK // GROUP scales, one per 1 x GROUP slice."""
    fp8 = q_row.dtype.element_ty
    if ROW_SCALE:
        cols = col0 + tl.arange(0, BLOCK)
        s = dynamic_scale(tl.max(tl.abs(y), axis=0, keep_dims=True), FP8_MAX, MIN_SCALE)  # [1]
        tl.store(q_row + cols, quantize(y, s, fp8, FP8_MAX, MIN_EXP, EMULATE), mask=cols < n_cols)
        tl.store(s_row + tl.arange(0, 1), s)
    else:
        g = tl.arange(0, BLOCK // GROUP)
        cols = col0 + g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        y2 = tl.reshape(y, (BLOCK // GROUP, GROUP))  # row-major: y2[i, j] is column col0 + i * GROUP + j
        s = dynamic_scale(tl.max(tl.abs(y2), axis=1), FP8_MAX, MIN_SCALE)
        tl.store(q_row + cols, quantize(y2, s[:, None], fp8, FP8_MAX, MIN_EXP, EMULATE), mask=cols < n_cols)
        gi = col0 // GROUP + g
        tl.store(s_row + gi, s, mask=gi < num_groups)


@triton.jit
def _rms_norm_quant_kernel(x_ptr, res_ptr, w_ptr, q_ptr, s_ptr, res_out_ptr, n_cols, num_groups, x_stride,
                           res_stride, q_stride, s_stride, eps, part_stride, ACT: tl.constexpr,
                           HAS_RES: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, ROW_SCALE: tl.constexpr,
                           FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, MIN_EXP: tl.constexpr,
                           EMULATE: tl.constexpr, PDL: tl.constexpr, PARTS: tl.constexpr = 0):
    # the float part is norm.py's own row function (bit-identical norm output); PARTS: x as split-K partials
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    y = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, x_stride, res_stride, eps, HAS_RES, BLOCK,
                     PARTS, part_stride)
    y = y.to(ACT).to(tl.float32)  # the norm's output, as the unfused norm stores it
    _store_quantized(y, q_ptr + row * q_stride, s_ptr + row * s_stride, 0, n_cols, num_groups, BLOCK, GROUP,
                     ROW_SCALE, FP8_MAX, MIN_SCALE, MIN_EXP, EMULATE)


@triton.jit
def _silu_mul(x_ptr, row, cols, d, x_stride, ACT: tl.constexpr):
    """silu(gate) * up for columns `cols`, as activation.py's _gated_kernel computes and stores it, in float32."""
    return gated_cols(x_ptr, row, cols, d, x_stride, 0).to(ACT).to(tl.float32)


@triton.jit
def _silu_mul_quant_group_kernel(x_ptr, q_ptr, s_ptr, d, num_groups, x_stride, q_stride, s_stride,
                                 ACT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                                 FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, MIN_EXP: tl.constexpr,
                                 EMULATE: tl.constexpr, PDL: tl.constexpr):
    """BLOCK // GROUP whole groups of one row per program."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK
    y = _silu_mul(x_ptr, row, col0 + tl.arange(0, BLOCK), d, x_stride, ACT)
    _store_quantized(y, q_ptr + row * q_stride, s_ptr + row * s_stride, col0, d, num_groups, BLOCK, GROUP, False,
                     FP8_MAX, MIN_SCALE, MIN_EXP, EMULATE)


@triton.jit
def _silu_mul_quant_token_kernel(x_ptr, q_ptr, s_ptr, d, x_stride, q_stride, ACT: tl.constexpr,
                                 BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                                 MIN_EXP: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr):
    """One row per program: the row's absolute max over all of it, then the row quantized. A row that fits one
    BLOCK (row_block) is read once and kept in registers; a longer one is read again and its product recomputed
    (cheaper than writing and reading it back)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    if BLOCK >= d:  # the whole row in registers: one read, no second pass
        y = _silu_mul(x_ptr, row, c, d, x_stride, ACT)
        s = dynamic_scale(tl.max(tl.abs(y), axis=0, keep_dims=True), FP8_MAX, MIN_SCALE)  # [1]
        tl.store(q_ptr + row * q_stride + c, quantize(y, s, q_ptr.dtype.element_ty, FP8_MAX, MIN_EXP, EMULATE),
                 mask=c < d)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, d, BLOCK):
            amax = tl.maximum(amax, tl.abs(_silu_mul(x_ptr, row, k0 + c, d, x_stride, ACT)))
        s = dynamic_scale(tl.max(amax, axis=0, keep_dims=True), FP8_MAX, MIN_SCALE)  # [1]
        for k0 in range(0, d, BLOCK):
            y = _silu_mul(x_ptr, row, k0 + c, d, x_stride, ACT)
            tl.store(q_ptr + row * q_stride + k0 + c,
                     quantize(y, s, q_ptr.dtype.element_ty, FP8_MAX, MIN_EXP, EMULATE), mask=k0 + c < d)
    tl.store(s_ptr + row + tl.arange(0, 1), s)


def _act_dtype(dtype: torch.dtype):
    if dtype not in _TL_FLOAT:
        raise ValueError(f"the Triton FP8 producers take float32 / bfloat16 / float16 activations, got {dtype}")
    return _TL_FLOAT[dtype]


def _outputs(lead, k: int, rows: int, group_size: int | None, fp8_dtype: torch.dtype, device):
    groups = 1 if group_size is None else triton.cdiv(k, group_size)
    q = torch.empty(rows, k, dtype=fp8_dtype, device=device)
    s = torch.empty(rows, groups, dtype=torch.float32, device=device)
    return q, s, lambda: (q.view(*lead, k), s.view(*lead, groups))


def _norm_quant(x, residual, weight, eps, group_size, fp8_dtype, parts: torch.Tensor | None = None):
    """parts: x given as a split-K GEMM's float32 partials [S, rows, N] (x itself is then the residual: its shape
    and dtype)."""
    check_group_size(group_size, "the Triton FP8 producers")
    n = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    src, src_stride, part_stride, n_parts = row_source(x2, parts)
    # the unfused norm's output dtype (norm.py's _launch): what the quantization kernel would read
    act = norm_out_dtype(x.dtype, weight.dtype)
    q, s, views = _outputs(x.shape[:-1], n, rows, group_size, fp8_dtype, x.device)
    res2 = _rows(residual) if residual is not None else x2
    res_out = torch.empty_like(x2) if residual is not None else q
    block = triton.next_power_of_2(n)  # as the unfused norm: the same reduction
    row_scale = group_size is None or block <= group_size  # per token, or one group holding the whole row
    if rows:
        _rms_norm_quant_kernel[(rows,)](
            src, res2, weight, q, s, res_out, n, s.shape[1], src_stride, res2.stride(0), q.stride(0), s.stride(0),
            eps, part_stride, ACT=_act_dtype(act), HAS_RES=residual is not None, BLOCK=block,
            GROUP=group_size or block, ROW_SCALE=row_scale, **fp8_consts(fp8_dtype),
            num_warps=min(max(block // 256, 1), 16), PARTS=n_parts, **pdl_args(x.device))
    return (*views(), res_out.view(x.shape))


@register("rms_norm_quant_fp8", "triton")
def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None,
                       fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_quant(x, None, weight, eps, group_size, fp8_dtype)[:2]


@register("fused_add_rms_norm_quant_fp8", "triton")
def fused_add_rms_norm_quant_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None,
    fp8_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _norm_quant(x, residual, weight, eps, group_size, fp8_dtype)


def fused_add_rms_norm_quant_fp8_parts(
    parts: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None,
    fp8_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm_quant_fp8 with x given as a split-K GEMM's float32 partials [S, rows, N] (norm.py's
    fused_add_rms_norm_parts: x = their sum in split order, in the residual's dtype). Bit-identical to the sum
    kernel followed by fused_add_rms_norm_quant_fp8."""
    check_split_parts(parts, residual)
    return _norm_quant(residual, residual, weight, eps, group_size, fp8_dtype, parts=parts)


@register("silu_and_mul_quant_fp8", "triton")
def silu_and_mul_quant_fp8(x: torch.Tensor, group_size: int | None,
                           fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    check_group_size(group_size, "the Triton FP8 producers")
    d = x.shape[-1] // 2
    x2 = _rows(x)
    rows = x2.shape[0]
    q, s, views = _outputs(x.shape[:-1], d, rows, group_size, fp8_dtype, x.device)
    consts = dict(ACT=_act_dtype(x.dtype), **fp8_consts(fp8_dtype))
    if rows and group_size is not None:
        block = max(group_size, min(triton.next_power_of_2(d), 1024))  # whole groups per program
        _silu_mul_quant_group_kernel[(rows, triton.cdiv(d, block))](
            x2, q, s, d, s.shape[1], x2.stride(0), q.stride(0), s.stride(0), BLOCK=block, GROUP=group_size,
            **consts, num_warps=4, **pdl_args(x.device))
    elif rows:
        block, warps = row_block(d, rows)
        _silu_mul_quant_token_kernel[(rows,)](x2, q, s, d, x2.stride(0), q.stride(0), BLOCK=block, **consts,
                                              num_warps=warps, **pdl_args(x.device))
    return views()


@register("silu_and_mul_rowmax", "triton")
def silu_and_mul_rowmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_and_mul's kernel, each program also storing its block's absolute maximum (atom.ops.fp8_producers)."""
    return _gated(x, 0, parts=True)


@register("fp8_linear_rowmax", "triton")
def fp8_linear_rowmax(x: torch.Tensor, parts: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype, *,
                      split_parts: list | None = None) -> torch.Tensor:
    """The swap-AB kernel quantizing x itself (QUANT_A) where fp8_gemm_quantized would run that kernel on x's
    codes; elsewhere the quantization kernel and fp8_gemm_quantized (the same codes either way). split_parts:
    fp8_gemm_quantized's `parts` (the split-K partials left for the consumer to add)."""
    check_rowmax_input(x, parts, weight)
    n, k = weight.shape
    x2, parts2 = _rows(x), parts.reshape(-1, parts.shape[-1])
    m = x2.shape[0]
    if gemm_quantizes_rows(m, weight, None, out_dtype):
        precise = out_dtype == torch.float32 and x2.is_cuda and not interpreting()
        out = _swap_gemm(x2, parts2.contiguous(), weight, weight_scale, bias, None, out_dtype, precise, quant_a=True,
                         parts=split_parts)
    else:
        q, s = per_token_quant_fp8(x2, weight.dtype)
        out = fp8_gemm_quantized(q, s, weight, weight_scale, bias, None, out_dtype, parts=split_parts)
    return out.view(*x.shape[:-1], n)


@register("fp8_linear_quantized", "triton")
def fp8_linear_quantized(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: list[int] | None,
    out_dtype: torch.dtype,
    *,
    parts: list | None = None,
) -> torch.Tensor:
    """quant_fp8's GEMM on pre-quantized activations (fp8_gemm_quantized: what fp8_linear runs at M > GEMV_MAX_M;
    parts: its split-K partials left for the consumer)."""
    check_quantized_input(q, scale, weight, block_size)
    n, k = weight.shape
    check_weight_scale(weight_scale, n, k, block_size, "fp8_linear_quantized weight")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp8_linear_quantized bias has shape {tuple(bias.shape)}, expected ({n},)")
    if weight.stride(-1) != 1:
        raise ValueError("fp8_linear_quantized: the weight's K dimension must be contiguous")
    return fp8_gemm_quantized(_rows(q), _rows(scale), weight, weight_scale, bias, block_size, out_dtype,
                              parts=parts).view(*q.shape[:-1], n)
