"""FP8 activation quantization and the FP8 GEMM (fp8 tl.dot, float32 accumulation) and GEMV behind `fp8_linear`.

Two weight layouts share each kernel:
- block scales (BLOCK_SCALES): W [N, K] with scales per [bn, bk] block and activations in 1 x bk groups.
  The K step is one group, so each step is one fp8 dot whose float32 result is multiplied by the
  group's activation scale and the block's weight scale before it joins the accumulator (DeepSeek-V3's
  scheme; it also promotes Hopper's reduced-precision FP8 accumulation to float32 every group).
- per-token activations x per-channel (or per-tensor: stride 0) weight scales: plain fp8 dots,
  promoted to float32 every K step (max_num_imprecise_acc), both scales applied once at the end.
float32 outputs (the correctness mode, held to float32 references) take neither FP8 MMA: the codes are widened to
bf16 (exact) for a dot that accumulates in float32 (PRECISE; an H200 float32 FP8 model drifted 8e-3 on the FP8 MMA).

Activation quantization is its own kernel before the GEMM, at every M: A is quantized once and read back as
FP8 (half the bytes). A GEMM that quantized A itself while loading it (its prologue, every column-block program
repeating it) was measured slower at every decode size on the H200 (kernel_bench.py, 2026-12-01: 8b o M1 39.5 us
against 16.2 us with the separate kernel, down M1 102 against 28.5, M16 20.1 against 16.4), so it was removed.

Decode tiles: BLOCK_M 16, and split-K over several programs when the column blocks alone cannot keep
every SM streaming weights (a 4096 x 4096 weight has 64 column blocks of 64 for 132 SMs); split partial
sums are added in a fixed order by a second small kernel (deterministic, no atomics).

M <= SWAP_MAX_M (32) runs the swap-AB kernel (_fp8_gemm_swap_kernel): out^T = W A^T, so the weight tile [64, 128]
is the matrix instruction's wide operand and the few activation rows its narrow side (wgmma N = 16-32), instead of
a 16-row activation tile that leaves most of an MMA empty; same scales, same split-K. On the H200 it beat the tl.dot
GEMM and the GEMV below at M = 1-32 on every qwen3-8b shape (tools/device/fp8_skinny_bench.py), and the engine's
batch 1 / 32 steps went from 3.94 / 4.88 to 3.57 / 4.28 ms (with the one-block per-token quantization).

The GEMV (M <= GEMV_MAX_M: off by default now, ATOM_FP8_GEMV_MAX_M=1 brings it back) came first, because a 16-row
tl.dot tile for one row streamed the 8b weights at only ~1.0-1.8 TB/s on the H200 (2026-12-01). The GEMV loads W
tiles [16, 1024-2048] with wide K-contiguous loads, converts them to float32 and reduces them against the row with
FMAs (tl.sum), the same scales at the same granularity as the tl.dot kernel, and quantizes the activations itself
(no quantization kernel before it: at one row that kernel alone was 4.4 us a call, 16% of an 8b FP8 decode step).
Measured at M = 1 it beats the tl.dot path by 3-19% per shape (2026-12-02), but both still stream FP8 weights at
only 1.4-2.5 TB/s: kernel launch and ramp-up dominate GEMMs of 16-100 MB (KERNEL_NOTES.md).

With per-token activations (per-channel / per-tensor weights) the GEMV reads the quantization kernel's codes
instead (GEMV_FUSED_QUANT_PER_TOKEN: quantizing a whole row in every program lost), or a fused producer's.

Weight-only (W8A16: the swap-AB kernel widening each FP8 weight tile to bf16 and dotting it with the float
activations) was built and measured, and removed: on an H100 (2026-12-05, fp8_skinny_bench.py) it was 4.6-9.3 us a
call slower than the same kernel on a fused producer's codes (qwen3-8b down at M = 1: 30.2 against 25.3 us; gate_up
at M = 32: 53.8 against 44.5), more than the quantization it saves (fused into the producers), as the static count
predicted (4.6-4.9 instructions a weight against 1.4-2.2; KERNEL_NOTES.md stop 42).

Per-token x per-channel / per-tensor GEMMs of SCALED_MM_MIN_M (129) rows or more go to torch._scaled_mm's
rowwise-scaled kernel (cuBLASLt on sm90) where it applies (SCALED_MM, fp8_gemm_quantized), with fast accumulation
(SCALED_MM_FAST_ACC); block-scaled weights and other devices keep the tl.dot GEMM.

Both GEMM kernels can load their tiles through tensor descriptors (TMA: Hopper's bulk copies, zero past the edges)
and, for per-channel / per-tensor weights, let the FP8 MMA accumulate all of K before the float32 promotion
(FAST_ACC, as vLLM's CUTLASS kernels do). The built-in choices follow an H100 sweep (tools/device/fp8_tiles.py);
ATOM_FP8_TILES replaces them with rules measured on the GPU at hand (that script writes them).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

from atom.ops.quant_fp8 import check_linear_args
from atom.ops.registry import register
from atom.ops.triton_kernels.common import env_flag as _env_flag
from atom.ops.triton_kernels.common import env_int, fit_tile, interpreting, num_sms
from atom.ops.triton_kernels.fp8_common import dynamic_scale, fp8_consts, quantize, quantize_by_reciprocal, reciprocal
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait, prefetch_l2


# ---------------------------------------------------------------- activation quantization


@triton.jit
def _quant_group_kernel(x_ptr, q_ptr, s_ptr, k_dim, num_groups, x_stride, q_stride, s_stride,
                        GROUP: tl.constexpr, GROUPS: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                        MIN_EXP: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr):
    """GROUPS consecutive 1 x GROUP groups of one row per program."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    col = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    ok = (col < k_dim) & (g[:, None] < num_groups)
    x = tl.load(x_ptr + row * x_stride + col, mask=ok, other=0.0).to(tl.float32)
    s = dynamic_scale(tl.max(tl.abs(x), axis=1), FP8_MAX, MIN_SCALE)
    q = quantize(x, s[:, None], q_ptr.dtype.element_ty, FP8_MAX, MIN_EXP, EMULATE)
    tl.store(q_ptr + row * q_stride + col, q, mask=ok)
    tl.store(s_ptr + row * s_stride + g, s, mask=g < num_groups)


