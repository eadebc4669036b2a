"""MoE routing (softmax + top-k per token) and the expert computation as two grouped GEMMs.

fused_experts sorts (token, k) pairs by expert and pads each expert's run to BLOCK_M rows, so every row
tile of the grouped GEMM belongs to one expert (found from the cumulative padded counts); each GEMM is a
single launch over all experts. The grid is sized by an upper bound on the padded row count, so no host
sync is needed; tiles past the real end exit. Small batches are sorted by one Triton program. At decode
sizes (a few pairs, nearly all on different experts) there is no sort: one GEMV per (pair, column block).
GEMM 1 computes gate and up tiles together and applies the activation in registers; GEMM 2 writes each
pair's expert output in the activation dtype (the rounding the reference has there), and a last small kernel
weights the k rows of a token by their routing weights in float32 and sums them (deterministic, no atomics;
half the bytes of a float32 row a pair, which the prefill's 8 rows a token made ~1 GB a layer at 16K tokens).
Pairs of expert id -1 (another rank's expert under expert parallelism) are never placed, never computed, and
left out of the sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton_kernels.activation import _act
from atom.ops.triton_kernels.common import dot_ieee, fit_tile, interpreting
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait


@triton.jit
def _topk_softmax_kernel(logits_ptr, w_ptr, ids_ptr, num_experts, stride, TOP_K: tl.constexpr,
                         RENORM: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + t * stride + e, mask=e < num_experts, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    p = tl.where(e < num_experts, p, -1.0)
    total = 0.0
    for k in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, e, BLOCK_E), axis=0)  # lowest index among ties, like torch.topk
        tl.store(w_ptr + t * TOP_K + k, best)
        tl.store(ids_ptr + t * TOP_K + k, idx.to(tl.int64))
        total += best
        p = tl.where(e == idx, -1.0, p)
    if RENORM:
        for k in tl.static_range(TOP_K):
            tl.store(w_ptr + t * TOP_K + k, tl.load(w_ptr + t * TOP_K + k) / total)


@register("moe_topk_softmax", "triton")
def moe_topk_softmax(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over experts, keep the top_k; returns (weights float32 [T, k], expert ids int64 [T, k])."""
    num_tokens, num_experts = router_logits.shape
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens:
        _topk_softmax_kernel[(num_tokens,)](logits, weights, ids, num_experts, logits.stride(0), TOP_K=top_k,
                                            RENORM=renormalize,
                                            BLOCK_E=triton.next_power_of_2(num_experts), num_warps=1,
                                            **pdl_args(logits.device))
    return weights, ids


