"""FP8 experts: `fp8_fused_experts` on the same two paths as the float kernels in moe.py.

- Decode (up to moe.PAIR_GEMV_MAX_PAIRS (token, expert) pairs): one GEMV per (pair, column block), no sort.
  The kernels read the float activations (x, then h) and quantize them while loading, exactly as the
  reference does (a first pass over the row for a per-token scale; per 1 x group chunk for block scales),
  so the FP8 path has the bf16 path's three launches. Each product is of the dequantized activation and
  the dequantized weight, as in the reference; only the summation order differs.
- Larger batches: x and then h are quantized once by the quantization kernels, the (token, k) pairs are
  sorted by expert (moe._align_by_expert) and two grouped GEMMs with fp8 tl.dot run over the sorted
  pairs, with the scale handling of the dense FP8 GEMM (block scales per K step, or per-token x
  per-channel scales at the end). GEMM 1 computes gate and up tiles together and applies the activation
  in registers; GEMM 2 writes each pair's output in the activation dtype; moe._sum_topk weights the k rows of
  each token by their routing weights and adds them (float32).
Pairs of expert id -1 (another rank's expert under expert parallelism) are never computed (the GEMV
kernels return, the sort leaves them out) and left out of the sum.

Weight scales: block [E, 2 ceil(I/bn), ceil(H/bk)] for w13 (the gate's block rows, then the up's) and
[E, ceil(H/bn), ceil(I/bk)] for w2; per channel [E, 2I(, 1)] and [E, H(, 1)].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.quant_fp8 import check_experts_args
from atom.ops.registry import register
from atom.ops.triton_kernels import moe as float_moe
from atom.ops.triton_kernels import quant_fp8 as dense_fp8
from atom.ops.triton_kernels.activation import _act
from atom.ops.triton_kernels.common import fit_tile
from atom.ops.triton_kernels.fp8_common import dynamic_scale, fp8_consts, quantize
from atom.ops.triton_kernels.quant_fp8 import per_token_group_quant_fp8, per_token_quant_fp8
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait


# ---------------------------------------------------------------- decode: one GEMV per (pair, column block)


@triton.jit
def _row_scale(row_ptr, k_dim, QG: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """Per-token scale of one float row ([1])."""
    c = tl.arange(0, QG)
    amax = tl.zeros([QG], tl.float32)
    for k0 in range(0, k_dim, QG):
        amax = tl.maximum(amax, tl.abs(tl.load(row_ptr + k0 + c, mask=k0 + c < k_dim, other=0.0).to(tl.float32)))
    return dynamic_scale(tl.max(amax, axis=0, keep_dims=True), FP8_MAX, MIN_SCALE)


@triton.jit
def _dequantized_chunk(row_ptr, k, k_ok, row_scale, fp8: tl.constexpr, BLOCK_SCALES: tl.constexpr,
                       FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, MIN_EXP: tl.constexpr, EMULATE: tl.constexpr):
    """x_hat of one chunk of a float row: q * s, with s the chunk's own group scale (BLOCK_SCALES: the
    chunk is one group) or the row's scale."""
    xv = tl.load(row_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    s = row_scale
    if BLOCK_SCALES:
        s = dynamic_scale(tl.max(tl.abs(xv), axis=0, keep_dims=True), FP8_MAX, MIN_SCALE)
    return quantize(xv, s, fp8, FP8_MAX, MIN_EXP, EMULATE).to(tl.float32) * s


@triton.jit
def _fp8_pair_gate_up_kernel(
    x_ptr, w_ptr, ws_ptr, h_ptr, ids_ptr, inter, k_dim, top_k, x_stride, w_stride_e, w_stride_n,
    ws_stride_e, ws_stride_n, ws_stride_k, up_scale_off, h_stride,
    ACT: tl.constexpr, SCALE_BN: tl.constexpr, BLOCK_SCALES: tl.constexpr, BLOCK_N: tl.constexpr,
    QG: tl.constexpr, SUBS: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, MIN_EXP: tl.constexpr,
    EMULATE: tl.constexpr, PDL: tl.constexpr,
):
    """h[pair] = act(x W_gate^T) * (x W_up^T) for the pair's expert; x quantized on the fly."""
    pdl_wait(PDL)
    pair = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < inter
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    if expert < 0:  # another rank's expert (expert parallelism): left out of the sum
        return
    fp8 = w_ptr.dtype.element_ty
    x_row = x_ptr + (pair // top_k) * x_stride
    g_base = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n
    u_base = g_base + inter * w_stride_n
    s_base = ws_ptr + expert * ws_stride_e
    sx = tl.zeros([1], tl.float32)
    if not BLOCK_SCALES:
        sx = _row_scale(x_row, k_dim, QG, FP8_MAX, MIN_SCALE)
    acc_g = tl.zeros([BLOCK_N, QG], tl.float32)
    acc_u = tl.zeros([BLOCK_N, QG], tl.float32)
    c = tl.arange(0, QG)
    for k0 in range(0, k_dim, QG * SUBS):
        for j in tl.static_range(SUBS):
            k = k0 + j * QG + c
            k_ok = k < k_dim
            xd = _dequantized_chunk(x_row, k, k_ok, sx, fp8, BLOCK_SCALES, FP8_MAX, MIN_SCALE, MIN_EXP, EMULATE)[None, :]
            m = n_ok[:, None] & k_ok[None, :]
            g = tl.load(g_base + k[None, :], mask=m, other=0.0).to(tl.float32)
            u = tl.load(u_base + k[None, :], mask=m, other=0.0).to(tl.float32)
            if BLOCK_SCALES:  # the dequantized weight: its block's scale
                kb = (k0 + j * QG) // QG
                g = g * tl.load(s_base + (n // SCALE_BN) * ws_stride_n + kb * ws_stride_k, mask=n_ok, other=0.0)[:, None]
                u = u * tl.load(s_base + (n // SCALE_BN + up_scale_off) * ws_stride_n + kb * ws_stride_k, mask=n_ok,
                                other=0.0)[:, None]
            acc_g += g * xd
            acc_u += u * xd
    gate = tl.sum(acc_g, axis=1)
    up = tl.sum(acc_u, axis=1)
    if not BLOCK_SCALES:  # per-channel weight scales, applied once
        gate = gate * tl.load(s_base + n * ws_stride_n, mask=n_ok, other=0.0)
        up = up * tl.load(s_base + (n + up_scale_off) * ws_stride_n, mask=n_ok, other=0.0)
    dtype = h_ptr.dtype.element_ty
    # round like the reference: projections in the activation dtype, then act(gate) * up
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    h = _act(gate, ACT).to(dtype).to(tl.float32) * up
    tl.store(h_ptr + pair * h_stride + n, h.to(dtype), mask=n_ok)


@triton.jit
def _fp8_pair_down_kernel(
    h_ptr, w_ptr, ws_ptr, y_ptr, ids_ptr, n_out, k_dim, h_stride, w_stride_e, w_stride_n,
    ws_stride_e, ws_stride_n, ws_stride_k, y_stride,
    SCALE_BN: tl.constexpr, BLOCK_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, QG: tl.constexpr,
    SUBS: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, MIN_EXP: tl.constexpr,
    EMULATE: tl.constexpr, PDL: tl.constexpr,
):
    """y[pair] = h[pair] W2[expert]^T in h's dtype (the sum weights it); h quantized on the fly."""
    pdl_wait(PDL)
    pair = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    if expert < 0:
        return
    fp8 = w_ptr.dtype.element_ty
    h_row = h_ptr + pair * h_stride
    w_base = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n
    s_base = ws_ptr + expert * ws_stride_e
    sh = tl.zeros([1], tl.float32)
    if not BLOCK_SCALES:
        sh = _row_scale(h_row, k_dim, QG, FP8_MAX, MIN_SCALE)
    acc = tl.zeros([BLOCK_N, QG], tl.float32)
    c = tl.arange(0, QG)
    for k0 in range(0, k_dim, QG * SUBS):
        for j in tl.static_range(SUBS):
            k = k0 + j * QG + c
            k_ok = k < k_dim
            hd = _dequantized_chunk(h_row, k, k_ok, sh, fp8, BLOCK_SCALES, FP8_MAX, MIN_SCALE, MIN_EXP, EMULATE)[None, :]
            w = tl.load(w_base + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if BLOCK_SCALES:
                kb = (k0 + j * QG) // QG
                w = w * tl.load(s_base + (n // SCALE_BN) * ws_stride_n + kb * ws_stride_k, mask=n_ok, other=0.0)[:, None]
            acc += w * hd
    y = tl.sum(acc, axis=1)
    if not BLOCK_SCALES:
        y = y * tl.load(s_base + n * ws_stride_n, mask=n_ok, other=0.0)
    tl.store(y_ptr + pair * y_stride + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


# ---------------------------------------------------------------- sorted path: grouped GEMM over expert runs


@triton.jit
def _fp8_expert_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, as_stride, w_stride_e, w_stride_n,
    ws_stride_e, ws_stride_n, ws_stride_k, up_scale_off, out_stride,
    SCALE_BN: tl.constexpr, BLOCK_SCALES: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    ACT_DTYPE: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_MAJOR: tl.constexpr, PDL: tl.constexpr,
):
    """out[pair] = A[pair // a_row_div] @ W[e]^T with fp8 A (scales as_ptr) and fp8 W (scales ws_ptr).
    N_MAJOR: the 1-D launch order of moe._expert_gemm_kernel (a row tile's column blocks adjacent)."""
    pdl_wait(PDL)
    tile, n_blk = float_moe.tile_and_column_block(n_out, BLOCK_N, N_MAJOR)
    expert, pair, past_end = float_moe.sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
    if past_end:
        return
    row_ok = pair < num_pairs
    a_row = pair // a_row_div
    n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * a_stride + kk[None, :]
    w_ptrs = w_ptr + expert * w_stride_e + n[None, :] * w_stride_n + kk[:, None]
    s_base = ws_ptr + expert * ws_stride_e
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up_ptrs = w_ptrs + n_out * w_stride_n
    sa = tl.zeros([BLOCK_M], tl.float32)
    if not BLOCK_SCALES:
        sa = tl.load(as_ptr + a_row * as_stride, mask=row_ok, other=0.0)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = (k0 + kk) < k_dim
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if BLOCK_SCALES:
            kb = k0 // BLOCK_K
            sa = tl.load(as_ptr + a_row * as_stride + kb, mask=row_ok, other=0.0)
            sw = tl.load(s_base + (n // SCALE_BN) * ws_stride_n + kb * ws_stride_k, mask=n_ok, other=0.0)
            acc += tl.dot(a, w) * (sa[:, None] * sw[None, :])
        else:
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
        if GATED:
            u = tl.load(up_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if BLOCK_SCALES:
                su = tl.load(s_base + (n // SCALE_BN + up_scale_off) * ws_stride_n + (k0 // BLOCK_K) * ws_stride_k,
                             mask=n_ok, other=0.0)
                acc_up += tl.dot(a, u) * (sa[:, None] * su[None, :])
            else:
                acc_up = tl.dot(a, u, acc_up, max_num_imprecise_acc=BLOCK_K)
            up_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if not BLOCK_SCALES:
        acc = acc * (sa[:, None] * tl.load(s_base + n * ws_stride_n, mask=n_ok, other=0.0)[None, :])
        if GATED:
            acc_up = acc_up * (sa[:, None] * tl.load(s_base + (n + up_scale_off) * ws_stride_n, mask=n_ok,
                                                     other=0.0)[None, :])
    if GATED:  # round like the reference: projections in the activation dtype, then act(gate) * up
        gate = acc.to(ACT_DTYPE).to(tl.float32)
        up = acc_up.to(ACT_DTYPE).to(tl.float32)
        acc = _act(gate, ACT).to(ACT_DTYPE).to(tl.float32) * up
    tl.store(out_ptr + pair[:, None] * out_stride + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


# Tile overrides for sweeps (tools/device/kernel_bench.py): per-pair dict(gate_block_n, down_block_n, subs,
# num_warps); sorted path dict(block_m, block_n, num_warps, num_stages, [n_major], [block_k: per-channel weights
# only, a power of two >= 32], [down: a dict of these but block_m, for the down projection alone]). n_major (the
# launch order that took the bf16 prefill GEMM from 6.22 to 5.65 ms a layer at the same tile, moe._gemm_tile) is
# not on in the shipped rule until measured here: tools/device/moe_kernels_profile.py --fp8 block|channel sweeps it.
PAIR_TILE_OVERRIDE: dict | None = None
GEMM_TILE_OVERRIDE: dict | None = None
_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# The per-pair tile of per-channel / per-tensor experts from 2 tokens. H100 (2026-12-06, moe_kernels_profile.py --fp8
# channel, qwen3-30b-a3b's experts, PDL off, benchmarks/h100-2026-12-06e/pair_tile_sweep.txt): at 2 tokens (16 pairs)
# gate|up 31.3-32.0 -> 22.5-24.0 us and down 14.9 -> 12.1-12.2 us a call against the one-token tile below, in three
# processes; at one token that tile stays the best of 18 within 6% (14.8 / 7.2 us; subs 1 there: 16.8 / 8.2).
PAIR_TILE_TWO_TOKENS = dict(gate_block_n=32, down_block_n=64, subs=1, num_warps=4)


def _pair_tile(num_tokens: int = 1, block: bool = False) -> dict:
    """The per-pair kernels' tile: PAIR_TILE_TWO_TOKENS from 2 tokens for per-channel / per-tensor scales (block
    scales keep the one-token tile: not measured)."""
    if PAIR_TILE_OVERRIDE is not None:
        return PAIR_TILE_OVERRIDE
    if num_tokens >= 2 and not block:
        return dict(PAIR_TILE_TWO_TOKENS)
    return dict(gate_block_n=16, down_block_n=32, subs=2, num_warps=4)


def _gemm_tile(num_pairs: int, num_experts: int) -> dict:
    if GEMM_TILE_OVERRIDE is not None:
        return GEMM_TILE_OVERRIDE
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 16:
        tile = dict(block_m=16, block_n=64, num_warps=4, num_stages=4)
    elif per_expert <= 64:
        tile = dict(block_m=32, block_n=64, num_warps=4, num_stages=4)
    else:
        tile = dict(block_m=64, block_n=128, num_warps=8, num_stages=3)
    for max_per_expert, rule in dense_fp8.TILE_RULES.get("moe", []):  # ATOM_FP8_TILES' moe entries, over the above
        if per_expert <= max_per_expert:
            return {**tile, **rule}
    return tile


def _scale_strides(scale: torch.Tensor, block: bool) -> tuple[int, int, int]:
    """(expert, row, K-block) strides of a [E, rows, K blocks] or [E, rows(, 1)] scale."""
    return scale.stride(0), scale.stride(1), scale.stride(2) if block else 0


def _layout(block_size, n_half: int) -> tuple[int, int, int]:
    """(rows per scale row, K group, up-half scale row offset) of a weight layout."""
    if block_size is None:
        return 1, 128, n_half
    bn, bk = int(block_size[0]), int(block_size[1])
    if bk < 32 or bk & (bk - 1):
        raise ValueError(f"the Triton FP8 MoE kernels need block_k to be a power of two >= 32, got {bk}")
    return bn, bk, triton.cdiv(n_half, bn)


def _per_pair(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, act, block_size):
    num_tokens, hidden = x.shape
    inter = w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    block = block_size is not None
    scale_bn, group, up_off = _layout(block_size, inter)
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()
    tile = _pair_tile(num_tokens, block)
    consts = fp8_consts(w13.dtype)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    s13 = _scale_strides(w13_scale, block)
    _fp8_pair_gate_up_kernel[(num_pairs, triton.cdiv(inter, tile["gate_block_n"]))](
        x, w13, w13_scale, h, ids, inter, hidden, top_k, x.stride(0), w13.stride(0), w13.stride(1), *s13, up_off,
        h.stride(0), ACT=act, SCALE_BN=scale_bn, BLOCK_SCALES=block, BLOCK_N=tile["gate_block_n"], QG=group,
        SUBS=tile["subs"], **consts, num_warps=tile["num_warps"], **pdl_args(x.device))
    y = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    s2 = _scale_strides(w2_scale, block)
    _fp8_pair_down_kernel[(num_pairs, triton.cdiv(w2.shape[1], tile["down_block_n"]))](
        h, w2, w2_scale, y, ids, w2.shape[1], inter, h.stride(0), w2.stride(0), w2.stride(1), *s2,
        y.stride(0), SCALE_BN=scale_bn, BLOCK_SCALES=block, BLOCK_N=tile["down_block_n"], QG=group,
        SUBS=tile["subs"], **consts, num_warps=tile["num_warps"], **pdl_args(h.device))
    return float_moe._sum_topk(y, ids, num_tokens, top_k, x.dtype, weights)


def _quantized(a: torch.Tensor, block_size, fp8: torch.dtype):
    if block_size is None:
        return per_token_quant_fp8(a, fp8)
    return per_token_group_quant_fp8(a, int(block_size[1]), fp8)


@register("fp8_fused_experts", "triton")
def fp8_fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    block_size: list[int] | None = None,
) -> torch.Tensor:
    """sum_k w_k * expert_{id_k}(x) with FP8 experts (see atom.ops.quant_fp8.fp8_fused_experts)."""
    check_experts_args(x, w13, w2, w13_scale, w2_scale, block_size)
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.empty(0, w2.shape[1], dtype=x.dtype, device=x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("fp8_fused_experts: the experts' K dimension must be contiguous")
    if block_size is None:  # [E, N, 1] -> [E, N]: one stride per dimension below
        w13_scale, w2_scale = w13_scale.reshape(num_experts, -1), w2_scale.reshape(num_experts, -1)
    act = 0 if activation == "silu" else 1
    if num_pairs <= float_moe.PAIR_GEMV_MAX_PAIRS:
        return _per_pair(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, act, block_size)

    block = block_size is not None
    scale_bn, block_k, up_off = _layout(block_size, inter)
    tile = _gemm_tile(num_pairs, num_experts)
    block_m = tile["block_m"]
    sorted_ids, padded_end = float_moe._align_by_expert(topk_ids, num_experts, block_m)
    weights = topk_weights.reshape(-1).float().contiguous()
    num_tiles = sorted_ids.numel() // block_m

    def launch(a, a_scale, w, w_scale, out, n_out, k_dim, a_row_div, gated, up_scale_off):
        # a sweep's tile: "down" overrides the down projection's block_n / warps / stages / n_major / block_k
        t = tile if gated else {**tile, **tile.get("down", {})}
        # per-channel / per-tensor scales leave the K step free (block scales: one scale group a step)
        bk = t["block_k"] if not block and "block_k" in t else block_k
        if not isinstance(bk, int) or bk < 32 or bk & (bk - 1):
            raise ValueError(f"an FP8 experts tile's block_k must be a power of two >= 32, got {bk!r}")
        # A, W (and up) fp8 tiles per stage; the column block shrinks when not even one stage fits
        bn, stages = fit_tile(t["num_stages"], t["block_n"],
                              lambda b: ((block_m + (2 if gated else 1) * b) * bk, 0), a.device)
        n_major = bool(t.get("n_major", False))
        n_blocks = triton.cdiv(n_out, bn)
        _fp8_expert_gemm_kernel[(num_tiles * n_blocks,) if n_major else (num_tiles, n_blocks)](
            a, a_scale, w, w_scale, out, sorted_ids, padded_end, n_out, k_dim, num_pairs, num_experts,
            a_row_div, a.stride(0), a_scale.stride(0), w.stride(0), w.stride(1), *_scale_strides(w_scale, block),
            up_scale_off, out.stride(0), SCALE_BN=scale_bn, BLOCK_SCALES=block, GATED=gated, ACT=act,
            ACT_DTYPE=_TL_DTYPE[x.dtype], E_PAD=triton.next_power_of_2(num_experts),
            BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, N_MAJOR=n_major, num_warps=t["num_warps"],
            num_stages=stages, **pdl_args(a.device))

    xq, xs = _quantized(x, block_size, w13.dtype)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    launch(xq, xs, w13, w13_scale, h, inter, hidden, top_k, True, up_off)
    hq, hs = _quantized(h, block_size, w13.dtype)
    y = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    launch(hq, hs, w2, w2_scale, y, w2.shape[1], inter, 1, False, 0)
    return float_moe._sum_topk(y, topk_ids.reshape(-1).contiguous(), num_tokens, top_k, x.dtype, weights)