@triton.jit
def _quant_token_kernel(x_ptr, q_ptr, s_ptr, k_dim, x_stride, q_stride, BLOCK: tl.constexpr,
                        FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, MIN_EXP: tl.constexpr,
                        EMULATE: tl.constexpr, PDL: tl.constexpr):
    """One row per program: its absolute max, then the quantized row (read once when it fits one BLOCK)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    if BLOCK >= k_dim:
        x = tl.load(x_ptr + row * x_stride + c, mask=c < k_dim, other=0.0).to(tl.float32)
        s = dynamic_scale(tl.max(tl.abs(x), axis=0, keep_dims=True), FP8_MAX, MIN_SCALE)  # [1]
        tl.store(q_ptr + row * q_stride + c, quantize(x, s, q_ptr.dtype.element_ty, FP8_MAX, MIN_EXP, EMULATE),
                 mask=c < k_dim)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, k_dim, BLOCK):
            x = tl.load(x_ptr + row * x_stride + k0 + c, mask=k0 + c < k_dim, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        s = dynamic_scale(tl.max(amax, axis=0, keep_dims=True), FP8_MAX, MIN_SCALE)  # [1]
        for k0 in range(0, k_dim, BLOCK):
            x = tl.load(x_ptr + row * x_stride + k0 + c, mask=k0 + c < k_dim, other=0.0).to(tl.float32)
            tl.store(q_ptr + row * q_stride + k0 + c,
                     quantize(x, s, q_ptr.dtype.element_ty, FP8_MAX, MIN_EXP, EMULATE), mask=k0 + c < k_dim)
    tl.store(s_ptr + row + tl.arange(0, 1), s)


# Per-token quantization: one program a row, so at decode a handful of programs do all the work. Measured in the
# engine (H200, 2026-12-02, qwen3-8b FP8 batch 1): a row looped in 2,048-4,096 chunks, twice (amax, then the
# codes), took 12.1 us for SiLU-and-mul + quantization of 12,288 columns and 6.4 us for 4,096: latency of one
# chunk after another. Rows up to ROW_BLOCK_MAX columns are now read once, in one block, with warps to match:
# 6.2 and 4.0 us a call in the same profile (engine batch 1: 3.82 -> 3.57 ms a step together with nothing else).
ROW_BLOCK_MAX = 16384


ROW_TILE_LARGE_DEFAULT = (2048, 4096, 8)


def _env_row_tile_large() -> tuple[int, int, int] | None:
    raw = os.environ.get("ATOM_FP8_ROW_TILE_LARGE", "").strip()
    if not raw:
        return ROW_TILE_LARGE_DEFAULT
    if raw.lower() in ("0", "off", "none"):
        return None
    try:
        rows, block, warps = (int(v) for v in raw.split(":"))
    except ValueError:
        raise ValueError(f"ATOM_FP8_ROW_TILE_LARGE must be min_rows:block:num_warps, got {raw!r}") from None
    if rows < 1 or block < 16 or block & (block - 1) or block > ROW_BLOCK_MAX or warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"ATOM_FP8_ROW_TILE_LARGE: min_rows >= 1, block a power of two in 16..{ROW_BLOCK_MAX}, "
                         f"num_warps a power of two <= 32; got {raw!r}")
    return rows, block, warps


# The launch of the one-program-a-row quantization kernels (per_token_quant_fp8, SiLU-and-mul + per-token quant)
# from min_rows rows up: (min_rows, BLOCK, num_warps), None: row_block's whole-row launch at every row count. That
# launch is the decode's (latency: a few rows); at a prefill's thousands of rows it holds one program an SM and ran
# at 43-45% of the copy rate (H100, 2026-12-05 profile, KERNEL_NOTES stop 51), where a BLOCK below the row length
# (the kernels' two-pass loop: the second read mostly from L2) lets several programs share an SM.
# tools/device/row_quant_sweep.py (H100, 2026-12-06, bit-identical codes): SiLU-and-mul + quant of 12,288 columns
# 753 -> 462 us at 16,384 rows and 212 -> 145 us at 4,096 with BLOCK 4,096 and 8 warps (the per-token quant of
# 4,096 columns keeps its launch: 4,096 / 8 is already its whole row); the engine's batch-128 FP8 run 0.99x [0.99-
# 1.00x] against it, 3 rounds (ATOM_FP8_ROW_TILE_LARGE=2048:4096:8 as the alt). Hence the default from 2,048 rows;
# ATOM_FP8_ROW_TILE_LARGE=min_rows:block:num_warps sets another per process, =off the whole-row launch everywhere.
ROW_TILE_LARGE = _env_row_tile_large()


def row_block(k: int, rows: int = 0) -> tuple[int, int]:
    """(BLOCK, num_warps) of a one-program-a-row kernel over k columns and `rows` rows: the whole row up to
    ROW_BLOCK_MAX (32 values a thread at most), else ROW_BLOCK_MAX chunks; ROW_TILE_LARGE's from its row count."""
    block = min(ROW_BLOCK_MAX, triton.next_power_of_2(max(k, 16)))
    if ROW_TILE_LARGE is not None and rows >= ROW_TILE_LARGE[0]:
        return min(block, ROW_TILE_LARGE[1]), ROW_TILE_LARGE[2]
    return block, min(16, max(4, block // 512))


def check_group_size(group_size: int | None, who: str) -> None:
    """Activation groups of the Triton FP8 kernels are 1 x a power of two (None: one scale per token)."""
    if group_size is not None and (group_size <= 0 or group_size & (group_size - 1)):
        raise ValueError(f"{who} needs a power-of-two group size, got {group_size}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@register("fp8_quant_group", "triton")
def per_token_group_quant_fp8(
    x: torch.Tensor, group_size: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] fp8, scales [..., ceil(K / group_size)] float32)."""
    check_group_size(group_size, "the Triton FP8 group quantization")
    x2 = _rows(x)
    rows, k = x2.shape
    groups = triton.cdiv(k, group_size)
    q = torch.empty(rows, k, dtype=fp8_dtype, device=x.device)
    s = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    per_prog = max(1, min(triton.next_power_of_2(groups), 2048 // group_size))
    if rows:
        _quant_group_kernel[(rows, triton.cdiv(groups, per_prog))](
            x2, q, s, k, groups, x2.stride(0), q.stride(0), s.stride(0), GROUP=group_size, GROUPS=per_prog,
            **fp8_consts(fp8_dtype), num_warps=4, **pdl_args(x.device))
    return q.view(x.shape), s.view(*x.shape[:-1], groups)


@register("fp8_quant_token", "triton")
def per_token_quant_fp8(
    x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] fp8, scales [..., 1] float32)."""
    x2 = _rows(x)
    rows, k = x2.shape
    q = torch.empty(rows, k, dtype=fp8_dtype, device=x.device)
    s = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block, warps = row_block(k, rows)
        _quant_token_kernel[(rows,)](x2, q, s, k, x2.stride(0), q.stride(0), BLOCK=block, **fp8_consts(fp8_dtype),
                                     num_warps=warps, **pdl_args(x.device))
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


# ---------------------------------------------------------------- GEMM


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, a_desc, w_desc,
    M, N, K, a_stride, as_stride, w_stride, ws_stride_n, ws_stride_k, out_stride_split, out_stride_m,
    k_per_split,
    SCALE_BN: tl.constexpr, BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PDL: tl.constexpr, PRECISE: tl.constexpr, TMA: tl.constexpr, FAST_ACC: tl.constexpr,
    WS: tl.constexpr,
):
    """out = A W^T (scaled); A fp8 with per-row or per-(row, K block) scales; W [N, K] fp8. PRECISE (float32
    outputs, the correctness mode): the codes are widened to bf16 (exactly: e4m3 fits in bf16) for a dot that
    accumulates in full float32, instead of Hopper's FP8 MMA (~14-bit accumulation between promotions).
    TMA: the A and W tiles come through tensor descriptors (a_desc [M, K] blocks [BLOCK_M, BLOCK_K], w_desc [N, K]
    blocks [BLOCK_N, BLOCK_K]; Hopper's bulk copies, zero past the edges) instead of per-thread loads.
    FAST_ACC (per-channel / per-tensor weights): the FP8 MMA accumulates all of K before the float32 promotion
    (Triton's default on sm90, CUTLASS's FP8FastAccum as vLLM runs it) instead of promoting every K step; block
    scales promote every step anyway. WS (with TMA): Triton's warp specialization of the K loop (a producer warp group
    issues the bulk copies, the others run the MMAs), as CUTLASS's sm90 kernels are built."""
    pdl_wait(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row blocks walk the same column blocks together, so W tiles are reused from L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    m64 = m.to(tl.int64)
    n64 = n.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    if not BLOCK_SCALES:  # one activation scale per row, over all of K
        sa = tl.load(as_ptr + m64 * as_stride, mask=m_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, warp_specialize=WS):
        k = k0 + kk
        k_ok = k < K
        if TMA:
            aq = a_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([pid_n * BLOCK_N, k0]).T
        else:
            aq = tl.load(a_ptr + m64[:, None] * a_stride + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + n64[None, :] * w_stride + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if BLOCK_SCALES:
            sa = tl.load(as_ptr + m64 * as_stride + k0 // BLOCK_K, mask=m_ok, other=0.0)
        if PRECISE:
            aq = aq.to(tl.bfloat16)
            w = w.to(tl.bfloat16)
        if BLOCK_SCALES:
            sw = tl.load(ws_ptr + (n64 // SCALE_BN) * ws_stride_n + (k0 // BLOCK_K) * ws_stride_k, mask=n_ok,
                         other=0.0)
            acc += tl.dot(aq, w) * (sa[:, None] * sw[None, :])
        elif PRECISE or FAST_ACC:
            acc = tl.dot(aq, w, acc)
        else:
            acc = tl.dot(aq, w, acc, max_num_imprecise_acc=BLOCK_K)
    if not BLOCK_SCALES:
        sw = tl.load(ws_ptr + n64 * ws_stride_n, mask=n_ok, other=0.0)
        acc = acc * (sa[:, None] * sw[None, :])

    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m64[:, None] * out_stride_m + n64[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + split * out_stride_split + m64[:, None] * out_stride_m + n64[None, :], acc, mask=mask)


@triton.jit
def _swap_w_tile(w_ptr, w_desc, n64, n_ok, w_stride, k, K, row0, k0, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """The swap-AB kernel's weight tile [BLOCK_N, BLOCK_K] at K offsets k (= k0 + arange), zeros past K."""
    if TMA:
        w = w_desc.load([row0, k0])
    else:
        w = tl.load(w_ptr + n64[:, None] * w_stride + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
    return w


@triton.jit
def _swap_k_step(acc, w, a_ptr, as_ptr, a_desc, ws_ptr, n64, n_ok, m64, m_ok, k0, kk, K, a_stride, as_stride,
                 ws_stride_n, ws_stride_k, pid_m, sa, ra, fp8: tl.constexpr, SCALE_BN: tl.constexpr,
                 BLOCK_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISE: tl.constexpr,
                 TMA: tl.constexpr, FAST_ACC: tl.constexpr, QUANT_A: tl.constexpr, FP8_MAX: tl.constexpr,
                 MIN_EXP: tl.constexpr, EMULATE: tl.constexpr, F32_DOT: tl.constexpr = False):
    """One K step of the swap-AB kernel on its weight tile w: the activation tile at k0 (quantized here under
    QUANT_A with the rows' scales sa and reciprocals ra), the dot, and the scales of block layouts; the new acc."""
    k = k0 + kk
    if TMA:
        a_t = a_desc.load([pid_m * BLOCK_M, k0]).T
    else:
        a_t = tl.load(a_ptr + m64[None, :] * a_stride + k[:, None], mask=(k < K)[:, None] & m_ok[None, :], other=0.0)
    if QUANT_A:
        a_t = quantize_by_reciprocal(a_t.to(tl.float32), sa[None, :], ra[None, :], fp8, FP8_MAX, MIN_EXP, EMULATE)
    if PRECISE:
        w = w.to(tl.bfloat16)
        a_t = a_t.to(tl.bfloat16)
    if F32_DOT:
        a_t = a_t.to(tl.float32)
    if BLOCK_SCALES:
        sw = tl.load(ws_ptr + (n64 // SCALE_BN) * ws_stride_n + (k0 // BLOCK_K) * ws_stride_k, mask=n_ok, other=0.0)
        sa_k = tl.load(as_ptr + m64 * as_stride + k0 // BLOCK_K, mask=m_ok, other=0.0)
        acc += tl.dot(w, a_t) * (sw[:, None] * sa_k[None, :])
    elif PRECISE or FAST_ACC:
        acc = tl.dot(w, a_t, acc)
    else:
        acc = tl.dot(w, a_t, acc, max_num_imprecise_acc=BLOCK_K)
    return acc


@triton.jit
def _fp8_gemm_swap_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, final_ptr, cnt_ptr, a_desc, w_desc,
    M, N, K, a_stride, as_stride, w_stride, ws_stride_n, ws_stride_k, out_stride_split, out_stride_m,
    k_per_split,
    SCALE_BN: tl.constexpr, BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SERIAL: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, PRECISE: tl.constexpr, TMA: tl.constexpr,
    FAST_ACC: tl.constexpr, WS: tl.constexpr, a_parts=1, QUANT_A: tl.constexpr = False, A_PARTS: tl.constexpr = 1,
    FP8_MAX: tl.constexpr = 448.0, MIN_SCALE: tl.constexpr = 1.0, MIN_EXP: tl.constexpr = -6,
    EMULATE: tl.constexpr = False, SCALED: tl.constexpr = True, F32_DOT: tl.constexpr = False,
):
    """out^T = W A^T for a few rows (swap AB): the weight tile [BLOCK_N, BLOCK_K] is the matrix instruction's
    first operand, so its 64-row side is filled by weight rows, and the BLOCK_M (16-64) activation rows are the
    narrow side (wgmma's N). Same scales at the same granularity as _fp8_gemm_kernel, per K step of one scale
    block (block layouts) or once at the end; programs over (column block, K split, row block).

    Split over K, each program stores its float32 partial (out_ptr [split, M, N]). SERIAL: the last of a tile's
    programs to arrive (an acq_rel counter per tile in cnt_ptr, zero between launches) adds the partials in split
    order, as _split_k_sum_kernel does, plus the bias, writes final_ptr and resets the counter: no second kernel.
    Without SERIAL, _split_k_sum_kernel runs after.

    PDL: launched early (pdl.py); before waiting for the previous kernel each program asks for the first PREFETCH
    bytes (0: none, a multiple of 16) of each of its weight rows' K range to be brought into L2. PRECISE: as in
    _fp8_gemm_kernel (float32 outputs: bf16 operands, full float32 accumulation). TMA: as in _fp8_gemm_kernel
    (w_desc blocks [BLOCK_N, BLOCK_K], a_desc blocks [BLOCK_M, BLOCK_K]). FAST_ACC, WS: as in _fp8_gemm_kernel.

    QUANT_A (per-token scales only): a_ptr / a_desc hold the float activations and as_ptr [M, a_parts] partial
    absolute maxima of each row (their max is the row's, as the producer found it: silu_and_mul_rowmax); the
    program takes each row's scale from them and quantizes the activation tile of every K step itself, to the
    codes the quantization kernels write (same dynamic_scale; quantize_by_reciprocal: the division's codes, up to
    the sign of zero): no quantization kernel, and no pass over the row before W streams. A_PARTS: a_parts padded
    to a power of two. Each thread quantizes its share of the padded [BLOCK_K, BLOCK_M] tile (16 values at 4 warps
    and 16 rows): a tile holding only the real row, spread by a select, was rematerialized by Triton in the
    padded tile's layout all the same (Triton 3.6, sm_90: 280 instructions a K step against 251).

    SCALED=False: 16-bit weights and activations of the same dtype (atom.ops.triton_kernels.dense, the bf16 /
    fp16 linears at decode): no scales at all (as_ptr / ws_ptr unused), the plain dot; F32_DOT: its operands in
    float32 (the interpreter, whose 16-bit tl.dot is wrong)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    n64 = n.to(tl.int64)
    m64 = m.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    if PREFETCH > 0:  # constant weights only: before the wait (K % 16 == 0, checked at launch)
        rows = tl.minimum(n64, N - 1)
        prefetch_l2(w_ptr + rows * w_stride + k_lo, tl.minimum(k_hi - k_lo, PREFETCH) + tl.zeros_like(n))
    pdl_wait(PDL)

    fp8 = w_ptr.dtype.element_ty
    if QUANT_A:
        p = tl.arange(0, A_PARTS)
        parts = tl.load(as_ptr + m64[:, None] * as_stride + p[None, :], mask=m_ok[:, None] & (p < a_parts)[None, :],
                        other=0.0)
        sa = dynamic_scale(tl.max(parts, axis=1), FP8_MAX, MIN_SCALE)  # [BLOCK_M]; padded rows: the floor
        ra = reciprocal(sa)
    elif SCALED and not BLOCK_SCALES:
        sa = tl.load(as_ptr + m64 * as_stride, mask=m_ok, other=0.0)
        ra = sa
    else:  # per K step (_swap_k_step), or none
        sa = tl.zeros([BLOCK_M], tl.float32)
        ra = sa

    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, warp_specialize=WS):
        w = _swap_w_tile(w_ptr, w_desc, n64, n_ok, w_stride, k0 + kk, K, pid_n * BLOCK_N, k0, BLOCK_N, TMA)
        if F32_DOT:
            w = w.to(tl.float32)
        acc = _swap_k_step(acc, w, a_ptr, as_ptr, a_desc, ws_ptr, n64, n_ok, m64, m_ok, k0, kk, K, a_stride,
                           as_stride, ws_stride_n, ws_stride_k, pid_m, sa, ra, fp8, SCALE_BN, BLOCK_SCALES, BLOCK_M,
                           BLOCK_K, PRECISE, TMA, FAST_ACC, QUANT_A, FP8_MAX, MIN_EXP, EMULATE, F32_DOT)
    if SCALED and not BLOCK_SCALES:
        sw = tl.load(ws_ptr + n64 * ws_stride_n, mask=n_ok, other=0.0)
        acc = acc * (sw[:, None] * sa[None, :])

    mask = n_ok[:, None] & m_ok[None, :]
    offs = m64[None, :] * out_stride_m + n64[:, None]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + split * out_stride_split + offs, acc, mask=mask)
        if SERIAL:
            tl.debug_barrier()  # every thread's partial is stored before the counter moves (release)
            tile = pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                total = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                for s in tl.static_range(SPLIT):  # L2 reads (.cg): the other programs' partials
                    total += tl.load(out_ptr + s * out_stride_split + offs, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                tl.store(final_ptr + offs, total.to(final_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _split_k_sum_kernel(part_ptr, bias_ptr, out_ptr, total, n_cols, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out = sum over splits of the float32 partials (in split order) + bias, cast to out's dtype."""
    pdl_wait(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * total + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % n_cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- GEMV (M <= GEMV_MAX_M)


@triton.jit
def _fp8_gemv_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K, a_stride, as_stride, w_stride, ws_stride_n, ws_stride_k, out_stride_split, out_stride_m,
    k_per_split,
    SCALE_BN: tl.constexpr, BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SUB_K: tl.constexpr,
    QUANT_A: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, MIN_EXP: tl.constexpr,
    EMULATE: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
):
    """out[:M] = A W^T (scaled) for a few rows, by FMA reductions over K (no tl.dot).

    Each program owns BLOCK_N output columns and one K range; a K step loads a W tile [BLOCK_N, GROUPS, SUB_K]
    (K contiguous: wide loads) as float32 and reduces it against each row's activations. With block scales SUB_K
    is the scale block's K size, so every (row, column, K block) partial sum is multiplied by its activation
    group scale and weight block scale before it is added, as the tl.dot kernel does; otherwise the two scales
    are applied once at the end. The accumulator is [BLOCK_N, M_PAD] (rows along the second axis, so a row's
    column sums join it without changing layout).

    QUANT_A: a_ptr holds the unquantized activations and the program quantizes the slices it reads, to the
    same codes and scales as the quantization kernels (1 x SUB_K groups, or one scale per row from the row's
    absolute max over all of K, computed first), so no quantization kernel runs before it. The activations are
    a few KiB read from L2 by every program; W is what streams from HBM.

    Loading the next K step's W tile into registers early was measured slower and removed (H200, 2026-12-02,
    qwen3-8b, M = 1, us with / without: gate_up 58.6-91.3 / 39.9-43.3, o 17.3-21.4 / 13.0-16.7, down 38.4-50.0 /
    26.8-39.6)."""
    pdl_wait(PDL)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    n64 = n.to(tl.int64)
    g = tl.arange(0, GROUPS)
    j = tl.arange(0, SUB_K)
    kg = g[:, None] * SUB_K + j[None, :]  # [GROUPS, SUB_K]: offsets in one K step
    rows = tl.arange(0, M_PAD)
    m_ok = rows < M
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    fp8 = w_ptr.dtype.element_ty

    if not BLOCK_SCALES:  # one activation scale per row
        if QUANT_A:
            sa_rows = tl.zeros([M_PAD], tl.float32)
            for r in tl.static_range(M_PAD):
                amax = tl.zeros([GROUPS, SUB_K], tl.float32)
                for k0 in range(0, K, GROUPS * SUB_K):
                    k = k0 + kg
                    x = tl.load(a_ptr + r * a_stride + k, mask=(k < K) & (k * 0 + r < M), other=0.0)
                    amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
                row_max = tl.max(tl.max(amax, axis=1), axis=0, keep_dims=True)  # [1]
                sa_rows = tl.where(rows == r, dynamic_scale(row_max, FP8_MAX, MIN_SCALE), sa_rows)
        else:
            sa_rows = tl.load(as_ptr + rows * as_stride, mask=m_ok, other=0.0)

    acc = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    w_rows = w_ptr + n64[:, None, None] * w_stride
    for k0 in tl.range(k_lo, k_hi, GROUPS * SUB_K, num_stages=STAGES):  # STAGES: W loads pipelined over K steps
        k = k0 + kg
        k_ok = k < K
        w = tl.load(w_rows + k[None, :, :], mask=n_ok[:, None, None] & k_ok[None, :, :], other=0.0).to(tl.float32)
        if BLOCK_SCALES:
            kb = k0 // SUB_K + g  # the K blocks of this step
            sw = tl.load(ws_ptr + (n64 // SCALE_BN)[:, None] * ws_stride_n + kb[None, :] * ws_stride_k,
                         mask=n_ok[:, None] & (kb * SUB_K < K)[None, :], other=0.0)  # [BLOCK_N, GROUPS]
        for r in tl.static_range(M_PAD):
            a = tl.load(a_ptr + r * a_stride + k, mask=k_ok & (k * 0 + r < M), other=0.0).to(tl.float32)
            if BLOCK_SCALES:
                if QUANT_A:  # this step's 1 x SUB_K groups of row r
                    sa = dynamic_scale(tl.max(tl.abs(a), axis=1), FP8_MAX, MIN_SCALE)  # [GROUPS]
                    a = quantize(a, sa[:, None], fp8, FP8_MAX, MIN_EXP, EMULATE).to(tl.float32)
                else:
                    sa = tl.load(as_ptr + r * as_stride + kb, mask=(kb * SUB_K < K) & (kb * 0 + r < M),
                                 other=0.0)
            elif QUANT_A:
                s_r = tl.max(tl.where(rows == r, sa_rows, 0.0), axis=0, keep_dims=True)  # [1]; scales are > 0
                a = quantize(a, s_r[:, None], fp8, FP8_MAX, MIN_EXP, EMULATE).to(tl.float32)
            part = tl.sum(w * a[None, :, :], axis=2)  # [BLOCK_N, GROUPS]
            if BLOCK_SCALES:
                part = part * (sa[None, :] * sw)
            acc += tl.where(rows[None, :] == r, tl.sum(part, axis=1)[:, None], 0.0)
    if not BLOCK_SCALES:
        sw_cols = tl.load(ws_ptr + n64 * ws_stride_n, mask=n_ok, other=0.0)
        acc = acc * (sw_cols[:, None] * sa_rows[None, :])

    mask = n_ok[:, None] & m_ok[None, :]
    offs = rows.to(tl.int64)[None, :] * out_stride_m + n64[:, None]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + split * out_stride_split + offs, acc, mask=mask)


def _env_rows(name: str, default: int, most: int) -> int:
    return env_int(name, default, most, "rows")


def _env_gemv_max_m() -> int:
    return _env_rows("ATOM_FP8_GEMV_MAX_M", 0, 16)


# Rows up to which fp8_linear runs the GEMV instead of the tl.dot GEMM: 0 (off) since the swap-AB kernel (SWAP_MAX_M)
# beat it on codes a producer made (fp8_skinny_bench.py, H200, 2026-12-02 19:2x UTC, M = 1, us: per-channel qkv
# 12.6 / o 9.7 / gate_up 32.0 / down 19.9 against ~110 a layer for the four GEMVs with their quantization; block
# layouts 13.0 / 9.9 / 32.1 / 20.8 against the self-quantizing GEMV's 12.8 / 9.5 / 36.5 / 22.6). Before that, 1:
# on the H200 (2026-12-02, kernel_bench.py --fp8-only, CUDA-graph replay, the quantization included in both)
# the GEMV with the tiles below beat the tl.dot
# path at M = 1 on all four 8b shapes (qkv 16.9 against 19.8 us, o 13.1 / 16.2, gate_up 40.1 / 40.6, down 26.7 /
# 28.1) and lost at M = 2 and 4 (each row re-reads W tiles from L1/L2 and the FMA work grows with M, while the
# tl.dot tile of 16 rows costs the same). ATOM_FP8_GEMV_MAX_M overrides it per process (0: the tl.dot GEMM at
# every M; the engine benchmarks use it to compare the two paths end to end).
GEMV_MAX_M = _env_gemv_max_m()
GEMV_MAX_M_CANDIDATE = 4  # the most rows the GEMV is tested and benchmarked at (kernel_bench.py, the tests)
# The GEMV quantizes its activations itself (QUANT_A: no quantization kernel before it); False runs the
# quantization kernel first and the GEMV reads FP8 activations (kernel_bench.py compares the two).
GEMV_FUSED_QUANT = True
# ... for per-token activations (per-channel / per-tensor weights) too. Off: measured on the H200 (2026-12-02,
# kernel_bench.py --fp8-only, M = 1, us): every program must read the whole row for its amax before it streams
# W, and the per-token GEMV quantizing itself lost to the quantization kernel + GEMV on o / gate_up / down
# (18.1 / 46.0 / 38.4 against 16.1 / 43.2 / 32.3; qkv 17.8 against 18.7); 1 x 128 groups (block layouts) are
# quantized step by step and keep the fused form (o 13.1 against 14.7).
GEMV_FUSED_QUANT_PER_TOKEN = False
# Tile override for kernel_bench.py sweeps: any of block_n, block_k, num_warps, split_k, num_stages (the rest as
# chosen below; split_k derived from the overridden tile unless given).
GEMV_TILE_OVERRIDE: dict | None = None


def _pow2_split(want: int, most: int) -> int:
    """The largest power of two <= want, <= most (K steps allow) and <= 8: how many K ranges a GEMM splits into."""
    split = 1
    while split * 2 <= min(want, most, 8):
        split *= 2
    return split


def _gemv_tile(n: int, k: int, sub_k: int, device: torch.device) -> dict:
    """16 columns per program and long K steps, no split-K, from the H200 sweeps (kernel_bench.py --fp8-only,
    2026-12-02, M = 1, the GEMV quantizing its own activations; us per call under CUDA-graph replay):
    - the GEMV streams W with no software pipelining, so the bytes one K step puts in flight decide the rate:
      [16, 2048] steps at 8 warps (32 KiB) won where a program has a long K and there are few programs
      (N / 16 <= 2 per SM: o 13.1 us, down 26.7, against 16.4 / 39.2 with [16, 512] at 4 warps);
      [16, 1024] at 4 warps where there are more programs (qkv 16.9, gate_up 40.1 against 18.2 / 40.9);
    - 8 or 4 columns a program lost everywhere (more programs, each streaming less), 32 and 64 lost except on
      gate_up (tie), and split-K (a second kernel plus a float32 round trip of the partials) never paid
      for these shapes; it stays the fallback when N / 16 is under one program per SM.
    block_k is a multiple of the scale block (sub_k), so every K step holds whole scale blocks."""
    tile = dict(GEMV_TILE_OVERRIDE or {})
    sms = num_sms(device)
    tile.setdefault("block_n", 16)
    programs = triton.cdiv(n, tile["block_n"])
    long_k = 2048 if programs <= 2 * sms else 1024
    block_k = tile.setdefault("block_k", max(sub_k, min(long_k, triton.next_power_of_2(k))))
    if block_k % sub_k or block_k & (block_k - 1):
        raise ValueError(f"GEMV block_k {block_k} must be a power of two and a multiple of {sub_k}")
    tile.setdefault("num_warps", 8 if tile["block_n"] * block_k >= 32768 else 4)
    # None: the loop as measured (Triton's own choice: a jitted `range` is tl.range(num_stages=None)); 2 and 3
    # (W loads software-pipelined over K steps) were 2-4x slower on all four 8b shapes (H200, 2026-12-02: o M1
    # 32-38 us against 12.9, gate_up 126-194 against 39.9), so they stay a GEMV_TILE_OVERRIDE key only
    tile.setdefault("num_stages", None)
    if "split_k" not in tile:
        tile["split_k"] = _pow2_split(triton.cdiv(sms, programs), triton.cdiv(k, block_k) // 2)
    return tile


def _launch_split(launch, m: int, n: int, k: int, step: int, split: int, bias, out,
                  reduces_itself: bool = False, parts: list | None = None) -> None:
    """`launch(target, k_per_split, split, add_bias)` over `split` K ranges (multiples of `step`): straight into
    out, or into float32 partials that _split_k_sum_kernel adds in split order (plus bias), unless the kernel
    `reduces_itself` (then it adds the bias too). parts (a list, without a bias): where the call splits, the
    partials [split, M, N] are appended to it and not added (out is left unwritten): the consumer adds them
    (atom.layers.fp8_input.SplitKPartials: the norms' kernels, the attention kernel's decode prep, or
    add_split_parts)."""
    k_per_split = triton.cdiv(triton.cdiv(k, split), step) * step
    split = triton.cdiv(k, k_per_split)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=out.device)
    has_bias = bias is not None
    if split > 1 and reduces_itself:
        launch(target, k_per_split, split, has_bias)
        return
    if split > 1 and parts is not None and not has_bias:
        launch(target, k_per_split, split, False)
        parts.append(target)
        return
    launch(target, k_per_split, split, has_bias and split == 1)
    if split > 1:
        add_split_parts(target, out, bias)


def add_split_parts(parts: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """out [M, N] (contiguous) = the float32 partials parts [S, M, N] added in split order (+ bias), in out's dtype."""
    total = out.numel()
    block = 1024
    _split_k_sum_kernel[(triton.cdiv(total, block),)](parts, bias if bias is not None else out, out, total,
                                                      out.shape[-1], SPLIT=parts.shape[0], HAS_BIAS=bias is not None,
                                                      BLOCK=block, num_warps=4, **pdl_args(out.device))


# Tile override for tools/device/kernel_bench.py sweeps: dict(block_m, block_n, num_warps, num_stages, split_k
# (absent: the rule below), tma, fast_acc (per-channel / per-tensor: no float32 promotion inside K; absent: TMA /
# FAST_ACC below), block_k (per-channel / per-tensor weights only: the K step, 128 by default; _k_step)).
GEMM_TILE_OVERRIDE: dict | None = None

_TILE_KEYS = {"block_m", "block_n", "block_k", "num_warps", "num_stages", "split_k", "tma", "fast_acc", "ws"}
# the FP8 experts' grouped GEMM (moe_fp8._gemm_tile): "down" holds the down projection's own keys (not block_m)
_MOE_TILE_KEYS = {"block_m", "block_n", "block_k", "num_warps", "num_stages", "n_major", "down"}


def _k_step(tile: dict, block_k: int, block_scales: bool) -> int:
    """A GEMM tile's K step: the scale block's where the weights have block scales (a K step holds one block), else
    the tile's block_k if it names one (a sweep key: per-channel / per-tensor weights have no K blocks; a power of
    two >= 32), else 128."""
    bk = tile.get("block_k")
    if bk is None or block_scales:
        return block_k
    if not isinstance(bk, int) or bk < 32 or bk & (bk - 1):
        raise ValueError(f"an FP8 GEMM tile's block_k must be a power of two >= 32, got {bk!r}")
    return bk


def _parse_tiles(raw: str, name: str = "ATOM_FP8_TILES") -> dict:
    """The FP8 GEMMs' tile rules: JSON (or '@path' to a JSON file), {"dot": [[max_m, tile], ...], "swap": [[max_m,
    tile], ...], "scaled_mm_min_m": rows, "moe": [[max_pairs_per_expert, tile], ...]}, every key optional; a tile
    takes the keys of GEMM_TILE_OVERRIDE (swap: block_m is the padded activation rows). The first entry whose max_m
    >= M applies; split_k absent: the built-in split rule. "moe": the FP8 experts' grouped GEMM by (token, expert)
    pairs per expert, its keys over the built-in tile's (moe_fp8.GEMM_TILE_OVERRIDE's keys). tools/device/fp8_tiles.py
    writes the dense rules from a sweep on the GPU at hand."""
    import json

    text = raw.strip()
    if not text:
        return {}
    try:
        if text.startswith("@"):
            with open(text[1:]) as f:
                text = f.read()
        rules = json.loads(text)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: cannot read the FP8 tile rules: {e}") from None
    if not isinstance(rules, dict) or set(rules) - {"dot", "swap", "scaled_mm_min_m", "moe"}:
        raise ValueError(f"{name} must be a JSON object with keys dot, swap, scaled_mm_min_m, moe; got {raw[:200]!r}")
    for kind, keys in (("dot", _TILE_KEYS), ("swap", _TILE_KEYS), ("moe", _MOE_TILE_KEYS)):
        for entry in rules.get(kind, []):
            ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                  and isinstance(entry[1], dict) and not set(entry[1]) - keys
                  and (kind != "moe" or not set(entry[1].get("down", {})) - (keys - {"block_m", "down"})))
            if not ok:
                bound = "max_pairs_per_expert" if kind == "moe" else "max_m"
                raise ValueError(f"{name}: each {kind} entry must be [{bound}, {{tile}}] with keys from "
                                 f"{sorted(keys)}, got {entry!r}")
    if not isinstance(rules.get("scaled_mm_min_m", 0), int):
        raise ValueError(f"{name}: scaled_mm_min_m must be an integer")
    return rules


def _rule_tile(kind: str, m: int) -> dict | None:
    for max_m, tile in TILE_RULES.get(kind, []):
        if m <= max_m:
            return dict(tile)
    return None


# The measured tile rules of this process (ATOM_FP8_TILES; empty: the built-in tables below).
TILE_RULES = _parse_tiles(os.environ.get("ATOM_FP8_TILES", ""))


def _env_tma() -> bool | None:
    return None if not os.environ.get("ATOM_FP8_TMA", "").strip() else _env_flag("ATOM_FP8_TMA", False)


# Load the FP8 GEMMs' A and W tiles through tensor descriptors (Hopper's TMA bulk copies) or per-thread pointers.
# None: the built-in choice (the swap-AB kernel from 2 rows, the tl.dot GEMM's 65-128-row tile); ATOM_FP8_TMA=0 / 1
# forces it off / on wherever a tile (rule, override) does not say. Measured on an H100 (2026-12-05,
# tools/device/fp8_tiles.py, qwen3-8b linears on a producer's codes, weights rotated past L2, us a layer of four):
# bit-identical outputs, and at most 1-3% either way a kernel (M = 1: 93.0 against 92.6 with fast accumulation, M = 32:
# 94.8 against 95.3; M = 128 at [64, 64]: 113.1 against 115.4).
TMA = _env_tma()
# FP8 MMAs of per-channel / per-tensor weights accumulate all of K before the float32 promotion (fast_acc), as
# CUTLASS's FP8FastAccum kernels vLLM runs do, instead of promoting every 128-wide K step (block scales promote
# every step regardless; float32 outputs take bf16 operands and float32 sums). Same H100 sweep: 1-2% a kernel; in the
# engine the measured tiles (TMA + fast accumulation, [64, 64] at 128 rows) were 1.02x at batch 32 and 128 in every
# one of 3 rounds. The error stays inside the bf16 bound of the reference on the 8b shapes (test_fp8_linear_large_tma).
# ATOM_FP8_FAST_ACC=0 promotes every K step again.
FAST_ACC = _env_flag("ATOM_FP8_FAST_ACC", True)


@functools.cache
def _tma_device(device: torch.device) -> bool:
    if interpreting():
        return True
    return (device.type == "cuda" and not torch.version.hip
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _descriptors(a: torch.Tensor, weight: torch.Tensor, a_rows: int, w_rows: int, block_k: int):
    """Tensor descriptors of A [M, K] (blocks [a_rows, block_k]) and W [N, K] (blocks [w_rows, block_k]), or
    None where TMA cannot carry them (device, unit inner stride, 16-byte aligned bases and row strides)."""
    if not _tma_device(a.device):
        return None
    for t in (a, weight):
        if (t.dim() != 2 or t.stride(1) != 1 or t.stride(0) * t.element_size() % 16
                or (t.data_ptr() % 16 and not interpreting())):
            return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (TensorDescriptor(a, list(a.shape), [a.stride(0), 1], [a_rows, block_k]),
            TensorDescriptor(weight, list(weight.shape), [weight.stride(0), 1], [w_rows, block_k]))


def _gemm_tile(m: int, n: int, k: int, block_k: int, device: torch.device, block_scales: bool = False) -> dict:
    tile = dict(GEMM_TILE_OVERRIDE) if GEMM_TILE_OVERRIDE is not None else _rule_tile("dot", m)
    if tile is None:
        tile = _gemm_table_tile(m)
        if TMA is not None:
            tile["tma"] = TMA
    tile.setdefault("tma", bool(TMA))
    tile.setdefault("fast_acc", FAST_ACC)
    tile["block_k"] = block_k = _k_step(tile, block_k, block_scales)
    if "split_k" not in tile:
        # weight-bandwidth bound shapes: split K until about two programs per SM stream weights, keeping
        # at least four K steps per split
        programs = triton.cdiv(m, tile["block_m"]) * triton.cdiv(n, tile["block_n"])
        tile["split_k"] = _pow2_split(triton.cdiv(2 * num_sms(device), programs), triton.cdiv(k, block_k) // 4)
    return tile


def _gemm_table_tile(m: int) -> dict:
    if m <= 16:
        return dict(block_m=16, block_n=64, num_warps=4, num_stages=4, tma=False)
    if m <= 32:
        return dict(block_m=32, block_n=64, num_warps=4, num_stages=4, tma=False)
    if m <= 64:
        return dict(block_m=64, block_n=64, num_warps=4, num_stages=4, tma=False)
    if m <= 128:
        # H100, 2026-12-05 (fp8_tiles.py, per-channel, M = 128, us a layer of the four 8b linears): [64, 64], 4 warps,
        # 5 stages, TMA, fast accumulation 113.1 against 117.6 for torch._scaled_mm and 122.1 for the old [128, 64] at
        # 8 warps; [128, 128] and 64 x 256 lost (150-175). Hence SCALED_MM_MIN_M = 129.
        return dict(block_m=64, block_n=64, num_warps=4, num_stages=5, tma=True)
    return dict(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=False)


def _env_swap_max_m() -> int:
    return _env_rows("ATOM_FP8_SWAP_MAX_M", 32, 64)


# Rows up to which fp8_gemm_quantized runs the swap-AB kernel (weights on the matrix instruction's wide side)
# instead of the tl.dot GEMM whose 16-64-row activation tile is the wide side: 32. On the H200 (2026-12-02,
# tools/device/fp8_skinny_bench.py, qwen3-8b shapes, weights rotated past L2, codes from a producer) it beat the
# tl.dot GEMM at M = 1-32 on every shape and layout (gate_up M1 per-channel 32.0 against 36.7 us, down 19.9 / 28.6
# with the quantization kernel in the dot row: 23-30% of that is the kernel) and lost at M = 64 (gate_up 50.5
# against 38.7: a 64-row activation tile). Engine, qwen3-8b FP8, one round: batch 1 3.94 -> 3.82 ms a step, batch
# 32 4.88 -> 4.60. ATOM_FP8_SWAP_MAX_M sets it per process (0: off).
SWAP_MAX_M = _env_swap_max_m()
# Tile override for sweeps: any of block_m, block_n, block_k (per-channel / per-tensor), num_warps, num_stages, split_k.
SWAP_TILE_OVERRIDE: dict | None = None


def _env_rowmax_max_m() -> int:
    return _env_rows("ATOM_FP8_ROWMAX_MAX_M", 32, 64)


# Rows up to which SiLU-and-mul (silu_and_mul_rowmax: each 1,024 columns' maximum) and ATOM's attention (each head's)
# hand a per-token FP8 linear (per-channel / per-tensor weights: down_proj, o_proj) their float output with its row
# maxima, and the swap-AB kernel quantizes the activations itself (QUANT_A) instead of a quantizing kernel walking
# each row in one program: 32. On the H100 (2026-12-06, fp8_skinny_bench.py --rowmax, qwen3-8b's down_proj with its
# producer, us a call) 30.3 -> 27.8 at 1 row, 31.1 -> 29.1 at 8, 31.4 -> 29.2 at 16, 31.9 -> 30.2 at 32; in the engine
# (qwen3-8b FP8, FP8 KV, 3 interleaved rounds) 4.06 -> 3.88 ms a step at batch 1 and 4.82 -> 4.69 at batch 32 in
# every round, batch 128 unchanged (not on this path). ATOM_FP8_ROWMAX_MAX_M sets it per process (0: off).
ROWMAX_MAX_M = _env_rowmax_max_m()


def gemm_quantizes_rows(m: int, weight: torch.Tensor, block_size: list[int] | None, out_dtype: torch.dtype) -> bool:
    """Whether an M-row per-token FP8 linear takes float activations and their rows' partial maxima (the swap-AB
    kernel with QUANT_A: where fp8_gemm_quantized would run the swap kernel, up to ROWMAX_MAX_M rows)."""
    return (block_size is None and GEMV_MAX_M < m <= min(ROWMAX_MAX_M, SWAP_MAX_M)
            and not scaled_mm_applies(m, weight, block_size, out_dtype))


# Split-K in the swap-AB kernel: the last program of a tile adds the partials (SERIAL) instead of a second kernel
# (_split_k_sum_kernel: 3 of the 4 linears a layer split at decode). Off: on the H200 (2026-12-03,
# fp8_skinny_bench.py, qwen3-8b linears) it was slower than the second kernel in every row (o M32 13.0 against 10.5
# us; with PDL 11.7 against 9.1): the last program's partial reads sit on the critical path, while under PDL the
# sum kernel overlaps the GEMM's tail. ATOM_FP8_SWAP_SERIAL_SPLIT=1 turns it on; bit-identical either way (same
# order); kept for GPUs without PDL.
SWAP_SERIAL_SPLIT = _env_flag("ATOM_FP8_SWAP_SERIAL_SPLIT", False)

# The other way to drop the second kernel: a linear whose output feeds a residual RMSNorm alone (o_proj, a dense
# MLP's down_proj; decoder.py) hands the norm its float32 partials and the norm's kernel adds them in split order
# (atom.layers.fp8_input's SplitKPartials: bit-identical; the partials' 16 KB a split per row read by the norm's
# one program instead of 8 KB of bf16). Nothing is added ahead of the GEMM's K loop (stop 54's lesson) and the
# norm stays one program a row under PDL. On by default since stop 56's A/B on an H100 (three interleaved rounds,
# qwen3-8b FP8 + FP8 KV, with the qkv hand-off below: batch 1 3.66 -> 3.61 ms a step, 32 4.41 -> 4.34, 128
# 6.41 -> 6.30 in every round; qwen3-30b-a3b 2.91 -> 2.87 at batch 1, equal at 32 / 128; BENCHMARKS.md).
NORM_SUMS_SPLITS = _env_flag("ATOM_FP8_NORM_SUMS_SPLITS", True)
# The same for qkv_proj, whose partials ATOM's attention kernel adds on the decode steps it does the prep of (qk-norm,
# rope, KV write: the third split GEMM of a qwen3-8b layer at batch 1). On by default since the same A/B.
ATTN_SUMS_SPLITS = _env_flag("ATOM_FP8_ATTN_SUMS_SPLITS", True)
# The same for a dense MLP's gate_up_proj, whose partials the gated activation's kernel adds (atom.layers.activation;
# the bf16 / float form and the FP8 rowmax form; the FP8 codes form still sums first): where gate_up splits at
# decode (qwen3-0.6b: 8 K steps, split 2) the sum kernel was one launch a layer more.
# On by default since stop 64's A/B (H100, qwen3-0.6b bf16, 3 interleaved rounds: batch 1 1.052 -> 1.037 ms a step,
# batch 32 1.473 -> 1.459, every round; qwen3-8b's gate_up does not split: 384 programs).
ACT_SUMS_SPLITS = _env_flag("ATOM_FP8_ACT_SUMS_SPLITS", True)


def consumer_sums_splits(consumer: str) -> bool:
    """Whether a consumer of this kind ("norm", "attention", "activation") adds a split-K GEMM's partials itself
    now (its switch above); the linear methods' defers_split asks here."""
    return {"norm": NORM_SUMS_SPLITS, "attention": ATTN_SUMS_SPLITS, "activation": ACT_SUMS_SPLITS}[consumer]


SPLIT_COUNTERS = 1 << 16  # tiles (column blocks x row blocks) one call may have; more: the second kernel


def _split_counters(device: torch.device) -> torch.Tensor | None:
    """The zeroed per-tile arrival counters of serial split-K on `device` (the kernel leaves them zeroed), made
    once, never inside a CUDA-graph capture (None there until made outside). One stream at a time: ATOM launches
    its GEMMs on one."""
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[device] = torch.zeros(SPLIT_COUNTERS, dtype=torch.int32, device=device)
    return counters


_COUNTERS: dict[torch.device, torch.Tensor] = {}


# Bytes of each weight row's K range a swap-AB program asks into L2 (cp.async.bulk.prefetch) before its PDL wait
# (pdl.py). 0: none. On the H200 (2026-12-03, fp8_skinny_bench.py --pdl, qwen3-8b linears at M = 1 / 32, consecutive
# calls in one graph) PDL alone took o_proj 9.75 -> 8.49 us and down 19.75 -> 18.68 at M = 1; prefetching 256 bytes a
# row changed nothing, 1,024 undid the gain and 4,096 cost 20-45% (gate_up 31.7 -> 46.9 us): the early programs'
# prefetches compete with the running kernel's own stream and are fetched again when the L2 set is full.
# In the engine, where every decode GEMM follows a latency-bound kernel (norm, split merge, SiLU-and-mul) and HBM
# idles meanwhile, 1,024 bytes lost too (H200, 2026-12-06, qwen3-8b FP8 + FP8 KV, 3 rounds: batch 1 2.91 -> 3.09 ms
# a step with the merge also launching o_proj's programs before its own wait, so that o_proj prefetched during the
# attention; 3.13 without that, one round; batch 32 3.56 -> 3.64). ATOM_FP8_PDL_PREFETCH sets it per process.
PDL_PREFETCH_BYTES = env_int("ATOM_FP8_PDL_PREFETCH", 0, 1 << 20, "bytes") // 16 * 16


# The swap-AB tile of per-channel / per-tensor weights (no K blocks), where no override or rule names one: K steps
# of 256 in 3 stages. fp8_tiles.py (H100, 2026-12-06, qwen3-8b's four linears, per channel): 90.2 -> 88.4 us a
# layer at 1 row, 92.6 -> 90.9 at 32, the best of 33 tiles at both; the engine with them (3 rounds, FP8 + FP8 KV):
# batch 1 3.73 -> 3.71 ms a step in every round, batch 32 4.45 -> 4.40 (0.98-1.01x by tok/s). Block-scaled
# weights keep their scale block's K step and 5 stages.
SWAP_CHANNEL_TILE = {"block_k": 256, "num_stages": 3}


def _swap_tile(m: int, n: int, k: int, block_k: int, device: torch.device, block_scales: bool = False,
               base: dict | None = None) -> dict:
    """[block_n weight rows, block_m activation rows] tiles: 64 weight rows at 4 warps (one wgmma M), the rows
    padded to a power of two >= 16, K steps of 128 (or a tile's block_k, _k_step; SWAP_CHANNEL_TILE's 256 for
    weights without K blocks, or `base`'s: the 16-bit weights' tile); split K until about two programs per SM
    stream weights (>= 4 K steps each)."""
    if base is not None:
        tile = dict(base)
    else:
        tile = dict(SWAP_TILE_OVERRIDE) if SWAP_TILE_OVERRIDE is not None else (_rule_tile("swap", m) or None)
    if tile is None:
        tile = {} if block_scales else dict(SWAP_CHANNEL_TILE)
    tile["block_k"] = block_k = _k_step(tile, block_k, block_scales)
    tile.setdefault("tma", TMA if TMA is not None else m > 1)
    tile.setdefault("fast_acc", FAST_ACC)
    tile.setdefault("block_m", max(16, triton.next_power_of_2(m)))
    tile.setdefault("block_n", 64)
    tile.setdefault("num_warps", 4)
    tile.setdefault("num_stages", 5)
    if "split_k" not in tile:
        programs = triton.cdiv(m, tile["block_m"]) * triton.cdiv(n, tile["block_n"])
        tile["split_k"] = _pow2_split(triton.cdiv(2 * num_sms(device), programs), triton.cdiv(k, block_k) // 4)
    return tile


def _scale_layout(weight_scale: torch.Tensor, block_size: list[int] | None) -> tuple[int, int, int, int]:
    """(scale_bn, block_k, ws_stride_n, ws_stride_k) of a weight scale: per [bn, bk] block, or per channel /
    per tensor (stride 0) with K steps of 128."""
    if block_size is not None:
        scale_bn, block_k = int(block_size[0]), int(block_size[1])
        if block_k < 32 or block_k & (block_k - 1):
            raise ValueError(f"the Triton FP8 GEMM needs block_k to be a power of two >= 32, got {block_k}")
        return scale_bn, block_k, weight_scale.stride(0), weight_scale.stride(1)
    return 1, 128, 0 if weight_scale.numel() == 1 else weight_scale.stride(0), 0


def _env_scaled_mm() -> bool:
    return _env_flag("ATOM_FP8_SCALED_MM", True)


# Per-token x per-channel (or per-tensor) FP8 GEMMs of SCALED_MM_MIN_M rows or more run torch._scaled_mm's
# rowwise-scaled kernel (CUTLASS on sm90) instead of the tl.dot GEMM where it applies (CUDA, compute capability
# >= 9.0, bf16 output, N and K multiples of 16). ATOM_FP8_SCALED_MM=0 keeps the tl.dot GEMM (engine A/B,
# kernel_bench.py).
# Block-scaled weights always run the tl.dot GEMM.
SCALED_MM = _env_scaled_mm()
# ... from this many rows up. On the H200 (2026-12-02, kernel_bench.py --fp8-only, 8b shapes, per-channel, us
# a call with the quantization kernel) torch._scaled_mm lost to the tl.dot GEMM at M = 1-64 (o M16 21.9 against
# 18.3, down M64 46.6 / 36.0, gate_up M32 53.6 / 43.4), tied at M = 128 (the four GEMMs 139.3 against 139.9 us)
# and won at M = 1024 by 1.4-2x (gate_up 188 against 271, o 38 against 75): prefill. In the engine (8b FP8,
# bench_vs_vllm.sh, 3 rounds) scaled_mm at every M > 1 made batch 32 0.86x and batch 128 1.11x of tl.dot.
# 129 since 2026-12-05: at 128 rows the tl.dot GEMM's [64, 64] TMA tile beat it by 4% (_gemm_table_tile).
SCALED_MM_MIN_M = TILE_RULES.get("scaled_mm_min_m", 129)


# torch._scaled_mm's FP8 MMAs accumulate all of K before the float32 promotion (use_fast_accum), as ATOM's own FP8
# GEMMs do for these layouts (FAST_ACC) and vLLM's CUTLASS kernels do; torch's default promotes every few K steps.
# These are the prefill GEMMs (SCALED_MM_MIN_M rows and more: batch 128's 16,384-token prefill is 253 ms of its
# 1,069 ms run on the H100, 2026-12-06). ATOM_FP8_SCALED_MM_FAST_ACC=0 turns it off; a device whose torch refuses
# the flag with rowwise scales (probed once, _scaled_mm_fast_acc) runs without it.
SCALED_MM_FAST_ACC = _env_flag("ATOM_FP8_SCALED_MM_FAST_ACC", True)
_FAST_ACC_PROBED: dict[torch.device, bool] = {}


def _scaled_mm_fast_acc(device: torch.device) -> bool:
    """Whether rowwise torch._scaled_mm calls on `device` pass use_fast_accum=True: SCALED_MM_FAST_ACC, and a tiny
    call with it succeeded here once (probed outside any CUDA-graph capture; inside one, before the probe ran,
    False)."""
    if not SCALED_MM_FAST_ACC:
        return False
    ok = _FAST_ACC_PROBED.get(device)
    if ok is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        a = torch.zeros(16, 32, dtype=torch.float8_e4m3fn, device=device)
        ones = torch.ones(16, 1, dtype=torch.float32, device=device)
        try:
            torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.reshape(1, 16), out_dtype=torch.bfloat16,
                             use_fast_accum=True)
            ok = True
        except (RuntimeError, NotImplementedError, TypeError) as e:
            logging.getLogger(__name__).warning("torch._scaled_mm refuses use_fast_accum with rowwise scales on %s "
                                                "(%s: %s); its FP8 GEMMs promote every few K steps", device,
                                                type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            ok = False
        _FAST_ACC_PROBED[device] = ok
    return ok


@functools.cache
def _rowwise_scaled_mm_device(device: torch.device) -> bool:
    return (device.type == "cuda" and not interpreting() and not torch.version.hip
            and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (9, 0))


def scaled_mm_applies(m: int, weight: torch.Tensor, block_size, out_dtype: torch.dtype) -> bool:
    """Whether fp8_gemm_quantized hands an M-row GEMM on this weight (activations quantized to its dtype) to
    torch._scaled_mm (see SCALED_MM, SCALED_MM_MIN_M)."""
    n, k = weight.shape
    return (SCALED_MM and m >= SCALED_MM_MIN_M and block_size is None and out_dtype == torch.bfloat16
            and n % 16 == 0 and k % 16 == 0 and weight.dtype == torch.float8_e4m3fn
            and _rowwise_scaled_mm_device(weight.device))


def rowwise_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(a * a_scale) (W * w_scale)^T + bias through torch._scaled_mm's rowwise scaling: a [M, K] fp8 with
    float32 scales [M, 1] (per token), W [N, K] fp8 with a per-channel [N] / [N, 1] or per-tensor scale."""
    n = weight.shape[0]
    scale_b = weight_scale.to(torch.float32).reshape(1, -1)
    if scale_b.shape[1] != n:  # per tensor: one column scale each
        scale_b = scale_b.expand(1, n).contiguous()
    scale_a = a_scale.to(torch.float32).reshape(-1, 1)
    out = torch._scaled_mm(a, weight.t(), scale_a=scale_a, scale_b=scale_b.contiguous(), out_dtype=out_dtype,
                           use_fast_accum=_scaled_mm_fast_acc(a.device))
    if bias is not None:
        out += bias
    return out


def _swap_gemm(a: torch.Tensor, a_scale: torch.Tensor | None, weight: torch.Tensor, weight_scale: torch.Tensor | None,
               bias: torch.Tensor | None, block_size: list[int] | None, out_dtype: torch.dtype, precise: bool,
               quant_a: bool = False, parts: list | None = None, dense_tile: dict | None = None) -> torch.Tensor:
    """The swap-AB kernel with split-K over M = a.shape[0] rows, on FP8 codes + scales, or (quant_a, per-token
    layouts) on float activations and their rows' partial absolute maxima [M, parts], quantized in the kernel;
    or (weight_scale None: atom.ops.triton_kernels.dense, whose tile `dense_tile` is) on 16-bit weights and
    activations of one dtype, no scales."""
    n, k = weight.shape
    m = a.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    scaled = weight_scale is not None
    scale_bn, block_k, ws_stride_n, ws_stride_k = _scale_layout(weight_scale, block_size) if scaled else (1, 128, 0, 0)
    tile = _swap_tile(m, n, k, block_k, a.device, block_size is not None, None if scaled else dense_tile)
    block_k = tile["block_k"]
    # per stage: the activation and weight tiles (and their bf16 copies when precise)
    a_bytes, w_bytes = a.element_size(), weight.element_size()
    block_n, stages = fit_tile(
        tile["num_stages"], tile["block_n"],
        lambda bn: ((tile["block_m"] * a_bytes + bn * w_bytes) * block_k * (3 if precise else 1), 0), a.device)

    grid_nm = (triton.cdiv(n, block_n), triton.cdiv(m, tile["block_m"]))
    descs = _descriptors(a, weight, tile["block_m"], block_n, block_k) if tile["tma"] else None
    counters = _split_counters(a.device) if SWAP_SERIAL_SPLIT else None
    serial = counters is not None and grid_nm[0] * grid_nm[1] <= counters.numel()
    pdl = pdl_args(a.device)
    prefetch = PDL_PREFETCH_BYTES if pdl["PDL"] and k % 16 == 0 and scaled else 0
    quant = {}
    if quant_a:
        if block_size is not None:
            raise ValueError("the swap-AB kernel quantizes per-token activations only (block layouts: 1 x bk groups "
                             "come from the producer)")
        quant = dict(a_parts=a_scale.shape[1], QUANT_A=True, A_PARTS=triton.next_power_of_2(a_scale.shape[1]),
                     **fp8_consts(weight.dtype))

    if not scaled:
        a_scale, weight_scale = a, weight  # unused pointers
        quant = dict(SCALED=False, F32_DOT=interpreting())

    def swap(target, k_per_split, split, add_bias):
        _fp8_gemm_swap_kernel[(grid_nm[0], split, grid_nm[1])](
            a, a_scale, weight, weight_scale, bias if add_bias else out, target, out,
            counters if serial else out, *(descs or (a, weight)), m, n, k,
            a.stride(0), a_scale.stride(0) if scaled else 0, weight.stride(0), ws_stride_n, ws_stride_k, m * n, n,
            k_per_split, SCALE_BN=scale_bn, BLOCK_SCALES=block_size is not None, HAS_BIAS=add_bias, SPLIT=split,
            BLOCK_M=tile["block_m"], BLOCK_N=block_n, BLOCK_K=block_k, SERIAL=serial and split > 1,
            PREFETCH=prefetch, PRECISE=precise, TMA=descs is not None, FAST_ACC=tile["fast_acc"] or not scaled,
            WS=tile.get("ws", False) and descs is not None,
            num_warps=tile["num_warps"], num_stages=stages, **quant, **pdl)

    _launch_split(swap, m, n, k, block_k, tile["split_k"], bias, out, reduces_itself=serial, parts=parts)
    return out


def fp8_gemm_quantized(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None, block_size: list[int] | None, out_dtype: torch.dtype,
                       parts: list | None = None) -> torch.Tensor:
    """out [M, N] in out_dtype = the FP8 GEMM on activations already quantized (a [M, K] fp8, a_scale [M, 1]
    per token or [M, K / bk] per group): the GEMV up to GEMV_MAX_M rows, torch._scaled_mm where
    scaled_mm_applies, else the tl.dot GEMM with split-K. fp8_linear (wherever it runs a quantization kernel,
    gemv_quantizes_input) and fp8_linear_quantized (the fused producers) both end here, so their outputs are
    equal. parts: as _launch_split's (the partials of a call that splits are appended, out left unwritten)."""
    n, k = weight.shape
    m = a.shape[0]
    if 0 < m <= GEMV_MAX_M:
        return _gemv(a, a_scale, weight, weight_scale, bias, block_size, out_dtype, quant_a=False, parts=parts)
    if m and a.dtype == weight.dtype and scaled_mm_applies(m, weight, block_size, out_dtype):
        return rowwise_scaled_mm(a, a_scale, weight, weight_scale, bias, out_dtype)
    # float32 outputs are the correctness mode (held to float32 references): exact products, float32 sums
    precise = out_dtype == torch.float32 and a.is_cuda and not interpreting()
    if 0 < m <= SWAP_MAX_M:
        return _swap_gemm(a, a_scale, weight, weight_scale, bias, block_size, out_dtype, precise, parts=parts)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    scale_bn, block_k, ws_stride_n, ws_stride_k = _scale_layout(weight_scale, block_size)
    tile = _gemm_tile(m, n, k, block_k, a.device, block_size is not None)
    block_k = tile["block_k"]
    # per stage: the fp8 A and W tiles (and their bf16 copies when precise)
    block_n, stages = fit_tile(tile["num_stages"], tile["block_n"],
                               lambda bn: ((tile["block_m"] + bn) * block_k * (3 if precise else 1), 0), a.device)

    descs = _descriptors(a, weight, tile["block_m"], block_n, block_k) if tile["tma"] else None

    def gemm(target, k_per_split, split, add_bias):
        _fp8_gemm_kernel[(triton.cdiv(m, tile["block_m"]) * triton.cdiv(n, block_n), split)](
            a, a_scale, weight, weight_scale, bias if add_bias else out, target, *(descs or (a, weight)), m, n, k,
            a.stride(0), a_scale.stride(0), weight.stride(0), ws_stride_n, ws_stride_k, m * n, n, k_per_split,
            SCALE_BN=scale_bn, BLOCK_SCALES=block_size is not None, HAS_BIAS=add_bias, SPLIT=split,
            BLOCK_M=tile["block_m"], BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, PRECISE=precise,
            TMA=descs is not None, FAST_ACC=tile["fast_acc"], WS=tile.get("ws", False) and descs is not None,
            num_warps=tile["num_warps"], num_stages=stages, **pdl_args(a.device))

    _launch_split(gemm, m, n, k, block_k, tile["split_k"], bias, out, parts=parts)
    return out


@register("fp8_linear", "triton")
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: list[int] | None = None,
    *,
    parts: list | None = None,
) -> torch.Tensor:
    """y = x W^T + b with an FP8 weight [N, K] (block, per-channel or per-tensor scales; see
    atom.ops.quant_fp8.fp8_linear) and dynamically quantized activations; y in x's dtype. parts: as
    fp8_gemm_quantized's (Triton only: the torch reference has no split)."""
    check_linear_args(x, weight, weight_scale, bias, block_size)
    n, k = weight.shape
    x2 = _rows(x)
    m = x2.shape[0]
    if m == 0:
        return torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if weight.stride(-1) != 1:
        raise ValueError("fp8_linear: the weight's K dimension must be contiguous")
    block_scales = block_size is not None
    if gemv_quantizes_input(m, block_scales):
        out = _gemv(x2, x2, weight, weight_scale, bias, block_size, x.dtype, quant_a=True, parts=parts)
        return out.view(*x.shape[:-1], n)
    if block_scales:
        a, a_scale = per_token_group_quant_fp8(x2, _scale_layout(weight_scale, block_size)[1], weight.dtype)
    else:
        a, a_scale = per_token_quant_fp8(x2, weight.dtype)
    return fp8_gemm_quantized(a, a_scale, weight, weight_scale, bias, block_size, x.dtype, parts=parts).view(
        *x.shape[:-1], n)


def gemv_quantizes_input(m: int, block_scales: bool) -> bool:
    """Whether fp8_linear's GEMV quantizes an M-row input itself (GEMV_FUSED_QUANT; per-token layouts only with
    GEMV_FUSED_QUANT_PER_TOKEN): then a producer hands the linear floats, elsewhere FP8 codes + scales
    (atom.layers.fp8_input)."""
    return m <= GEMV_MAX_M and GEMV_FUSED_QUANT and (block_scales or GEMV_FUSED_QUANT_PER_TOKEN)


def _gemv(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
          bias: torch.Tensor | None, block_size: list[int] | None, out_dtype: torch.dtype, quant_a: bool,
          parts: list | None = None) -> torch.Tensor:
    """The GEMV (M <= GEMV_MAX_M) on quantized activations, or (quant_a) on float ones it quantizes itself (a and
    a_scale both the float rows)."""
    m, (n, k) = a.shape[0], weight.shape
    scale_bn, block_k, ws_stride_n, ws_stride_k = _scale_layout(weight_scale, block_size)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    tile = _gemv_tile(n, k, block_k, a.device)

    def gemv_launch(target, k_per_split, split, add_bias):
        _fp8_gemv_kernel[(triton.cdiv(n, tile["block_n"]), split)](
            a, a_scale, weight, weight_scale, bias if add_bias else out, target, m, n, k, a.stride(0),
            a_scale.stride(0), weight.stride(0), ws_stride_n, ws_stride_k, m * n, n, k_per_split,
            SCALE_BN=scale_bn, BLOCK_SCALES=block_size is not None, HAS_BIAS=add_bias, SPLIT=split,
            M_PAD=triton.next_power_of_2(m), BLOCK_N=tile["block_n"], GROUPS=tile["block_k"] // block_k,
            SUB_K=block_k, QUANT_A=quant_a, **fp8_consts(weight.dtype), STAGES=tile["num_stages"],
            num_warps=tile["num_warps"], **pdl_args(a.device))

    _launch_split(gemv_launch, m, n, k, tile["block_k"], tile["split_k"], bias, out, parts=parts)
    return out
