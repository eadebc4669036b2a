"""fused_experts_swigluoai in Triton: GPT-OSS experts (biases, clamped SwiGLU) with bf16/fp32 or MXFP4 weights.

The structure is that of atom.ops.triton_kernels.moe (read it first), whose sort, tile choice and top-k sum
this module reuses: up to PAIR_GEMV_MAX_PAIRS (token, k) pairs, one GEMV per (pair, column block) and no
sort; beyond, the pairs sorted by expert and padded to tiles of BLOCK_M rows, and two grouped GEMMs (the
first computes gate and up tiles together, adds their biases and applies the activation in registers; the
second adds the bias and scales by the routing weight); then the fp32 rows summed over k.

MXFP4 weights are read packed, 0.53 bytes per weight, and decoded in registers: a byte holds elements 2j
(low nibble) and 2j+1 (high nibble) of a row, so a K chunk of the weights is taken as its even and its odd
elements, each multiplied with the matching even / odd activations (two half-K dots, or one GEMV with two
products), and no interleaving is ever materialized. E2M1 codes and E8M0 scales become float32 by building
their bits (exact), then the dot operand dtype (exact in bf16 too).

A second MXFP4 path (ATOM_MXFP4_SCALED_DOT=1, bf16 / fp16 activations, every batch size) leaves the decode to
the compiler: tl.dot_scaled with the packed weights and their E8M0 scales as the first operand, read in their
stored layout, so out^T = W A^T and a tile's tokens are the matrix instruction's narrow side. Both paths are
exact to the dequantized weights up to the dot's own accumulation.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton_kernels.common import dot_ieee, fit_tile, interpreting
from atom.ops.triton_kernels.moe import _align_by_expert, _gemm_tile, _pair_tile, _sum_topk, sorted_tile

# Up to this many (token, k) pairs, one GEMV per pair (see moe.PAIR_GEMV_MAX_PAIRS). Module-level for sweeps.
PAIR_GEMV_MAX_PAIRS = 16
# Tile overrides for tools/device/kernel_bench.py sweeps (the same keys as moe.PAIR_TILE_OVERRIDE and
# moe.GEMM_TILE_OVERRIDE); None: moe's choice.
PAIR_TILE_OVERRIDE: dict | None = None
GEMM_TILE_OVERRIDE: dict | None = None
# MXFP4 experts with bf16 / fp16 activations run _expert_gemm_mx_kernel (tl.dot_scaled, the weights as the
# first operand) from MX_GEMM_MIN_PAIRS pairs on, instead of the register-decode grouped GEMM
# (_expert_gemm_kernel), which float32 activations always take. H200, kernel_bench.py --gpt-oss-only
# (2026-12-02, gpt-oss-20b experts, us a layer): 620 / 770 / 3,213 against 850 / 1,468 / 7,779 at 32 / 128 /
# 1,024 tokens; at 1 token the per-pair GEMV (99-126) beats every scaled-dot tile (153-373) and at 4 tokens
# they tie (304 against 320), so up to PAIR_GEMV_MAX_PAIRS pairs the GEMV stays. ATOM_MXFP4_SCALED_DOT=0
# turns the scaled-dot path off (A/B).
MXFP4_SCALED_DOT = os.environ.get("ATOM_MXFP4_SCALED_DOT", "1") == "1"
MX_GEMM_MIN_PAIRS = PAIR_GEMV_MAX_PAIRS + 1
# Tile override for sweeps: dict(block_m, block_n, block_k, num_warps, num_stages); None: _mx_tile's choice.
MX_TILE_OVERRIDE: dict | None = None
# From this many (token, k) pairs on (prefill), MXFP4 experts are first dequantized into a scratch copy in the
# activation dtype (_mx_dequant_kernel, one projection at a time) and then run the dense grouped GEMM: the
# scaled-dot kernel is bound by its decode. H200, gpt-oss-20b experts (tools/device/mx_paths_bench.py,
# 2026-12-02, us a layer call): 128 tokens 1,014 against 763 for scaled-dot; 1,024 tokens 1,449 against 2,771;
# 4,096 tokens 3,207 against 8,986; results bit-identical. The crossover lies between 512 and 4,096 pairs; 2,048
# (512 tokens at top-4) is not yet measured. The scratch (gpt-oss-20b: 1.06 GB for gate/up) falls inside the
# engine's profiled peak. ATOM_MX_DEQUANT_MIN_PAIRS=0 turns it off.
def _env_pairs(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ValueError(f"{name} must be a number of (token, expert) pairs >= 0 (0: off), got {raw!r}")
    return int(raw)


MX_DEQUANT_MIN_PAIRS = _env_pairs("ATOM_MX_DEQUANT_MIN_PAIRS", 2048)
# The kernel of the "scaled_dot" path: "scaled_dot" (_expert_gemm_mx_kernel, tl.dot_scaled: the compiler's
# upcast) or "f16dot" (_expert_gemm_mx16_kernel: the GEMV's float16-bit decode feeding float16 dots one scale
# block at a time, the block's scale applied to the dot's float32 result). H200 (mx_paths_bench.py, 2026-12-02,
# default tiles, us a layer): f16dot 567 against 608 at 32 tokens, but 1,963 against 763 at 128 and 10,826
# against 2,771 at 1,024 tokens (one K = 16 dot pair per 32 elements starves the matrix units). It stays
# opt-in (ATOM_MX_GEMM=f16dot) until a tile sweep (kernel_bench.py's f16dot rows) says where it wins. "regdot"
# (_expert_gemm_mxr_kernel): the same decode with the block scales folded into the decoded weights, which feed
# one float32 accumulator over all of K (two dots of BLOCK_K/2 per step), the weights the first operand; not yet
# timed (ATOM_MX_GEMM=regdot, kernel_bench.py's / mx_paths_bench.py's "regdot" rows).
# "rows" (_expert_gemv_rows_kernel): a GEMV per (expert tile, column block) that decodes each weight once and
# reduces it against the tile's few rows with FMAs (decode batches: 1-8 pairs an expert); not yet timed.
MX_GEMM = os.environ.get("ATOM_MX_GEMM", "scaled_dot")
if MX_GEMM not in ("scaled_dot", "f16dot", "regdot", "rows"):
    raise ValueError(f"ATOM_MX_GEMM must be scaled_dot, f16dot, regdot or rows, not {MX_GEMM!r}")
# regdot's scales: each byte's loaded at its position (True) or the decoded tile reshaped into scale blocks (False)
MX_REGDOT_SCALE_PER_BYTE = os.environ.get("ATOM_MX_REGDOT_SCALE_PER_BYTE", "0") == "1"
# ATOM_MX_GEMV_ASM=1: on CUDA the per-pair GEMV decodes its packed bytes with inline PTX (_e2m1_bytes_ptx: four
# bytes per block, the float16 bits of two codes built in one 32-bit register, ~3.75 instructions a code against
# ~8 for the element-wise form). Same values (test_mxfp4_gemv_ptx_decode_is_bit_identical on a GPU); not yet timed,
# so off by default (kernel_bench.py's "ptx" rows). Never on ROCm or under the interpreter.
MX_GEMV_ASM = os.environ.get("ATOM_MX_GEMV_ASM", "0") == "1"


@triton.jit
def _e2m1_to_f32(code):
    """E2M1 codes (0..15, sign | exponent(2) | mantissa(1)) -> float32, by building the float's bits."""
    c = code.to(tl.uint32)
    e = (c >> 1) & 3
    m = c & 1
    bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))  # 0.5 * m, or 2^(e-1) * 1.m
    return (bits | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_to_f16(code):
    """E2M1 codes (0..15) -> float16 equal to 2^-14 times the code's value: the magnitude bits (exponent(2)
    | mantissa(1)) land in the float16's low exponent bits and top mantissa bit, so exponent e >= 1 gives
    2^(e-15) * 1.m and e = 0, m = 1 the subnormal 2^-15; the sign moves to bit 15. Four integer instructions
    and no select; the float16 -> float32 conversion is exact for subnormals too."""
    c = code.to(tl.uint16)
    return (((c & 7) << 9) | ((c & 8) << 12)).to(tl.float16, bitcast=True)


@triton.jit
def _e2m1_bytes_ptx(packed):
    """(low, high): float32 2^-14 times the E2M1 values of each byte's low and high nibble, as _e2m1_to_f16 gives
    them, computed four bytes at a time in PTX. prmt spreads bytes 0, 1 (then 2, 3) into the two 16-bit halves of a
    register; shifts and masks move each half's code into float16 bit positions (magnitude to bits 9-11, sign to
    bit 15) for both halves at once; the halves are converted to float32. CUDA only."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t0, t1, x, y, w;
        .reg .b16 l0, l1, l2, l3, h0, h1, h2, h3;
        prmt.b32 t0, $8, 0, 0x4140;
        prmt.b32 t1, $8, 0, 0x4342;
        shl.b32 x, t0, 9;
        and.b32 x, x, 0x0E000E00;
        shl.b32 y, t0, 12;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mov.b32 {l0, l1}, w;
        shl.b32 x, t0, 5;
        and.b32 x, x, 0x0E000E00;
        shl.b32 y, t0, 8;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mov.b32 {h0, h1}, w;
        shl.b32 x, t1, 9;
        and.b32 x, x, 0x0E000E00;
        shl.b32 y, t1, 12;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mov.b32 {l2, l3}, w;
        shl.b32 x, t1, 5;
        and.b32 x, x, 0x0E000E00;
        shl.b32 y, t1, 8;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mov.b32 {h2, h3}, w;
        cvt.f32.f16 $0, l0;
        cvt.f32.f16 $1, l1;
        cvt.f32.f16 $2, l2;
        cvt.f32.f16 $3, l3;
        cvt.f32.f16 $4, h0;
        cvt.f32.f16 $5, h1;
        cvt.f32.f16 $6, h2;
        cvt.f32.f16 $7, h3;
        }
        """,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
        args=[packed], dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def _e2m1_bytes(packed, PTX: tl.constexpr):
    """(low, high): float32 2^-14 times the E2M1 values of each packed byte's low and high nibble (elements 2j and
    2j + 1 of a row), by the PTX decode (CUDA) or the element-wise float16-bit one."""
    if PTX:
        low, high = _e2m1_bytes_ptx(packed)
    else:
        low, high = _e2m1_to_f16(packed & 15).to(tl.float32), _e2m1_to_f16(packed >> 4).to(tl.float32)
    return low, high


@triton.jit
def _e8m0_times_2p14(s):
    """E8M0 scale bytes -> 2^(s - 127 + 14) in float32 (the float16-bit decode's 2^-14 folded in), built in the
    exponent bits: exact for s <= 240 (s = 0 included: 2^-113 is a normal float32); real scales are far below."""
    return ((s.to(tl.uint32) + 14) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_to_f32(s):
    """E8M0 scale bytes -> 2^(s - 127) (s = 0 is the subnormal 2^-127)."""
    s = s.to(tl.uint32)
    return tl.where(s == 0, 5.877471754111438e-39, (s << 23).to(tl.float32, bitcast=True))


@triton.jit
def _swigluoai(gate, up, alpha, limit):
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    return (up + 1.0) * gate * tl.sigmoid(gate * alpha)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _a_chunk(a_rows, row_ok, k0, k_dim, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr, F32_DOT: tl.constexpr):
    """Activations of a K chunk, [BLOCK_M, BLOCK_K] (dense), or its even and odd columns (MXFP4)."""
    if MXFP4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        m = row_ok[:, None] & (kb < k_dim // 2)[None, :]
        even = tl.load(a_rows + 2 * kb[None, :], mask=m, other=0.0)
        odd = tl.load(a_rows + 2 * kb[None, :] + 1, mask=m, other=0.0)
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        even = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & (kk < k_dim)[None, :], other=0.0)
        odd = even
    if F32_DOT:
        even, odd = even.to(tl.float32), odd.to(tl.float32)
    return even, odd


@triton.jit
def _w_chunk(w_cols, s_cols, n_ok, k0, k_dim, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             MXFP4: tl.constexpr):
    """Weights of a K chunk as dot operands [K, BLOCK_N] (w_cols: pointers to each column n's row start):
    dense, or the decoded even and odd elements (MXFP4: bytes k0/2.. of each row; the chunk's BLOCK_K/32
    scales loaded once and broadcast over their 16 bytes)."""
    if MXFP4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_cols + kb[:, None], mask=(kb < k_dim // 2)[:, None] & n_ok[None, :], other=0)
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        scale = _e8m0_to_f32(tl.load(s_cols + g[:, None], mask=(g < k_dim // 32)[:, None] & n_ok[None, :],
                                     other=127))[:, None, :]
        low = tl.reshape(_e2m1_to_f32(packed & 15), [BLOCK_K // 32, 16, BLOCK_N]) * scale
        high = tl.reshape(_e2m1_to_f32(packed >> 4), [BLOCK_K // 32, 16, BLOCK_N]) * scale
        first = tl.reshape(low, [BLOCK_K // 2, BLOCK_N]).to(dtype)
        second = tl.reshape(high, [BLOCK_K // 2, BLOCK_N]).to(dtype)
    else:  # one return for both branches: Triton (3.6) type-checks every return of a function together
        kk = k0 + tl.arange(0, BLOCK_K)
        first = tl.load(w_cols + kk[:, None], mask=(kk < k_dim)[:, None] & n_ok[None, :], other=0.0).to(dtype)
        second = first
    return first, second


@triton.jit(do_not_specialize=["num_pairs"])  # as moe._expert_gemm_kernel: one compile for every batch
def _expert_gemm_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr, topk_w_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, w_stride_e, w_stride_n, s_stride_e, s_stride_n,
    bias_stride_e, out_stride, alpha, limit,
    GATED: tl.constexpr, MXFP4: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    """GATED: out[pair] = swigluoai(A W_gate^T + b_gate, A W_up^T + b_up), W_up = rows n_out..;
    else out[pair] = w_pair * (A W^T + b) in fp32. A row = pair // a_row_div; W the tile's expert's."""
    tile = tl.program_id(0)
    n_blk = tl.program_id(1)
    expert, pair, past_end = sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
    if past_end:
        return
    row_ok = pair < num_pairs
    a_rows = a_ptr + (pair // a_row_div)[:, None] * a_stride
    n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    w_cols = w_ptr + expert * w_stride_e + n[None, :] * w_stride_n
    s_cols = s_ptr + expert * s_stride_e + n[None, :] * s_stride_n
    dtype = tl.float32 if F32_DOT else a_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        a0, a1 = _a_chunk(a_rows, row_ok, k0, k_dim, BLOCK_K, MXFP4, F32_DOT)
        w0, w1 = _w_chunk(w_cols, s_cols, n_ok, k0, k_dim, dtype, BLOCK_N, BLOCK_K, MXFP4)
        acc = _dot(a0, w0, acc, IEEE)
        if MXFP4:
            acc = _dot(a1, w1, acc, IEEE)
        if GATED:
            u0, u1 = _w_chunk(w_cols + n_out * w_stride_n, s_cols + n_out * s_stride_n, n_ok, k0, k_dim, dtype,
                              BLOCK_N, BLOCK_K, MXFP4)
            acc_up = _dot(a0, u0, acc_up, IEEE)
            if MXFP4:
                acc_up = _dot(a1, u1, acc_up, IEEE)
    out_dtype = a_ptr.dtype.element_ty
    bias = bias_ptr + expert * bias_stride_e + n
    if GATED:
        # round like the reference: projection + bias in the activation dtype, then the activation
        gate = (acc + tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(out_dtype).to(tl.float32)
        up = (acc_up + tl.load(bias + n_out, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(out_dtype)
        acc = _swigluoai(gate, up.to(tl.float32), alpha, limit)
    else:
        acc = (acc + tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(out_dtype).to(tl.float32)
        acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + pair[:, None] * out_stride + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _store_transposed(acc, acc_up, a_ptr, bias_ptr, out_ptr, topk_w_ptr, expert, bias_stride_e, out_stride, n, n_ok,
                      n_out, pair, row_ok, alpha, limit, GATED: tl.constexpr):
    """The epilogue of the out^T = W A^T kernels (accumulators [BLOCK_N, BLOCK_M]), as _expert_gemm_kernel's:
    projection + bias rounded to the activation dtype, then the clamped SwiGLU (GATED: acc_up holds the up
    projection) or the routing weight; out[pair, n] stored."""
    out_dtype = a_ptr.dtype.element_ty
    bias = bias_ptr + expert * bias_stride_e + n
    if GATED:
        gate = (acc + tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)[:, None]).to(out_dtype).to(tl.float32)
        up = (acc_up + tl.load(bias + n_out, mask=n_ok, other=0.0).to(tl.float32)[:, None]).to(out_dtype)
        acc = _swigluoai(gate, up.to(tl.float32), alpha, limit)
    else:
        acc = (acc + tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)[:, None]).to(out_dtype).to(tl.float32)
        acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[None, :]
    tl.store(out_ptr + pair[None, :] * out_stride + n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & row_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _expert_gemm_mx_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr, topk_w_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, w_stride_e, w_stride_n, s_stride_e, s_stride_n,
    bias_stride_e, out_stride, alpha, limit,
    GATED: tl.constexpr, ACT_FORMAT: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The MXFP4 grouped GEMM as out^T = W A^T: the expert's packed rows [BLOCK_N, BLOCK_K/2] and their scales
    are the scaled dot's first operand, read in their stored layout (K contiguous) and decoded by the
    compiler's MXFP4 upcast (tl.dot_scaled); the tile's activation rows [BLOCK_K, BLOCK_M] the second. The
    expert's output columns fill the matrix instruction's 64-row side and the tile's tokens its narrow side
    (8..256), so a tile of 16 tokens wastes no weight decode. Same epilogue as _expert_gemm_kernel."""
    tile = tl.program_id(0)
    n_blk = tl.program_id(1)
    expert, pair, past_end = sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
    if past_end:
        return
    row_ok = pair < num_pairs
    a_cols = a_ptr + (pair // a_row_div)[None, :] * a_stride
    n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    w_rows = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n
    s_rows = s_ptr + expert * s_stride_e + n[:, None] * s_stride_n
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_cols + kk[:, None], mask=(kk < k_dim)[:, None] & row_ok[None, :], other=0.0)
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        w_mask = n_ok[:, None] & (kb < k_dim // 2)[None, :]
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s_mask = n_ok[:, None] & (g < k_dim // 32)[None, :]
        w = tl.load(w_rows + kb[None, :], mask=w_mask, other=0)
        s = tl.load(s_rows + g[None, :], mask=s_mask, other=127)
        acc = tl.dot_scaled(w, s, "e2m1", a, None, ACT_FORMAT, acc)
        if GATED:
            u = tl.load(w_rows + n_out * w_stride_n + kb[None, :], mask=w_mask, other=0)
            su = tl.load(s_rows + n_out * s_stride_n + g[None, :], mask=s_mask, other=127)
            acc_up = tl.dot_scaled(u, su, "e2m1", a, None, ACT_FORMAT, acc_up)
    _store_transposed(acc, acc_up, a_ptr, bias_ptr, out_ptr, topk_w_ptr, expert, bias_stride_e, out_stride, n, n_ok,
                      n_out, pair, row_ok, alpha, limit, GATED)


@triton.jit(do_not_specialize=["num_pairs"])
def _expert_gemm_mx16_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr, topk_w_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, w_stride_e, w_stride_n, s_stride_e, s_stride_n,
    bias_stride_e, out_stride, alpha, limit,
    GATED: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """The MXFP4 grouped GEMM as out^T = W A^T (as _expert_gemm_mx_kernel), decoded by hand: per 32-element
    scale block, the expert's codes [BLOCK_N, 16 bytes] become two float16 operands (low and high nibbles:
    elements 2j and 2j + 1, each 2^-14 times its E2M1 value, exact) against the tile's even and odd activation
    columns [16, BLOCK_M] in float16; the two K = 16 dots' float32 sum is scaled by 2^14 times the block's E8M0
    scale. GROUPS scale blocks per loop step. Same epilogue as _expert_gemm_kernel."""
    tile = tl.program_id(0)
    n_blk = tl.program_id(1)
    expert, pair, past_end = sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
    if past_end:
        return
    row_ok = pair < num_pairs
    a_cols = a_ptr + (pair // a_row_div)[None, :] * a_stride
    n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    w_rows = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n
    s_rows = s_ptr + expert * s_stride_e + n * s_stride_n
    j = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, k_dim, 32 * GROUPS):
        for gi in tl.static_range(GROUPS):
            g = k0 // 32 + gi
            kb = g * 16 + j  # the block's bytes
            kb_ok = kb < k_dim // 2
            a_mask = kb_ok[:, None] & row_ok[None, :]
            a_even = tl.load(a_cols + (2 * kb)[:, None], mask=a_mask, other=0.0).to(tl.float16)
            a_odd = tl.load(a_cols + (2 * kb + 1)[:, None], mask=a_mask, other=0.0).to(tl.float16)
            w_mask = n_ok[:, None] & kb_ok[None, :]
            s_mask = n_ok & (n * 0 + g < k_dim // 32)
            packed = tl.load(w_rows + kb[None, :], mask=w_mask, other=0)
            scale = _e8m0_times_2p14(tl.load(s_rows + g, mask=s_mask, other=113))[:, None]
            part = tl.dot(_e2m1_to_f16(packed & 15), a_even) + tl.dot(_e2m1_to_f16(packed >> 4), a_odd)
            acc += part * scale
            if GATED:
                u = tl.load(w_rows + n_out * w_stride_n + kb[None, :], mask=w_mask, other=0)
                su = _e8m0_times_2p14(tl.load(s_rows + n_out * s_stride_n + g, mask=s_mask, other=113))[:, None]
                part_up = tl.dot(_e2m1_to_f16(u & 15), a_even) + tl.dot(_e2m1_to_f16(u >> 4), a_odd)
                acc_up += part_up * su
    _store_transposed(acc, acc_up, a_ptr, bias_ptr, out_ptr, topk_w_ptr, expert, bias_stride_e, out_stride, n, n_ok,
                      n_out, pair, row_ok, alpha, limit, GATED)


@triton.jit(do_not_specialize=["num_pairs"])
def _expert_gemm_mxr_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr, topk_w_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, w_stride_e, w_stride_n, s_stride_e, s_stride_n,
    bias_stride_e, out_stride, alpha, limit,
    GATED: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr, SCALE_PER_BYTE: tl.constexpr,
):
    """The MXFP4 grouped GEMM as out^T = W A^T with the weights decoded in registers as the first operand (on
    Hopper the matrix instruction's A may come from registers, so the decoded tile needs no trip through shared
    memory): per K step the expert's packed rows [BLOCK_N, BLOCK_K/2] become two scaled operands in the activation
    dtype (low nibbles: elements 2j, high: 2j + 1; the float16-bit decode times 2^(s - 127 + 14), exact), dotted
    with the tile's even and odd activation columns [BLOCK_K/2, BLOCK_M] into one float32 accumulator over all
    of K. SCALE_PER_BYTE: each byte's scale is loaded at its own position (the same 4 bytes a row, from L1)
    instead of reshaping the decoded tile into scale blocks and back. Same epilogue as _expert_gemm_kernel."""
    tile = tl.program_id(0)
    n_blk = tl.program_id(1)
    expert, pair, past_end = sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
    if past_end:
        return
    row_ok = pair < num_pairs
    a_cols = a_ptr + (pair // a_row_div)[None, :] * a_stride
    n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    w_rows = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n
    s_rows = s_ptr + expert * s_stride_e + n[:, None] * s_stride_n
    dtype = tl.float32 if F32_DOT else a_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        kb_ok = kb < k_dim // 2
        a_mask = kb_ok[:, None] & row_ok[None, :]
        a_even = tl.load(a_cols + (2 * kb)[:, None], mask=a_mask, other=0.0).to(dtype)
        a_odd = tl.load(a_cols + (2 * kb + 1)[:, None], mask=a_mask, other=0.0).to(dtype)
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        w_mask = n_ok[:, None] & kb_ok[None, :]
        s_mask = n_ok[:, None] & (g < k_dim // 32)[None, :]
        for up in tl.static_range(2 if GATED else 1):
            packed = tl.load(w_rows + up * n_out * w_stride_n + kb[None, :], mask=w_mask, other=0)
            low, high = _e2m1_bytes(packed, False)
            if SCALE_PER_BYTE:
                scale = _e8m0_times_2p14(tl.load(s_rows + up * n_out * s_stride_n + (kb // 16)[None, :], mask=w_mask,
                                                 other=113))
                low, high = (low * scale).to(dtype), (high * scale).to(dtype)
            else:
                scale = _e8m0_times_2p14(tl.load(s_rows + up * n_out * s_stride_n + g[None, :], mask=s_mask,
                                                 other=113))[:, :, None]
                low = tl.reshape(tl.reshape(low, [BLOCK_N, BLOCK_K // 32, 16]) * scale,
                                 [BLOCK_N, BLOCK_K // 2]).to(dtype)
                high = tl.reshape(tl.reshape(high, [BLOCK_N, BLOCK_K // 32, 16]) * scale,
                                  [BLOCK_N, BLOCK_K // 2]).to(dtype)
            if up == 0:
                acc = tl.dot(low, a_even, acc)
                acc = tl.dot(high, a_odd, acc)
            else:
                acc_up = tl.dot(low, a_even, acc_up)
                acc_up = tl.dot(high, a_odd, acc_up)
    _store_transposed(acc, acc_up, a_ptr, bias_ptr, out_ptr, topk_w_ptr, expert, bias_stride_e, out_stride, n, n_ok,
                      n_out, pair, row_ok, alpha, limit, GATED)


@triton.jit(do_not_specialize=["num_pairs"])
def _expert_gemv_rows_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr, topk_w_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, w_stride_e, w_stride_n, s_stride_e, s_stride_n,
    bias_stride_e, out_stride, alpha, limit,
    GATED: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PTX: tl.constexpr,
):
    """Decode batches of a few pairs an expert: a GEMV over the expert's packed rows [BLOCK_N, BLOCK_K/2] that
    decodes each K chunk once (float16 bits, or PTX) and reduces it with FMAs against each of the tile's BLOCK_M
    rows (as the per-pair GEMV does for one), per-block sums times the block scales; no matrix instructions, so
    the decode is paid once per expert instead of once per pair. Accumulators [BLOCK_N, BLOCK_M] as the out^T
    kernels'; same epilogue."""
    tile = tl.program_id(0)
    n_blk = tl.program_id(1)
    expert, pair, past_end = sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
    if past_end:
        return
    row_ok = pair < num_pairs
    rows = tl.arange(0, BLOCK_M)
    n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    w_rows = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n
    s_rows = s_ptr + expert * s_stride_e + n[:, None] * s_stride_n
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        kb_ok = kb < k_dim // 2
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        w_mask = n_ok[:, None] & kb_ok[None, :]
        s_mask = n_ok[:, None] & (g < k_dim // 32)[None, :]
        for up in tl.static_range(2 if GATED else 1):
            packed = tl.load(w_rows + up * n_out * w_stride_n + kb[None, :], mask=w_mask, other=0)
            low, high = _e2m1_bytes(packed, PTX)
            scale = _e8m0_times_2p14(tl.load(s_rows + up * n_out * s_stride_n + g[None, :], mask=s_mask, other=113))
            for r in tl.static_range(BLOCK_M):
                pair_r = tl.load(sorted_ids_ptr + tile * BLOCK_M + r).to(tl.int64)
                x_row = a_ptr + (pair_r // a_row_div) * a_stride
                x_ok = kb_ok & (kb * 0 + pair_r < num_pairs)
                x_even = tl.load(x_row + 2 * kb, mask=x_ok, other=0.0).to(tl.float32)
                x_odd = tl.load(x_row + 2 * kb + 1, mask=x_ok, other=0.0).to(tl.float32)
                prod = low * x_even[None, :] + high * x_odd[None, :]
                part = tl.sum(tl.sum(tl.reshape(prod, [BLOCK_N, BLOCK_K // 32, 16]), axis=2) * scale, axis=1)
                if up == 0:
                    acc += tl.where(rows[None, :] == r, part[:, None], 0.0)
                else:
                    acc_up += tl.where(rows[None, :] == r, part[:, None], 0.0)
    _store_transposed(acc, acc_up, a_ptr, bias_ptr, out_ptr, topk_w_ptr, expert, bias_stride_e, out_stride, n, n_ok,
                      n_out, pair, row_ok, alpha, limit, GATED)


@triton.jit
def _gemv_chunk(x_ptr, w_rows, s_rows, n_ok, k0, k_dim, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr,
                PTX: tl.constexpr):
    """Products W[n, k] * x[k] of a K chunk in float32: [BLOCK_N, BLOCK_K] (dense), or [BLOCK_N, BLOCK_K/32]
    for MXFP4, each the sum over one 32-element block times its scale (scaling by a power of two after the
    sum is exact); w_rows: pointers to each row n's start.

    MXFP4 codes are decoded through float16 bits (_e2m1_to_f16: values 2^-14 times the codes', the factor
    restored with the block's scale): on the H200 (kernel_bench.py --gpt-oss-only, 2026-12-02) this took the
    gpt-oss-20b experts at one token from 98.8 to 61.7 us a layer and at four tokens from 319.7 to 174.8 us
    against _e2m1_to_f32's bit building (same results, bit for bit); the GEMV is bound by its decode
    instructions, not by the 53 MB it reads."""
    if MXFP4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ok = kb < k_dim // 2
        packed = tl.load(w_rows + kb[None, :], mask=n_ok[:, None] & ok[None, :], other=0)
        x_even = tl.load(x_ptr + 2 * kb, mask=ok, other=0.0).to(tl.float32)[None, :]
        x_odd = tl.load(x_ptr + 2 * kb + 1, mask=ok, other=0.0).to(tl.float32)[None, :]
        low, high = _e2m1_bytes(packed, PTX)
        prod = low * x_even + high * x_odd
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        scale = _e8m0_to_f32(tl.load(s_rows + g[None, :], mask=n_ok[:, None] & (g < k_dim // 32)[None, :],
                                     other=127))
        out = (tl.sum(tl.reshape(prod, [prod.shape[0], BLOCK_K // 32, 16]), axis=2) * 16384.0) * scale
    else:  # one return for both branches (see _w_chunk)
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = kk < k_dim
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
        out = w * tl.load(x_ptr + kk, mask=ok, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def _pair_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ids_ptr, topk_w_ptr, n_out, k_dim, x_row_div, x_stride,
                 w_stride_e, w_stride_n, s_stride_e, s_stride_n, bias_stride_e, out_stride, alpha, limit,
                 GATED: tl.constexpr, MXFP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ACC_K: tl.constexpr, PTX: tl.constexpr):
    """Decode: one GEMV per (pair, n block) on the pair's expert. GATED: h[pair] = swigluoai(gate, up) of
    x[pair // x_row_div]; else y[pair] = w_pair * (h[pair] W2^T + b2) in fp32."""
    pair = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // x_row_div) * x_stride
    w_rows = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n
    s_rows = s_ptr + expert * s_stride_e + n[:, None] * s_stride_n
    acc = tl.zeros([BLOCK_N, ACC_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, ACC_K], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        acc += _gemv_chunk(x_row, w_rows, s_rows, n_ok, k0, k_dim, BLOCK_K, MXFP4, PTX)
        if GATED:
            acc_up += _gemv_chunk(x_row, w_rows + n_out * w_stride_n, s_rows + n_out * s_stride_n, n_ok, k0, k_dim,
                                  BLOCK_K, MXFP4, PTX)
    dtype = x_ptr.dtype.element_ty
    bias = bias_ptr + expert * bias_stride_e + n
    y = (tl.sum(acc, axis=1) + tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    if GATED:
        up = (tl.sum(acc_up, axis=1) + tl.load(bias + n_out, mask=n_ok, other=0.0).to(tl.float32)).to(dtype)
        y = _swigluoai(y, up.to(tl.float32), alpha, limit)
    else:
        y = y * tl.load(topk_w_ptr + pair)
    tl.store(out_ptr + pair * out_stride + n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _mx_dequant_kernel(w_ptr, s_ptr, out_ptr, n_rows, k_dim, w_stride_e, w_stride_n, s_stride_e, s_stride_n,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e, r, k] = E2M1(code) * 2^(scale - 127), written in out's dtype (contiguous [E, n_rows, k_dim]); the
    packed rows' byte j holds elements 2j (low nibble) and 2j + 1 (high nibble). Exact wherever the value is
    representable in out's dtype (bf16: every E8M0 scale but the top two)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    g = tl.program_id(1) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    e = tl.program_id(2).to(tl.int64)
    r_ok = r < n_rows
    rows = r.to(tl.int64)[:, None]
    packed = tl.load(w_ptr + e * w_stride_e + rows * w_stride_n + kb[None, :],
                     mask=r_ok[:, None] & (kb < k_dim // 2)[None, :], other=0)
    scale = _e8m0_to_f32(tl.load(s_ptr + e * s_stride_e + rows * s_stride_n + g[None, :],
                                 mask=r_ok[:, None] & (g < k_dim // 32)[None, :], other=127))[:, :, None]
    low, high = _e2m1_bytes(packed, False)  # 2^-14 times the values: 2^14 restored first, the exact E2M1 values
    low = tl.reshape(low * 16384.0, [BLOCK_R, BLOCK_K // 32, 16]) * scale
    high = tl.reshape(high * 16384.0, [BLOCK_R, BLOCK_K // 32, 16]) * scale
    both = tl.join(tl.reshape(low, [BLOCK_R, BLOCK_K // 2]), tl.reshape(high, [BLOCK_R, BLOCK_K // 2]))
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + (e * n_rows + rows) * k_dim + k[None, :],
             tl.reshape(both, [BLOCK_R, BLOCK_K]).to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & (k < k_dim)[None, :])


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, N, K/2] packed E2M1 codes + [E, N, K/32] E8M0 scales -> [E, N, K] in dtype (a fresh tensor)."""
    num_experts, n_rows, half_k = blocks.shape
    k_dim = 2 * half_k
    out = torch.empty(num_experts, n_rows, k_dim, dtype=dtype, device=blocks.device)
    block_r, block_k = 16, 256
    _mx_dequant_kernel[(triton.cdiv(n_rows, block_r), triton.cdiv(k_dim, block_k), num_experts)](
        blocks, scales, out, n_rows, k_dim, blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return out


def _check_shapes(x, w13, w2, w13_bias, w2_bias, w13_scale, w2_scale, mxfp4: bool) -> tuple[int, int]:
    """(hidden, inter) after checking every operand against them."""
    num_experts, two_i = w13.shape[:2]
    inter = two_i // 2
    hidden = x.shape[1]
    packing = 2 if mxfp4 else 1
    expect = {"w13": (w13, (num_experts, two_i, hidden // packing)), "w2": (w2, (num_experts, hidden, inter // packing)),
              "w13_bias": (w13_bias, (num_experts, two_i)), "w2_bias": (w2_bias, (num_experts, hidden))}
    if mxfp4:
        expect["w13_scale"] = (w13_scale, (num_experts, two_i, hidden // 32))
        expect["w2_scale"] = (w2_scale, (num_experts, hidden, inter // 32))
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape or t.stride(-1) != 1:
            raise ValueError(f"fused_experts_swigluoai: {name} is {tuple(t.shape)} (strides {t.stride()}), "
                             f"expected {shape} with a contiguous last dim")
    return hidden, inter


_ACT_FORMAT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _ptx_decode(x: torch.Tensor) -> bool:
    """Whether the GEMVs decode with inline PTX (ATOM_MX_GEMV_ASM, CUDA only, never under the interpreter)."""
    return MX_GEMV_ASM and x.is_cuda and torch.version.hip is None and not interpreting()


def experts_path(dtype: torch.dtype, mxfp4: bool, num_pairs: int) -> str:
    """Which kernels fused_experts_swigluoai runs: "dequant" (MXFP4 dequantized, then the dense grouped GEMM),
    "scaled_dot" (_expert_gemm_mx_kernel), "per_pair" (the GEMVs) or "grouped" (_expert_gemm_kernel)."""
    if mxfp4 and 0 < MX_DEQUANT_MIN_PAIRS <= num_pairs:
        return "dequant"
    if mxfp4 and MXFP4_SCALED_DOT and dtype in _ACT_FORMAT and num_pairs >= MX_GEMM_MIN_PAIRS:
        return "scaled_dot"
    return "per_pair" if num_pairs <= PAIR_GEMV_MAX_PAIRS else "grouped"


def _mx_pair_tile(num_tokens: int) -> dict:
    """Tiles of the MXFP4 per-pair GEMV. H200, gpt-oss-20b experts at one token (kernel_bench.py
    --gpt-oss-only, 2026-12-02): 8 gate / 16 down columns a program with K steps of 512 / 256 took 98.8 us a
    layer against 121.6 for moe._pair_tile's [16 / 64, 256 / 128] and 111.8 for [32 / 32, 256 / 256, 8 warps]:
    the decode is the bottleneck, so more programs (more SMs decoding) win; with the float16-bit decode the same
    tile took 61.7 us (the others 62.4-66.8). At four tokens moe._pair_tile's [16 / 32, 256] won (174.8 us against
    181.8-206.6), as for every other size."""
    if num_tokens == 1:
        return dict(gate_block_n=8, down_block_n=16, block_k=512, down_block_k=256, num_warps=4)
    return _pair_tile(num_tokens)


def _mx_rows_tile(num_pairs: int, num_experts: int) -> dict:
    """Tiles of _expert_gemv_rows_kernel (MX_GEMM = "rows", not yet timed): block_m rows (the sort's padding
    unit: about the pairs an expert gets), 16 columns and K steps of 512 as the per-pair GEMV's."""
    if MX_TILE_OVERRIDE is not None:
        return MX_TILE_OVERRIDE
    per_expert = num_pairs / max(num_experts, 1)
    return dict(block_m=4 if per_expert <= 4 else 8, block_n=16, block_k=512, num_warps=4, num_stages=1)


def _mx_tile(num_pairs: int, num_experts: int) -> dict:
    """Tiles of _expert_gemm_mx_kernel: block_m tokens (the padding unit of the expert sort), block_n expert
    output columns, block_k the K step in elements."""
    if MX_TILE_OVERRIDE is not None:
        return MX_TILE_OVERRIDE
    # H200 sweep (kernel_bench.py --gpt-oss-only, 2026-12-02, 32 experts, top-4): [16 tokens, 64 columns] won
    # at 4 pairs an expert (32 tokens: 620 us; [32, 128] 756), [32, 128] at 16 and 128 (128 tokens: 770 against
    # 937 for [16, 64]; 1,024 tokens: 3,213 against 3,351-7,296 for the other five tiles); 8 warps and K steps
    # of 256 lost everywhere
    # (second sweep, same day: at 128 pairs an expert [64, 128] took 2,969 us against 3,193 for [32, 128])
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 8:
        return dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return dict(block_m=32, block_n=128, block_k=128, num_warps=4, num_stages=3)
    return dict(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)


def _mx_experts(x, w13, w2, s13, s2, b13, b2, weights, topk_ids, h, y, alpha, limit) -> torch.Tensor:
    num_tokens = x.shape[0]
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    inter, hidden = h.shape[1], y.shape[1]
    tile = _mx_rows_tile(num_pairs, num_experts) if MX_GEMM == "rows" else _mx_tile(num_pairs, num_experts)
    block_m = tile["block_m"]
    ptx = _ptx_decode(x)
    sorted_ids, padded_end = _align_by_expert(topk_ids, num_experts, block_m)
    num_tiles = sorted_ids.numel() // block_m

    def gemm(a, w, s, b, out, n_out, k_dim, row_div, gated):
        grid = (num_tiles, triton.cdiv(n_out, tile["block_n"]))
        args = (a, w, s, b, out, sorted_ids, padded_end, weights, n_out, k_dim, num_pairs, num_experts, row_div,
                a.stride(0), w.stride(0), w.stride(1), s.stride(0), s.stride(1), b.stride(0), out.stride(0), alpha,
                limit)
        if MX_GEMM == "rows":
            _expert_gemv_rows_kernel[grid](*args, GATED=gated, E_PAD=triton.next_power_of_2(num_experts),
                                           BLOCK_M=block_m, BLOCK_N=tile["block_n"], BLOCK_K=tile["block_k"],
                                           PTX=ptx, num_warps=tile["num_warps"])
            return
        if MX_GEMM == "regdot":
            _expert_gemm_mxr_kernel[grid](*args, GATED=gated, E_PAD=triton.next_power_of_2(num_experts),
                                          BLOCK_M=block_m, BLOCK_N=tile["block_n"], BLOCK_K=tile["block_k"],
                                          F32_DOT=interpreting(), SCALE_PER_BYTE=MX_REGDOT_SCALE_PER_BYTE,
                                          num_warps=tile["num_warps"], num_stages=tile["num_stages"])
            return
        if MX_GEMM == "f16dot":
            _expert_gemm_mx16_kernel[grid](*args, GATED=gated, E_PAD=triton.next_power_of_2(num_experts),
                                           BLOCK_M=block_m, BLOCK_N=tile["block_n"], GROUPS=tile["block_k"] // 32,
                                           num_warps=tile["num_warps"], num_stages=tile["num_stages"])
            return
        _expert_gemm_mx_kernel[grid](
            *args, GATED=gated, ACT_FORMAT=_ACT_FORMAT[x.dtype], E_PAD=triton.next_power_of_2(num_experts),
            BLOCK_M=block_m, BLOCK_N=tile["block_n"], BLOCK_K=tile["block_k"], num_warps=tile["num_warps"],
            num_stages=tile["num_stages"])

    gemm(x, w13, s13, b13, h, inter, hidden, top_k, True)
    gemm(h, w2, s2, b2, y, hidden, inter, 1, False)
    return _sum_topk(y, topk_ids.reshape(-1).contiguous(), num_tokens, top_k, x.dtype)


@register("fused_experts_swigluoai", "triton")
def fused_experts_swigluoai(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_bias: torch.Tensor,
    w2_bias: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    alpha: float,
    limit: float,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k w_k * expert_{id_k}(x): per-pair GEMVs at decode sizes, expert-sorted grouped GEMMs beyond."""
    mxfp4 = w13_scale is not None
    if mxfp4 != (w2_scale is not None):
        raise ValueError("fused_experts_swigluoai: give both MXFP4 scales (w13_scale, w2_scale) or neither")
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return torch.empty(0, w2.shape[1], dtype=x.dtype, device=x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    hidden, inter = _check_shapes(x, w13, w2, w13_bias, w2_bias, w13_scale, w2_scale, mxfp4)
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    weights = topk_weights.reshape(-1).float().contiguous()
    s13 = w13_scale if mxfp4 else w13  # any pointer when dense
    s2 = w2_scale if mxfp4 else w2
    alpha, limit = float(alpha), float(limit)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)

    path = experts_path(x.dtype, mxfp4, num_pairs)
    if path == "scaled_dot":
        return _mx_experts(x, w13, w2, s13, s2, w13_bias, w2_bias, weights, topk_ids, h, y, alpha, limit)

    if path == "per_pair":
        ids = topk_ids.reshape(-1).contiguous()
        tile = PAIR_TILE_OVERRIDE or (_mx_pair_tile(num_tokens) if mxfp4 else _pair_tile(num_tokens))
        ptx = mxfp4 and _ptx_decode(x)

        def pair(a, w, s, b, out, n_out, k_dim, row_div, gated, block_n, block_k):
            _pair_kernel[(num_pairs, triton.cdiv(n_out, block_n))](
                a, w, s, b, out, ids, weights, n_out, k_dim, row_div, a.stride(0), w.stride(0), w.stride(1),
                s.stride(0), s.stride(1), b.stride(0), out.stride(0), alpha, limit, GATED=gated, MXFP4=mxfp4,
                BLOCK_N=block_n, BLOCK_K=block_k, ACC_K=block_k // 32 if mxfp4 else block_k, PTX=ptx,
                num_warps=tile["num_warps"])

        pair(x, w13, s13, w13_bias, h, inter, hidden, top_k, True, tile["gate_block_n"], tile["block_k"])
        pair(h, w2, s2, w2_bias, y, hidden, inter, 1, False, tile["down_block_n"],
             tile.get("down_block_k", tile["block_k"]))
        return _sum_topk(y, ids, num_tokens, top_k, x.dtype)

    # prefill sizes: MXFP4 experts dequantized, one projection at a time, then the dense grouped GEMM
    dequant = path == "dequant"
    tile = GEMM_TILE_OVERRIDE or _gemm_tile(num_pairs, num_experts)
    block_m, bn, bk = tile["block_m"], tile["block_n"], max(64, tile["block_k"])  # MXFP4: half-K dots >= 32
    sorted_ids, padded_end = _align_by_expert(topk_ids, num_experts, block_m)
    num_tiles = sorted_ids.numel() // block_m
    ieee = dot_ieee(x.dtype)

    def gemm(a, w, s, b, out, n_out, k_dim, row_div, gated):
        packed = mxfp4 and not dequant
        if dequant:
            w = s = mxfp4_dequantize(w, s, a.dtype)
        rows = block_m + (2 if gated else 1) * bn
        k_step, stages = fit_tile(tile["num_stages"], bk, lambda k: (rows * k * a.element_size(), 0), a.device)
        _expert_gemm_kernel[(num_tiles, triton.cdiv(n_out, bn))](
            a, w, s, b, out, sorted_ids, padded_end, weights, n_out, k_dim, num_pairs, num_experts, row_div,
            a.stride(0), w.stride(0), w.stride(1), s.stride(0), s.stride(1), b.stride(0), out.stride(0), alpha,
            limit, GATED=gated, MXFP4=packed, E_PAD=triton.next_power_of_2(num_experts), BLOCK_M=block_m,
            BLOCK_N=bn, BLOCK_K=max(k_step, 64 if packed else 16), F32_DOT=interpreting(), IEEE=ieee,
            num_warps=tile["num_warps"], num_stages=stages)

    gemm(x, w13, s13, w13_bias, h, inter, hidden, top_k, True)
    gemm(h, w2, s2, w2_bias, y, hidden, inter, 1, False)
    return _sum_topk(y, topk_ids.reshape(-1).contiguous(), num_tokens, top_k, x.dtype)