# The sort of (token, k) pairs by expert runs as two kernels over chunks of CHUNK pairs: each program of the first
# counts its chunk's pairs per expert; each program of the second reads all chunks' counts (a few KiB), derives
# the experts' padded runs and its chunk's offset inside each run (the counts of the chunks before it), and
# places its pairs at their stable rank. One program used to do all of it in sequence: 17 us a layer at 256
# pairs in the qwen3-30b-a3b engine profile (H200), growing with the pairs (batch 128: 768-1024 pairs a layer).
# do_not_specialize: num_pairs (tokens x top_k) and num_chunks change with the batch; Triton would compile
# again each time they turn 1 or a multiple of 16 (an odd prompt length), for a divisibility hint that these
# loop bounds and masks do not use (tools/triton_specializations.py counts the compiles).
@triton.jit(do_not_specialize=["num_pairs"])
def _align_count_kernel(ids_ptr, counts_ptr, num_pairs, E_PAD: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """counts[chunk, e] = pairs of this chunk routed to expert e (ids of -1, other ranks' experts, count
    nowhere)."""
    pdl_wait(PDL)
    chunk = tl.program_id(0)
    idx = chunk * CHUNK + tl.arange(0, CHUNK)
    e = tl.arange(0, E_PAD)
    ids = tl.load(ids_ptr + idx, mask=idx < num_pairs, other=E_PAD).to(tl.int32)
    tl.store(counts_ptr + chunk * E_PAD + e, tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["num_pairs", "num_chunks"])
def _align_place_kernel(ids_ptr, counts_ptr, sorted_ids_ptr, padded_end_ptr, num_pairs, num_experts, num_chunks,
                        BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr, CHUNKS_PAD: tl.constexpr,
                        ONE_CHUNK: tl.constexpr, SCANNED: tl.constexpr, PDL: tl.constexpr):
    """Each expert's run padded to BLOCK_M (padding rows hold the sentinel num_pairs), the pairs of this chunk
    at their stable rank in their expert's run; program 0 writes the cumulative padded ends. ONE_CHUNK: the
    only program counts its pairs itself (no count kernel before it). SCANNED: counts_ptr holds the chunks'
    exclusive prefix sums [num_chunks + 1, E_PAD] (row num_chunks: the totals), so a program reads two rows
    instead of reducing every chunk's counts (many chunks: prefill)."""
    pdl_wait(PDL)
    chunk = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    c = tl.arange(0, CHUNK)
    idx = chunk * CHUNK + c
    ids = tl.load(ids_ptr + idx, mask=idx < num_pairs, other=E_PAD).to(tl.int32)
    onehot = (ids[:, None] == e[None, :]).to(tl.int32)
    if ONE_CHUNK:
        counts = tl.sum(onehot, axis=0)
        before = tl.zeros([E_PAD], tl.int32)
    elif SCANNED:
        counts = tl.load(counts_ptr + num_chunks * E_PAD + e)
        before = tl.load(counts_ptr + chunk * E_PAD + e)
    else:
        r = tl.arange(0, CHUNKS_PAD)
        per_chunk = tl.load(counts_ptr + r[:, None] * E_PAD + e[None, :], mask=(r < num_chunks)[:, None], other=0)
        counts = tl.sum(per_chunk, axis=0)
        before = tl.sum(tl.where((r < chunk)[:, None], per_chunk, 0), axis=0)  # this chunk's offset in each run
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    if chunk == 0:
        tl.store(padded_end_ptr + e, padded_end, mask=e < num_experts)
    # padding rows (disjoint from the pairs' rows), spread over the programs
    for p in range(chunk, BLOCK_M, num_chunks):
        pos = padded_start + counts + p
        tl.store(sorted_ids_ptr + pos, num_pairs, mask=(pos < padded_end) & (e < num_experts))
    earlier = tl.sum(((ids[:, None] == ids[None, :]) & (c[None, :] < c[:, None])).to(tl.int32), axis=1)
    base = tl.sum(onehot * (padded_start + before)[None, :], axis=1)
    tl.store(sorted_ids_ptr + base + earlier, idx, mask=(idx < num_pairs) & (ids >= 0))


@triton.jit
def _align_scan_kernel(counts_ptr, scan_ptr, num_chunks, E_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                       ROWS: tl.constexpr, PDL: tl.constexpr):
    """scan[0] = 0, scan[c + 1] = counts[0] + ... + counts[c] for BLOCK_E experts' columns of the per-chunk
    counts [num_chunks, E_PAD]: ROWS chunks at a time, the running total carried from one to the next."""
    pdl_wait(PDL)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    r = tl.arange(0, ROWS)
    carry = tl.zeros([BLOCK_E], tl.int32)
    tl.store(scan_ptr + e, carry)
    for r0 in range(0, num_chunks, ROWS):
        rows = r0 + r
        tile = tl.load(counts_ptr + rows[:, None] * E_PAD + e[None, :], mask=(rows < num_chunks)[:, None], other=0)
        tl.store(scan_ptr + (rows[:, None] + 1) * E_PAD + e[None, :], tl.cumsum(tile, axis=0) + carry[None, :],
                 mask=(rows < num_chunks)[:, None])
        carry += tl.sum(tile, axis=0)


# Up to this many (token, k) pairs the two kernels above sort them as they are (decode and small prefills: every
# place program reduces all chunks' counts); beyond, the counts go through a scan over the chunks first (SCANNED).
# H200, DeepSeek-V2-Lite at 16K tokens (131K pairs): the torch sort it replaces (argsort + ~10 ops) took ~270 us a
# layer. The scan was torch.cumsum over dim 0 until stop 53: on the H100's qwen3-30b-a3b FP8 batch-128 prefill
# (16,384 tokens, 2,048 chunks x 256 columns) it took 357 us a layer (17 of the prefill's 269 ms; torch's outer-dim
# scan walks the chunks one after another in a few hundred threads); _align_scan_kernel does it in 16 programs of
# 256-chunk tiles. ALIGN_PATH_OVERRIDE: "kernels", "scan" or "torch" (the reference layout) for tests and sweeps.
_ALIGN_KERNEL_MAX_PAIRS = 2048
_ALIGN_CHUNK = 64
ALIGN_PATH_OVERRIDE: str | None = None


def _align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(pair ids sorted by expert, each expert's run padded to block_m with the sentinel num_pairs;
    cumulative padded row count per expert [E] int32). Pairs of id -1 are left out. Sync-free, so CUDA
    graphs can capture it."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    max_rows = (triton.cdiv(num_pairs, block_m) + num_experts) * block_m  # each expert pads < one tile
    path = ALIGN_PATH_OVERRIDE or ("kernels" if num_pairs <= _ALIGN_KERNEL_MAX_PAIRS else "scan")
    if path != "torch" and num_pairs:
        sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=flat.device)
        padded_end = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
        e_pad = triton.next_power_of_2(num_experts + 1)
        chunks = triton.cdiv(num_pairs, _ALIGN_CHUNK)
        scanned = path == "scan" and chunks > 1
        counts = torch.empty(chunks, e_pad, dtype=torch.int32, device=flat.device) if chunks > 1 else padded_end
        if chunks > 1:
            _align_count_kernel[(chunks,)](flat, counts, num_pairs, E_PAD=e_pad, CHUNK=_ALIGN_CHUNK, num_warps=4,
                                           **pdl_args(flat.device))
        if scanned:  # exclusive prefix over the chunks, the totals as a last row
            scan = torch.empty(chunks + 1, e_pad, dtype=torch.int32, device=flat.device)
            block_e = min(e_pad, 16)
            _align_scan_kernel[(e_pad // block_e,)](counts, scan, chunks, E_PAD=e_pad, BLOCK_E=block_e, ROWS=256,
                                                    num_warps=4, **pdl_args(flat.device))
            counts = scan
        _align_place_kernel[(chunks,)](flat, counts, sorted_ids, padded_end, num_pairs, num_experts, chunks,
                                       BLOCK_M=block_m, E_PAD=e_pad, CHUNK=_ALIGN_CHUNK,
                                       CHUNKS_PAD=1 if scanned else triton.next_power_of_2(chunks),
                                       ONE_CHUNK=chunks == 1, SCANNED=scanned, num_warps=4, **pdl_args(flat.device))
        return sorted_ids, padded_end
    # Pairs of id -1 go to an extra bucket E, whose rows all land on one dump row past the end.
    key = torch.where(flat >= 0, flat, num_experts)
    # scatter_add, not bincount: bincount syncs with the host on CUDA
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(
        0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(key, stable=True)
    sorted_expert = key[order]
    rank_in_expert = torch.arange(num_pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_expert]
    run_start = torch.cat([padded_end - padded, padded_end.new_full((1,), max_rows)])
    dest = torch.where(sorted_expert < num_experts, run_start[sorted_expert] + rank_in_expert, max_rows)
    sorted_ids = torch.full((max_rows + 1,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[dest] = order.to(torch.int32)
    return sorted_ids[:max_rows], padded_end.to(torch.int32)


@triton.jit
def tile_and_column_block(n_out, BLOCK_N: tl.constexpr, N_MAJOR: tl.constexpr):
    """(row tile, column block) of this grouped-GEMM program. N_MAJOR: a 1-D grid whose consecutive programs
    take one row tile's column blocks; otherwise a (row tiles, column blocks) grid."""
    if N_MAJOR:
        n_blocks = tl.cdiv(n_out, BLOCK_N)
        return tl.program_id(0) // n_blocks, tl.program_id(0) % n_blocks
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """A tile of _align_by_expert's output: (its expert, its BLOCK_M pair ids, whether it lies past the last
    expert's padded run, where the grouped GEMMs' programs return at once)."""
    e = tl.arange(0, E_PAD)
    ends = tl.load(padded_end_ptr + e, mask=e < num_experts, other=2**30)
    past_end = tile * BLOCK_M >= tl.load(padded_end_ptr + num_experts - 1)
    expert = tl.sum((ends <= tile * BLOCK_M).to(tl.int32), axis=0).to(tl.int64)  # the run this tile is in
    pair = tl.load(sorted_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return expert, pair, past_end


# do_not_specialize: num_pairs (tokens x top_k) changes with the batch; Triton would compile again each time it
# turns 1 or a multiple of 16 (an odd prompt length), for a divisibility hint that this loop bound and mask
# do not use (tools/triton_specializations.py counts the compiles).
@triton.jit(do_not_specialize=["num_pairs"])
def _expert_gemm_kernel(
    a_ptr, w_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, w_stride_e, w_stride_n, out_stride,
    GATED: tl.constexpr, ACT: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr,
    IEEE: tl.constexpr, N_MAJOR: tl.constexpr, PDL: tl.constexpr,
):
    """out[pair] = A[pair // a_row_div] @ W[e]^T (gated: act(A W_gate^T) * (A W_up^T), W_up = rows n_out..).
    N_MAJOR: a 1-D grid whose consecutive programs take one row tile's column blocks (the row tile is read
    from HBM once, its column blocks run side by side; the expert's weight stays in L2 across its row
    tiles); otherwise grid (row tiles, column blocks), consecutive programs walking the row tiles."""
    pdl_wait(PDL)
    tile, n_blk = tile_and_column_block(n_out, BLOCK_N, N_MAJOR)
    expert, pair, past_end = sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
    if past_end:
        return
    row_ok = pair < num_pairs
    a_row = pair // a_row_div
    n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * a_stride + kk[None, :]
    w_base = w_ptr + expert * w_stride_e
    w_ptrs = w_base + n[None, :] * w_stride_n + kk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if GATED:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up_ptrs = w_ptrs + n_out * w_stride_n
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = (k0 + kk) < k_dim
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if F32_DOT:
            a, w = a.to(tl.float32), w.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if GATED:
            u = tl.load(up_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if F32_DOT:
                u = u.to(tl.float32)
            if IEEE:
                acc_up = tl.dot(a, u, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, u, acc_up)
            up_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = a_ptr.dtype.element_ty
    if GATED:
        # round like the reference: projections in the activation dtype, then act(gate) * up
        gate = acc.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        acc = _act(gate, ACT).to(dtype).to(tl.float32) * up
    tl.store(out_ptr + pair[:, None] * out_stride + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _pair_gate_up_kernel(x_ptr, w_ptr, h_ptr, ids_ptr, inter, k_dim, top_k, x_stride, w_stride_e, w_stride_n,
                         h_stride, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PDL: tl.constexpr):
    """Decode: h[pair] = act(x W_gate^T) * (x W_up^T) for the pair's expert, one GEMV per (pair, n block)."""
    pdl_wait(PDL)
    pair = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < inter
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    if expert < 0:  # another rank's expert: left out of the sum
        return
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (pair // top_k) * x_stride + kk
    g_ptrs = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n + kk[None, :]
    u_ptrs = g_ptrs + inter * w_stride_n
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = (k0 + kk) < k_dim
        xv = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        m = n_ok[:, None] & k_ok[None, :]
        acc_g += tl.load(g_ptrs, mask=m, other=0.0).to(tl.float32) * xv
        acc_u += tl.load(u_ptrs, mask=m, other=0.0).to(tl.float32) * xv
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    dtype = h_ptr.dtype.element_ty
    # round like the reference: projections in the activation dtype, then act(gate) * up
    gate = tl.sum(acc_g, axis=1).to(dtype).to(tl.float32)
    up = tl.sum(acc_u, axis=1).to(dtype).to(tl.float32)
    h = _act(gate, ACT).to(dtype).to(tl.float32) * up
    tl.store(h_ptr + pair * h_stride + n, h.to(dtype), mask=n_ok)


@triton.jit
def _pair_down_kernel(h_ptr, w_ptr, y_ptr, ids_ptr, n_out, k_dim, h_stride, w_stride_e, w_stride_n,
                      y_stride, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Decode: y[pair] = h[pair] W2[expert]^T in h's dtype (the sum weights it), one GEMV per (pair, n block)."""
    pdl_wait(PDL)
    pair = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    if expert < 0:
        return
    kk = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + pair * h_stride + kk
    w_ptrs = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n + kk[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = (k0 + kk) < k_dim
        hv = tl.load(h_ptrs, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * hv
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    tl.store(y_ptr + pair * y_stride + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def token_columns(n_out, BLOCK: tl.constexpr):
    """(token, its BLOCK column indices, which are < n_out) of a top-k sum program: a 1-D grid of tokens x column
    blocks, one token's column blocks consecutive."""
    n_blocks = tl.cdiv(n_out, BLOCK)
    n = (tl.program_id(0) % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    return (tl.program_id(0) // n_blocks).to(tl.int64), n, n < n_out


@triton.jit
def _sum_topk_kernel(y_ptr, ids_ptr, w_ptr, out_ptr, n_out, y_stride, out_stride, TOP_K: tl.constexpr,
                     WEIGHTED: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[t] = sum_k w[t, k] * y[t * TOP_K + k] in float32 over the pairs of id >= 0, added in k order, cast to
    the output dtype. WEIGHTED: y holds the experts' outputs (any dtype) and w the routing weights; otherwise y's
    float32 rows are weighted already. Program: one token's BLOCK columns (a 1-D grid, the token's column blocks
    consecutive).

    The k rows are added one after another as 1-D loads, all in one thread's registers. Until stop 53 this loaded
    a [K_PAD, BLOCK] tile and reduced it with tl.sum over axis 0 across 4 warps (through shared memory): on the
    H100 (tools/device/moe_prep_bench.py, qwen3-30b-a3b's 16,384-token prefill, 604 MB) that took 1,224 us, 16%
    of the copy rate, 1.2 ms of every MoE layer's prefill; the same tile on one warp took 222 us, and this 216
    us (93%)."""
    pdl_wait(PDL)
    t, n, n_ok = token_columns(n_out, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(TOP_K):
        pair = t * TOP_K + k
        kept = (tl.zeros([BLOCK], tl.int32) + tl.load(ids_ptr + pair).to(tl.int32)) >= 0  # id -1: another rank's
        y = tl.load(y_ptr + pair * y_stride + n, mask=n_ok & kept, other=0.0).to(tl.float32)
        if WEIGHTED:
            y = y * tl.load(w_ptr + pair)
        acc += y
    tl.store(out_ptr + t * out_stride + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


# Up to this many (token, k) pairs, fused_experts runs one GEMV per pair instead of sorting pairs by expert:
# no sort, no padded tiles, and as many weight reads as the sort path while pairs rarely share an expert
# (decode at small batch). Module-level for tools/device/kernel_bench.py sweeps and the tests.
# H200, qwen3-30b-a3b experts (tools/device/moe_kernels_profile.py): at one token (8 pairs) the per-pair
# kernels take 16.7 + 11.8 + 1.3 us against 2 x 14.4 + 5.0 (sort) + 1.3 us for the sorted path; at two
# tokens 30.5 + 15.4 + 1.3 against 2 x 22.3 + 4.8 + 1.4 us; at four tokens the two paths tie (92 us).
PAIR_GEMV_MAX_PAIRS = 16
# Tile override for sweeps (kernel_bench.py, moe_kernels_profile.py): dict(gate_block_n, down_block_n, block_k,
# [down_block_k], num_warps).
PAIR_TILE_OVERRIDE: dict | None = None


def _pair_tile(num_tokens: int) -> dict:
    # H200, PDL off (tools/device/moe_kernels_profile.py, 2026-12-03): at one token the down projection took
    # 14.2 us with 64-row, K-128 tiles against 9.1 with these on qwen3-30b-a3b's experts (8 pairs, K = 768),
    # 23.9 against 14.9 on DeepSeek-V2-Lite's (6 routed + 2 shared pairs, K = 1408); gate|up unchanged.
    if PAIR_TILE_OVERRIDE is not None:
        return PAIR_TILE_OVERRIDE
    return dict(gate_block_n=16, down_block_n=32, block_k=256, num_warps=4)


def _sum_topk(y: torch.Tensor, ids: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's k rows of y summed in float32, times the flat float32 routing `weights` [T * k] when given
    (y then holds the experts' outputs; without them y's float32 rows are weighted already).

    Compiled without floating-point contraction (enable_fp_fusion=False): the weighted sum would otherwise
    compile to fma(y_k, w_k, partial) (seen in the sm_90 PTX, Triton 3.9), which skips the product's own
    rounding; without it each product is rounded to float32 and then added, the reference's rounding
    (y.float() * w summed) and the bits of the float32 rows weighted in the GEMM epilogue that this replaced."""
    out = torch.empty(num_tokens, y.shape[1], dtype=dtype, device=y.device)
    # H100 (moe_prep_bench.py): 1,024 columns a program at a prefill's 16,384 tokens (93% of the copy rate; 256
    # gave 90%); 256 at decode, where a handful of tokens should still spread over several SMs
    block = 1024 if num_tokens >= 256 else 256
    _sum_topk_kernel[(num_tokens * triton.cdiv(y.shape[1], block),)](
        y, ids, y if weights is None else weights, out, y.shape[1], y.stride(0), out.stride(0), TOP_K=top_k,
        WEIGHTED=weights is not None, BLOCK=block, num_warps=4, enable_fp_fusion=False, **pdl_args(y.device))
    return out


def _fused_experts_per_pair(x, w13, w2, topk_weights, topk_ids, act: int) -> torch.Tensor:
    num_tokens, hidden = x.shape
    inter = w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()
    tile = _pair_tile(num_tokens)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _pair_gate_up_kernel[(num_pairs, triton.cdiv(inter, tile["gate_block_n"]))](
        x, w13, h, ids, inter, hidden, top_k, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0), ACT=act,
        BLOCK_N=tile["gate_block_n"], BLOCK_K=tile["block_k"], num_warps=tile["num_warps"], **pdl_args(x.device))
    y = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _pair_down_kernel[(num_pairs, triton.cdiv(w2.shape[1], tile["down_block_n"]))](
        h, w2, y, ids, w2.shape[1], inter, h.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        BLOCK_N=tile["down_block_n"], BLOCK_K=tile.get("down_block_k", tile["block_k"]), num_warps=tile["num_warps"],
        **pdl_args(h.device))
    return _sum_topk(y, ids, num_tokens, top_k, x.dtype, weights)


# Tile override for tools/device/kernel_bench.py / moe_kernels_profile.py sweeps: dict(block_m, block_n, block_k,
# num_warps, num_stages, [n_major], [down]: the same keys but block_m for the down projection, when it differs).
GEMM_TILE_OVERRIDE: dict | None = None


def _gemm_tile(num_pairs: int, num_experts: int, max_block_m: int = 128) -> dict:
    """The grouped GEMM's tile for the gate|up projection; its optional "down" entry (same keys, block_m
    excepted: both projections walk one sort) overrides it for the down projection. max_block_m: callers
    whose kernel was not measured with taller tiles (moe_swigluoai) stop at 64."""
    if GEMM_TILE_OVERRIDE is not None:
        return GEMM_TILE_OVERRIDE
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 16:  # decode: weight-bandwidth bound, many narrow tiles keep every SM streaming
        return dict(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4)
    if per_expert <= 64:
        return dict(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3)
    # prefill: compute bound. H200, DeepSeek-V2-Lite's experts at 16K tokens (131K pairs, PDL off,
    # tools/device/moe_kernels_profile.py, 2026-12-04): 64 x 128 tiles walking the row tiles 6.22 ms a layer
    # (364 TFLOP/s), the same tiles column blocks first (n_major) 5.65, 128 x 128 n_major 4.51 (503 TFLOP/s);
    # at 4K tokens 1.64 / 1.48 / 1.19 ms
    if per_expert <= 128 or max_block_m < 128:
        return dict(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3, n_major=True)
    return dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, n_major=True)


@register("fused_experts", "triton")
def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """sum_k w_k * expert_{id_k}(x) via two grouped GEMMs over expert-sorted (token, k) pairs."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.empty(0, w2.shape[1], dtype=x.dtype, device=x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1
    act = 0 if activation == "silu" else 1
    if num_pairs <= PAIR_GEMV_MAX_PAIRS:
        return _fused_experts_per_pair(x, w13, w2, topk_weights, topk_ids, act)
    tile = _gemm_tile(num_pairs, num_experts)
    block_m = tile["block_m"]
    sorted_ids, padded_end = _align_by_expert(topk_ids, num_experts, block_m)
    e_pad = triton.next_power_of_2(num_experts)
    weights = topk_weights.reshape(-1).float().contiguous()
    num_tiles = sorted_ids.numel() // block_m

    ieee = dot_ieee(x.dtype)

    def launch(a, w, out, n_out, k_dim, a_row_div, gated):
        t = tile if gated else {**tile, **tile.get("down", {})}
        bn = t["block_n"]
        # A and W tiles per stage; the K step shrinks when not even one stage fits
        rows = block_m + (2 if gated else 1) * bn
        k_step, stages = fit_tile(t["num_stages"], t["block_k"], lambda k: (rows * k * a.element_size(), 0),
                                  a.device)
        n_major = bool(t.get("n_major", False))
        n_blocks = triton.cdiv(n_out, bn)
        grid = (num_tiles * n_blocks,) if n_major else (num_tiles, n_blocks)
        _expert_gemm_kernel[grid](
            a, w, out, sorted_ids, padded_end, n_out, k_dim, num_pairs, num_experts, a_row_div,
            a.stride(0), w.stride(0), w.stride(1), out.stride(0), GATED=gated, ACT=act, E_PAD=e_pad,
            BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=k_step, F32_DOT=interpreting(), IEEE=ieee,
            N_MAJOR=n_major, num_warps=t["num_warps"], num_stages=stages, **pdl_args(a.device))

    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    launch(x, w13, h, inter, hidden, top_k, gated=True)
    y = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    launch(h, w2, y, w2.shape[1], inter, 1, gated=False)
    return _sum_topk(y, topk_ids.reshape(-1).contiguous(), num_tokens, top_k, x.dtype, weights)
