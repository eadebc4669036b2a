"""Paged attention: KV-cache writes, and one flash-attention kernel that serves decode and varlen prefill.

A program owns one KV head and BLOCK_Q consecutive query tokens of one sequence, with all GROUP query heads
that share that KV head stacked into the rows of its tile (row r = token r // GROUP, head r % GROUP), so each
K/V tile is read once per group. Keys are gathered token by token through the block table, so a tile may
span several cache blocks of any block size. Decode (BLOCK_Q = 1) may split the context over several
programs (flash-decoding); a second kernel merges their partial softmax states. Attention sinks (one logit
per query head, GPT-OSS) join the softmax denominator where a row's state is final: at the end of the
one-split kernel, or in the merge.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from atom.envs import env_int
from atom.ops.attention import DecodePrep
from atom.ops.registry import register
from atom.ops.triton_kernels.common import dot_ieee, env_flag, fit_tile, interpreting, num_sms, unit_rows
from atom.ops.triton_kernels.fp8_common import kv_cache_consts, load_kv_scale, to_cache
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait, prefetch_line_l2

# Prefill tile: rows of queries x heads per program, keys per step, warps, pipeline depth. Module-level so
# tools/device/kernel_bench.py can sweep it.
PREFILL_TILE = dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
# programs_per_sm: decode splits a batch's contexts until every SM has about this many programs (0: never
# split); ATOM_ATTN_DECODE_PROGRAMS_PER_SM sets it for A/B runs in an engine without new wheels (at batch 32 on
# qwen3-8b, 2 gives 2 splits + a merge a layer; whether 1 split is faster there is not yet measured).
DECODE_TILE = dict(block_n=64, num_warps=4, num_stages=3,
                   programs_per_sm=env_int("ATOM_ATTN_DECODE_PROGRAMS_PER_SM", 2, 64, "programs an SM"))
# Decode splits: each sequence's keys in NUM_SPLITS equal parts (True), or parts of the batch's longest span --
# under a CUDA graph max_model_len -- so that a 1.5K-token context of a graph captured for 4K used half its
# splits (False, or ATOM_ATTN_SPLIT_PER_SEQUENCE=0: the old rule, kept for A/B runs and attn_decode_bench.py).
SPLIT_PER_SEQUENCE = env_flag("ATOM_ATTN_SPLIT_PER_SEQUENCE", True)
# Split decode programs in split-major order (grid (rows, heads, splits)) instead of head-major (rows, 1, heads *
# splits): a short context fills only a sequence's first splits, and the GPU dispatches programs in grid order, so
# head-major the working programs of the last heads queue behind the empty ones. At qwen3-8b batch 1 under a 4K graph
# (8 KV heads, 64 splits, ~200 keys: 4 working splits a head) 32 of 512 programs work, and over an FP8 cache the
# head-major kernel took 214 registers (two programs an SM on sm_90, compiled here), so heads 5-7's would wait for a
# second wave. Measured only where it cannot show (H100, 2026-12-06, 3 rounds: the bench's graphs are built for 256
# tokens, 4 splits all working): 1.00x at batch 1 / 32 / 128. Kept for the long-context graphs, and because without
# the runtime division of the grid index the FP8 kernel takes 182 registers. ATOM_ATTN_SPLIT_MAJOR=0: head-major.
SPLIT_MAJOR = env_flag("ATOM_ATTN_SPLIT_MAJOR", True)
# Decode steps with the prep inside (PREP) load each row's step metadata (query start, sequence length, position, KV
# slot: host-written) before their PDL wait (_attention_kernel's EARLY_META), taking two dependent load latencies
# off the path after the qkv GEMM. Same bits. ATOM_ATTN_EARLY_META=0 turns it (and EARLY_KV) off.
EARLY_META = env_flag("ATOM_ATTN_EARLY_META", True)
# With EARLY_META, EARLY_KV 1 has each decode program ask L2 for its first key tile's K and V lines before the wait
# (_prefetch_keys: the row's block-table entries, host-written, then one `prefetch.global.L2` a line). The keys of
# earlier steps were written by kernels that completed before the qkv GEMM started, and a prefetch reads no value,
# so nothing stale can be seen; after the wait the tile's loads find L2 instead of HBM.
# EARLY_KV 2 (the default) loads the first tile's K and V into registers before the wait instead (_early_tile):
# after the wait no load stands between the query's prep and its first scores. The program holding the new key
# stores it as before and puts the same cache-dtype values into its preloaded tile (where the pre-wait load saw the
# slot's old bytes), so the store -> barrier -> reload chain leaves its path too. Tiles over EARLY_LOAD_MAX_BYTES a
# cache fall back to the prefetch (registers: a 64-key FP8 tile is 16 a thread for K and 16 for V at 4 warps).
# Same bits. Measured (H100, 2026-12-07, 3 rounds each, A/B in one call, ms a decode step): qwen3-8b FP8 + FP8 KV
# batch 1 3.59 -> 3.54 (EARLY_META with EARLY_KV 1: 3.57), batch 32 4.32 -> 4.27; over bf16 caches (head_dim 128:
# a 16 KB tile, so EARLY_KV 1) qwen3-30b-a3b batch 1 3.58 -> 3.54, batch 32 19.12 -> 19.18 (0.98-1.01x by tok/s),
# qwen3-0.6b 1.29 / 1.55 -> 1.29 / 1.56.
# ATOM_ATTN_EARLY_KV=0 / 1: off / the prefetch.
EARLY_KV = env_int("ATOM_ATTN_EARLY_KV", 2, 2, "0 off, 1 prefetch, 2 load")
EARLY_LOAD_MAX_BYTES = 8192
# FP8 caches: dot in fp16 (e4m3 -> fp16 is one conversion a pair of values, exact; q takes the softmax scale and goes
# to fp16, p is a probability) instead of bf16 (~4 instructions a pair). The decode kernel over an FP8 cache took as
# long as over a bf16 one at half the bytes (H100, 2026-12-05, tools/device/attn_b128.py): its loop is bound by
# instructions, and this takes its loop from 754 to 558 instructions a 64-key step (tools/device/attn_sass.py,
# Triton 3.6, sm_90; 404 over a bf16 cache). On by default since the H100 run of 2026-12-06: the attention / FP8-KV /
# MLA GPU tests pass with it (315), and with the wide decode tile below it is faster at every measured point.
# ATOM_ATTN_FP8_F16_DOT=0 dots in bf16 (A/B). The interpreter dots in float32 and cannot run it.
F16_FP8_DOT = env_flag("ATOM_ATTN_FP8_F16_DOT", True)
# The decode tile with fp16 dots over an FP8 cache where a decode runs at most WIDE_TILE_MAX_SPLITS splits (batches
# that fill the SMs: qwen3-8b from batch 32 on an H100). attn_b128.py, H100 2026-12-06, qwen3-8b heads, graph replays,
# PDL off, us a call, DECODE_TILE with bf16 dots -> DECODE_TILE with fp16 dots -> this tile with fp16 dots:
#   batch 128, mean context 192: 50.1 -> 52.3 -> 48.5;   batch 128, 1,024: 173.9 -> 170.5 -> 139.3
#   batch 32, 192 (2 splits):    26.7 -> 24.3 -> 22.6;   batch 32, 1,024:  73.2 -> 64.2 -> 53.8
# (in the engine the fp16 dots at DECODE_TILE cost 0.11 ms a step at batch 128 and saved 0.06 at batch 32, as those
# kernel rows say). With more splits (small batches) the 64-key tile stays: not measured there.
F16_DECODE_TILE = dict(block_n=128, num_warps=4, num_stages=2)
WIDE_TILE_MAX_SPLITS = 2


# Caches with fewer elements than this are addressed with int32 offsets in the key loop (int64 above): the paged
# offsets' 64-bit multiply-adds were ~30% of the decode loop's instructions (tools/device/attn_sass.py).
# ATOM_ATTN_OFF32=0 keeps int64 everywhere (engine A/B).
OFF32_LIMIT = 2**31 if env_flag("ATOM_ATTN_OFF32", True) else 0


def _env_merge_warps() -> int:
    raw = os.environ.get("ATOM_ATTN_MERGE_WARPS", "4").strip()
    if raw not in ("1", "2", "4", "8"):
        raise ValueError(f"ATOM_ATTN_MERGE_WARPS must be 1, 2, 4 or 8, got {raw!r}")
    return int(raw)


# Warps of the split-decode merge (_merge_splits_kernel: [splits, head_dim] summed over the splits). The MoE top-k
# sum had the same form ([8, 256] summed over axis 0 on 4 warps) and ran at 16% of the copy rate, 5.5x slower than
# on one warp (KERNEL_NOTES stop 53: the reduction across warps goes through shared memory). The merge is small
# (latency, not bytes); ATOM_ATTN_MERGE_WARPS=1 is the A/B for tools/device/attn_b128.py, 4 until measured.
MERGE_WARPS = _env_merge_warps()


def _span(t: torch.Tensor) -> int:
    """Elements from t's first to its last, strides included (a host's cache may be a strided view of a larger
    tensor): the offsets the key loop can form stay below it."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def _f16_dot(q_dtype: torch.dtype, kv_fp8: bool) -> bool:
    return F16_FP8_DOT and kv_fp8 and q_dtype in (torch.bfloat16, torch.float16) and not interpreting()


@triton.jit
def _reshape_and_cache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, k_scale_ptr, v_scale_ptr, num_heads, head_dim,
                              block_size, k_stride_t, k_stride_h, v_stride_t, v_stride_h, kc_stride_b, kc_stride_s,
                              kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
                              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr,
                              HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr, FP8_MAX: tl.constexpr,
                              MIN_EXP: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    m = (h < num_heads) & (d < head_dim)
    key = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d, mask=m)
    val = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d, mask=m)
    key = to_cache(key, load_kv_scale(k_scale_ptr, HAS_K_SCALE), kc_ptr.dtype.element_ty, KV_FP8, FP8_MAX, MIN_EXP,
                   EMULATE)
    val = to_cache(val, load_kv_scale(v_scale_ptr, HAS_V_SCALE), vc_ptr.dtype.element_ty, KV_FP8, FP8_MAX, MIN_EXP,
                   EMULATE)
    tl.store(kc_ptr + blk * kc_stride_b + off * kc_stride_s + h * kc_stride_h + d, key, mask=m)
    tl.store(vc_ptr + blk * vc_stride_b + off * vc_stride_s + h * vc_stride_h + d, val, mask=m)


@register("reshape_and_cache", "triton")
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write key/value [T, num_kv_heads, head_dim] into the caches; slots < 0 (padding) are skipped.
    FP8 caches store key / k_scale and value / v_scale (atom.ops.attention)."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key if k_scale is None else k_scale,
        key if v_scale is None else v_scale, num_heads, head_dim, k_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        **kv_cache_consts(k_cache, k_scale, v_scale), num_warps=4, **pdl_args(key.device))


@triton.jit
def _softcapped(s, softcap):
    # softcap * tanh(s / softcap), with tanh written through exp so the interpreter runs it too
    return softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)


@triton.jit
def _load_rows(row_ptr, part_ptr, offs, mask, PARTS: tl.constexpr, part_stride):
    """row_ptr[offs] in its own dtype, or (PARTS > 0) the same elements as a split-K GEMM's float32 partials
    (part_ptr: the element of partial 0 that row_ptr's is; PARTS of them part_stride apart), added in split order
    from zero and rounded to row_ptr's dtype: what quant_fp8's _split_k_sum_kernel would have stored at row_ptr."""
    if PARTS > 0:
        acc = tl.zeros(mask.shape, tl.float32)
        for s in tl.static_range(PARTS):
            acc += tl.load(part_ptr + s * part_stride + offs, mask=mask, other=0.0)
        return acc.to(row_ptr.dtype.element_ty)
    return tl.load(row_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _norm_rope_rows(row_ptr, row_ok, d, w_ptr, eps, cs_row, head_dim, rot_half, NORM: tl.constexpr,
                    IS_NEOX: tl.constexpr, part_ptr, PARTS: tl.constexpr, part_stride):
    """Rows of q or k (row_ptr [R, 1]: each row's first element; row_ok [R, 1]) RMS-normalized (NORM, weight
    w_ptr) and rotated by the cos / sin row cs_row (cos then sin, rot_half each), in the rows' dtype: the
    arithmetic and roundings of qk_norm_rope_cache's _norm_rope_heads, laid out over d [BLOCK_D] instead of
    the two rotation halves (each element reads its rotation partner). PARTS > 0: the rows are read as split-K
    partials (_load_rows; part_ptr [R, 1] the partials' elements matching row_ptr's)."""
    dd = d[None, :]
    m = row_ok & (dd < head_dim)
    x = _load_rows(row_ptr, part_ptr, dd, m, PARTS, part_stride)
    dt = x.dtype
    xf = x.to(tl.float32)
    rot = dd < 2 * rot_half
    if IS_NEOX:
        first = dd < rot_half
        partner = tl.where(first, dd + rot_half, dd - rot_half)
        ci = tl.where(first, dd, dd - rot_half)
    else:
        first = dd % 2 == 0
        partner = tl.where(first, dd + 1, dd - 1)
        ci = dd // 2
    xp = _load_rows(row_ptr, part_ptr, partner, m & rot, PARTS, part_stride).to(tl.float32)
    if NORM:
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1, keep_dims=True) / head_dim + eps)
        w = tl.load(w_ptr + dd, mask=dd < head_dim, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=rot & (dd < head_dim), other=0.0).to(tl.float32)
        xf = ((xf * rstd).to(dt).to(tl.float32) * w).to(dt).to(tl.float32)
        xp = ((xp * rstd).to(dt).to(tl.float32) * wp).to(dt).to(tl.float32)
    cos = tl.load(cs_row + ci, mask=rot, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + rot_half + ci, mask=rot, other=0.0).to(tl.float32)
    o = tl.where(first, xf * cos - xp * sin, xf * cos + xp * sin)
    return tl.where(rot, o, xf).to(dt)


@triton.jit
def _kv_offsets(start, hi, bt_ptr, b, bt_stride, kvh, kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s,
                vc_stride_h, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, OFF32: tl.constexpr, KV_ALIGN: tl.constexpr,
                PARTIAL: tl.constexpr):
    """The tile of BLOCK_N keys from `start`: their positions, which are below `hi`, and their K and V rows'
    offsets in the caches (through the block table)."""
    k_pos = start + tl.arange(0, BLOCK_N)
    k_ok = k_pos < hi
    if PARTIAL:
        blk = tl.load(bt_ptr + b.to(tl.int64) * bt_stride + k_pos // PAGE, mask=k_ok, other=0)
    else:
        blk = tl.load(bt_ptr + b.to(tl.int64) * bt_stride + k_pos // PAGE)
    in_blk = k_pos % PAGE
    if not OFF32:  # int32 offsets where every element of both caches is within 2^31 of its start
        blk = blk.to(tl.int64)
        in_blk = in_blk.to(tl.int64)
    # offsets come from the block table, so the compiler cannot see they are aligned: say so, or the
    # K/V rows are read element by element instead of in 16-byte vectors
    k_off = tl.multiple_of(blk * kc_stride_b + in_blk * kc_stride_s + kvh * kc_stride_h, KV_ALIGN)
    v_off = tl.multiple_of(blk * vc_stride_b + in_blk * vc_stride_s + kvh * vc_stride_h, KV_ALIGN)
    return k_pos, k_ok, k_off, v_off


@triton.jit
def _load_k(kc_ptr, k_off, k_ok, d, d_ok, PARTIAL: tl.constexpr):
    """The tile's keys, transposed ([BLOCK_D, BLOCK_N]), in the cache's dtype; masked keys (PARTIAL) read 0."""
    if PARTIAL:
        return tl.load(kc_ptr + k_off[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    return tl.load(kc_ptr + k_off[None, :] + d[:, None], mask=d_ok[:, None], other=0.0)


@triton.jit
def _load_v(vc_ptr, v_off, k_ok, d, d_ok, PARTIAL: tl.constexpr):
    """The tile's values ([BLOCK_N, BLOCK_D]) in the cache's dtype; masked keys (PARTIAL) read 0."""
    if PARTIAL:
        return tl.load(vc_ptr + v_off[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    return tl.load(vc_ptr + v_off[:, None] + d[None, :], mask=d_ok[None, :], other=0.0)


@triton.jit
def _dot_operand(x, DOT_DTYPE: tl.constexpr, F32_DOT: tl.constexpr, F16_DOT: tl.constexpr, KV_FP8: tl.constexpr):
    """Cache values as the key walk's dots take them."""
    if F32_DOT:
        x = x.to(tl.float32)
    elif F16_DOT:  # e4m3 -> fp16 is exact, one conversion a pair (to bf16 it takes ~4 instructions a pair)
        x = x.to(tl.float16)
    elif KV_FP8:  # e4m3 -> bf16 is exact
        x = x.to(DOT_DTYPE)
    return x


@triton.jit
def _new_key_rows(k_raw_ptr, v_raw_ptr, kp_ptr, vp_ptr, q_start, kvh, head_dim, k_raw_stride_t, v_raw_stride_t, ok,
                  d, d_ok, kw_ptr, eps, cs_row, rot_half, NORM: tl.constexpr, IS_NEOX: tl.constexpr,
                  PREP_PARTS: tl.constexpr, part_stride):
    """The step's key of KV head kvh, normalized and rotated, and its value ([1, BLOCK_D] each, the rows' dtype), for
    the decode prep's store; ok [1, 1]: whether to read them (0 elsewhere)."""
    k_off = q_start * k_raw_stride_t + kvh * head_dim + tl.zeros([1, 1], tl.int64)
    v_off = q_start * v_raw_stride_t + kvh * head_dim
    if PREP_PARTS > 0:
        kp_row, vp_row = kp_ptr + k_off, vp_ptr + v_off
    else:
        kp_row, vp_row = k_raw_ptr + k_off, v_raw_ptr + v_off
    k_new = _norm_rope_rows(k_raw_ptr + k_off, ok, d, kw_ptr, eps, cs_row, head_dim, rot_half, NORM, IS_NEOX, kp_row,
                            PREP_PARTS, part_stride)
    v_new = _load_rows(v_raw_ptr + v_off, vp_row, d[None, :], d_ok[None, :] & ok, PREP_PARTS, part_stride)
    return k_new, v_new


@triton.jit
def _key_tile(q, m_i, l_i, acc, start, hi, q_pos, kc_ptr, vc_ptr, bt_ptr, b, bt_stride, kvh, kc_stride_b, kc_stride_s,
              kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, d, d_ok, scale, qk_scale, softcap, window,
              DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, OFF32: tl.constexpr,
              KV_ALIGN: tl.constexpr, F32_DOT: tl.constexpr, F16_DOT: tl.constexpr, KV_FP8: tl.constexpr,
              IEEE: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, BLOCK_Q: tl.constexpr,
              PARTIAL: tl.constexpr, PRELOADED: tl.constexpr = False, k_pre=0, v_pre=0, new_at=-1, k_new=0,
              v_new=0):
    """One tile of BLOCK_N keys from `start` into the online softmax (m_i, l_i, acc). PARTIAL: the tile may run past
    `hi` (the last one), so its keys are masked; whole tiles load and score without bounds masks.
    PRELOADED (EARLY_KV 2, with PARTIAL): the tile's K and V were loaded before the PDL wait (_early_tile, cache
    dtype); key `new_at` (-1: none) was stored after that load, and its K and V rows are k_new / v_new ([BLOCK_D],
    the stored values as _dot_operand gives them), put in place of what the early load saw."""
    if PRELOADED:
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        k = _dot_operand(k_pre, DOT_DTYPE, F32_DOT, F16_DOT, KV_FP8)
        k = tl.where((k_pos == new_at)[None, :], k_new[:, None], k)
    else:
        k_pos, k_ok, k_off, v_off = _kv_offsets(start, hi, bt_ptr, b, bt_stride, kvh, kc_stride_b, kc_stride_s,
                                                kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, BLOCK_N, PAGE,
                                                OFF32, KV_ALIGN, PARTIAL)
        k = _dot_operand(_load_k(kc_ptr, k_off, k_ok, d, d_ok, PARTIAL), DOT_DTYPE, F32_DOT, F16_DOT, KV_FP8)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    if USE_SOFTCAP:
        s = _softcapped(s if F16_DOT else s * scale, softcap) * 1.4426950408889634
    elif F16_DOT:
        s = s * 1.4426950408889634
    else:
        s = s * qk_scale
    # one query a tile (BLOCK_Q == 1): every key below hi (<= its position + 1) is visible to it
    if BLOCK_Q > 1:
        ok = k_pos[None, :] <= q_pos[:, None]
        if PARTIAL:
            ok = ok & k_ok[None, :]
        if USE_WINDOW:
            ok = ok & ((q_pos[:, None] - k_pos[None, :]) < window)
        s = tl.where(ok, s, float("-inf"))
    elif PARTIAL or USE_WINDOW:
        ok = k_ok[None, :]
        if USE_WINDOW:
            ok = ok & ((q_pos[:, None] - k_pos[None, :]) < window)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if PRELOADED:
        v = _dot_operand(v_pre, DOT_DTYPE, F32_DOT, F16_DOT, KV_FP8)
        v = tl.where((k_pos == new_at)[:, None], v_new[None, :], v)
    else:
        v = _dot_operand(_load_v(vc_ptr, v_off, k_ok, d, d_ok, PARTIAL), DOT_DTYPE, F32_DOT, F16_DOT, KV_FP8)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def flat_row_tile(qsl_ptr, num_rows, BLOCK_Q: tl.constexpr, ROWS_PAD: tl.constexpr):
    """(row, query tile) of this program on a grid whose axis 0 enumerates (row, query tile) pairs: row b's tiles
    start at program qsl[b] // BLOCK_Q + b, so every row gets at least its ceil(q_len / BLOCK_Q) programs and all
    rows fit in T // BLOCK_Q + num_rows programs for T queries; the row is the count of rows starting at or before
    the program, minus one (one vector load of the num_rows <= ROWS_PAD starts). A tile at or past its row's
    queries is the caller's to skip."""
    p = tl.program_id(0)
    rows = tl.arange(0, ROWS_PAD)
    starts = tl.load(qsl_ptr + rows, mask=rows < num_rows, other=2**30) // BLOCK_Q + rows
    b = tl.sum((starts <= p).to(tl.int32), axis=0) - 1
    return b, p - (tl.load(qsl_ptr + b) // BLOCK_Q + b)


@triton.jit
def _program_keys(seq_len, q_len, q_tile, split, window, tokens_per_split, BLOCK_Q: tl.constexpr,
                  USE_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the keys of this program's query tile (causal up to its last query, sliding window from its
    first) and, split, of its split. Splitting a sequence's own keys (tokens_per_split 0), a split past them has
    lo >= hi."""
    ctx = seq_len - q_len  # cached prefix before this sequence's queries
    hi = tl.minimum(seq_len, ctx + tl.minimum((q_tile + 1) * BLOCK_Q, q_len))
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(0, ctx + q_tile * BLOCK_Q - window + 1)
    if NUM_SPLITS > 1:
        span = tokens_per_split
        if span == 0:  # this sequence's own keys in equal parts (not the batch's longest context, nor the
            span = _split_span(hi - lo, NUM_SPLITS, BLOCK_N)  # max_model_len of a CUDA graph)
        lo = lo + split * span
        hi = tl.minimum(hi, lo + span)
    return lo, hi


@triton.jit
def _first_tile(bt_ptr, b, bt_stride, seq_len, q_len, window, tokens_per_split, kc_stride_b, kc_stride_s, kc_stride_h,
                vc_stride_b, vc_stride_s, vc_stride_h, NUM_SPLITS: tl.constexpr, SPLIT_MAJOR: tl.constexpr,
                USE_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, OFF32: tl.constexpr,
                KV_ALIGN: tl.constexpr):
    """EARLY_KV (decode, before pdl_wait): this program's first key tile as _key_tile(PARTIAL) addresses it, from the
    row's block-table entries (host-written step metadata): (which keys are in range, K rows' offsets, V rows'). A
    padded row (no query) of a CUDA graph has none."""
    kvh, split = split_coords(NUM_SPLITS, SPLIT_MAJOR)
    lo, hi = _program_keys(seq_len, q_len, 0, split, window, tokens_per_split, 1, USE_WINDOW, NUM_SPLITS, BLOCK_N)
    _, k_ok, k_off, v_off = _kv_offsets(lo, tl.where(q_len > 0, hi, lo), bt_ptr, b, bt_stride, kvh, kc_stride_b,
                                        kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, BLOCK_N, PAGE,
                                        OFF32, KV_ALIGN, True)
    return k_ok, k_off, v_off


@triton.jit
def _prefetch_keys(kc_ptr, vc_ptr, k_ok, k_off, v_off, head_dim, LINE: tl.constexpr, LINES: tl.constexpr,
                   ASM: tl.constexpr):
    """EARLY_KV 1 (before pdl_wait): ask L2 for the K and V lines (LINES of LINE elements a row) of the first key
    tile (_first_tile); prefetched, not loaded. ASM False (the interpreter, which runs no inline assembly): the same
    addresses are loaded instead and dropped."""
    col = (tl.arange(0, LINES) * LINE)[None, :]
    ok = k_ok[:, None] & (col < head_dim)
    k_rows = tl.where(ok, kc_ptr + k_off[:, None] + col, kc_ptr)  # masked lanes: the cache's first line, harmless
    v_rows = tl.where(ok, vc_ptr + v_off[:, None] + col, vc_ptr)
    if ASM:
        prefetch_line_l2(k_rows)
        prefetch_line_l2(v_rows)
    else:
        tl.load(k_rows)
        tl.load(v_rows)


@triton.jit
def _early_tile(kc_ptr, vc_ptr, k_ok, k_off, v_off, head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """EARLY_KV 2 (before pdl_wait): the first key tile's (_first_tile) K ([BLOCK_D, BLOCK_N]) and V ([BLOCK_N,
    BLOCK_D]) in the cache dtype, as _key_tile(PARTIAL) loads them: earlier steps' keys and values, which kernels
    that completed before the qkv GEMM started wrote; the new key's slot, stored by this kernel after the wait, is
    read stale here and replaced from registers by _key_tile."""
    d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        d_ok = tl.full([BLOCK_D], 1, tl.int1)
    else:
        d_ok = d < head_dim
    return _load_k(kc_ptr, k_off, k_ok, d, d_ok, True), _load_v(vc_ptr, v_off, k_ok, d, d_ok, True)


@triton.jit
def _holds_new_key(lo, hi, seq_len, slot):
    """Whether the program walking keys [lo, hi) is the one that stores the step's new key (a slot of -1: none)."""
    return (hi == seq_len) & (lo < hi) & (slot >= 0)


@triton.jit
def _decode_meta(qsl_ptr, seq_lens_ptr, pos_ptr, slot_ptr, b):
    """Row b's (query start, query length, sequence length, position, KV slot) of a decode step (PREP): values the
    host writes before the step's first kernel, which _attention_kernel may load before its PDL wait (EARLY_META)."""
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    q_len = (tl.load(qsl_ptr + b + 1) - q_start).to(tl.int32)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    pos = tl.load(pos_ptr + q_start).to(tl.int64)
    slot = tl.load(slot_ptr + q_start).to(tl.int64)
    return q_start, q_len, seq_len, pos, slot


# do_not_specialize: the block-table row stride (the widest table of an eager batch) changes from batch to
# batch; Triton would compile again each time it turns 1 or a multiple of 16, for a divisibility hint that
# this scalar offset does not use (tools/triton_specializations.py counts the compiles).
@triton.jit(do_not_specialize=["bt_stride"])
def _attention_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    k_scale_ptr, v_scale_ptr, sinks_ptr, scale, softcap, window, head_dim, tokens_per_split,
    num_heads,
    q_stride_t, q_stride_h, out_stride_t, out_stride_h,
    kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, bt_stride,
    pos_ptr, k_raw_ptr, v_raw_ptr, qw_ptr, kw_ptr, cs_ptr, slot_ptr, eps, k_raw_stride_t, v_raw_stride_t, cs_stride,
    rot_half,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE: tl.constexpr, EVEN_D: tl.constexpr, OFF32: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr,
    F32_DOT: tl.constexpr, F16_DOT: tl.constexpr, IEEE: tl.constexpr, KV_ALIGN: tl.constexpr, KV_FP8: tl.constexpr,
    HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr, USE_SINKS: tl.constexpr, PREP: tl.constexpr,
    NORM: tl.constexpr, IS_NEOX: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr,
    EMULATE: tl.constexpr, PDL: tl.constexpr, max_ptr=None, max_stride_t=0, MAXIMA: tl.constexpr = False,
    num_rows=0, FLAT: tl.constexpr = False, ROWS_PAD: tl.constexpr = 1,
    qp_ptr=None, kp_ptr=None, vp_ptr=None, part_stride=0, PREP_PARTS: tl.constexpr = 0,
    SPLIT_MAJOR: tl.constexpr = False, EARLY_META: tl.constexpr = False, EARLY_KV: tl.constexpr = 0,
    KV_LINE: tl.constexpr = 1, KV_LINES: tl.constexpr = 1, KV_ASM: tl.constexpr = True,
):
    """MAXIMA: where this program stores outputs (not split partials), also each row's absolute maximum over its
    head_dim values as stored, at max_ptr[token, head] (float32): per-head maxima of the o_proj input, whose max
    over the heads is the row's (an FP8 o_proj quantizing per token takes them: fp8_linear_rowmax).

    PREP (decode only: one query a sequence): q_ptr holds the raw queries and k_raw / v_raw this step's raw
    keys and values; the program normalizes and rotates its query heads itself, and the program whose keys end
    at the sequence's new key first normalizes, rotates and stores that key (and its value) in the cache, then
    walks its keys as usual (qk_norm_rope_cache's work, without its launch; no other program reads the new key).
    PREP_PARTS > 0: q / k_raw / v_raw were left unwritten by a split-K qkv GEMM, whose float32 partials qp / kp / vp
    (same element strides, PREP_PARTS of them part_stride apart) the prep adds itself (_load_rows: the values the
    sum kernel would have stored), one kernel fewer.

    FLAT (queries of more than one token a row): axis 0 enumerates (row, query tile) pairs instead of rows x the
    longest row's tiles. Row b's tiles start at program qsl[b] // BLOCK_Q + b (each row gets at least its
    ceil(q_len / BLOCK_Q) programs, and all rows fit in T // BLOCK_Q + num_rows programs for T queries); a program
    finds its row by counting the rows that start at or before it (one vector load of the num_rows <= ROWS_PAD
    starts). With a long prefill beside many decode rows, or a CUDA graph sized for more rows and queries than a
    step has, the grid no longer holds rows x longest-row programs that return at once.

    EARLY_META (PREP, not FLAT): the row's step metadata (query start and length, sequence length, position, KV
    slot) is loaded before pdl_wait: the host writes it before the step's first kernel, and only the kernel right
    before this one (the qkv GEMM) may still run during a PDL wait, so under PDL those dependent loads pass while
    it finishes instead of after. Same values, same bits.

    EARLY_KV (with EARLY_META): 1, the program's first key tile is asked into L2 before the wait (_prefetch_keys);
    2, it is loaded into registers before the wait (_early_tile) and walked first, the new key put in from registers
    by the program that stores it (_key_tile's PRELOADED)."""
    if not FLAT:
        b = tl.program_id(0)
        q_tile = 0 if SPLIT_MAJOR else tl.program_id(1)  # split-major decode grids have one query tile
    if EARLY_META:  # host-written step metadata only: see the docstring
        q_start, q_len, seq_len, pos, slot = _decode_meta(qsl_ptr, seq_lens_ptr, pos_ptr, slot_ptr, b)
    if EARLY_KV > 0:  # earlier steps' keys and values: prefetched (1) or loaded (2; the new key's slot is replaced
        # later): see EARLY_KV
        first_ok, first_k, first_v = _first_tile(bt_ptr, b, bt_stride, seq_len, q_len, window, tokens_per_split,
                                                 kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s,
                                                 vc_stride_h, NUM_SPLITS, SPLIT_MAJOR, USE_WINDOW, BLOCK_N, PAGE,
                                                 OFF32, KV_ALIGN)
        if EARLY_KV == 1:
            _prefetch_keys(kc_ptr, vc_ptr, first_ok, first_k, first_v, head_dim, KV_LINE, KV_LINES, KV_ASM)
        else:
            k_pre, v_pre = _early_tile(kc_ptr, vc_ptr, first_ok, first_k, first_v, head_dim, BLOCK_D, EVEN_D)
    pdl_wait(PDL)
    if FLAT:
        b, q_tile = flat_row_tile(qsl_ptr, num_rows, BLOCK_Q, ROWS_PAD)
    kvh, split = split_coords(NUM_SPLITS, SPLIT_MAJOR)

    if not EARLY_META:
        q_start = tl.load(qsl_ptr + b).to(tl.int64)
        q_len = (tl.load(qsl_ptr + b + 1) - q_start).to(tl.int32)
    if q_tile * BLOCK_Q >= q_len:
        return
    if not EARLY_META:
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    ctx = seq_len - q_len  # cached prefix before this sequence's queries

    r = tl.arange(0, BLOCK_M)
    qi = q_tile * BLOCK_Q + r // GROUP
    head = kvh * GROUP + r % GROUP
    row_ok = (r < BLOCK_Q * GROUP) & (qi < q_len)
    q_pos = ctx + qi
    d = tl.arange(0, BLOCK_D)
    if EVEN_D:  # head_dim == BLOCK_D: no column masks
        d_ok = tl.full([BLOCK_D], 1, tl.int1)
    else:
        d_ok = d < head_dim
    if PREP:
        if not EARLY_META:
            pos = tl.load(pos_ptr + q_start).to(tl.int64)
        cs_row = cs_ptr + pos * cs_stride
        q_off = (q_start + qi)[:, None] * q_stride_t + head[:, None] * q_stride_h
        if PREP_PARTS > 0:
            qp_row = qp_ptr + q_off
        else:  # no partials (qp_ptr None): any pointer, never read
            qp_row = q_ptr + q_off
        if EARLY_KV == 2:  # the new key's rows read beside the queries' (masked off in the other programs): the
            # program storing it, the layer's slowest, no longer waits for q's prep before it loads them
            lo_n, hi_n = _program_keys(seq_len, q_len, q_tile, split, window, tokens_per_split, BLOCK_Q, USE_WINDOW,
                                       NUM_SPLITS, BLOCK_N)
            holds = _holds_new_key(lo_n, hi_n, seq_len, slot)
            k_new, v_new = _new_key_rows(k_raw_ptr, v_raw_ptr, kp_ptr, vp_ptr, q_start, kvh, head_dim, k_raw_stride_t,
                                         v_raw_stride_t, tl.zeros([1, 1], tl.int32) + tl.where(holds, 1, 0) > 0, d,
                                         d_ok, kw_ptr, eps, cs_row, rot_half, NORM, IS_NEOX, PREP_PARTS, part_stride)
        q = _norm_rope_rows(q_ptr + q_off, row_ok[:, None], d, qw_ptr, eps, cs_row, head_dim, rot_half, NORM, IS_NEOX,
                            qp_row, PREP_PARTS, part_stride)
    else:
        q = tl.load(q_ptr + (q_start + qi)[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_K_SCALE:  # an FP8 key is k_cache * k_scale: q.k scales by it
        scale = scale * tl.load(k_scale_ptr).to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    if F32_DOT:
        q = q.to(tl.float32)
    elif F16_DOT:  # the softmax scale rides on q (fp16's range; exact otherwise up to fp16's 11 bits)
        q = (q.to(tl.float32) * scale).to(tl.float16)

    # keys this tile can see: causal up to its last query, sliding window from its first; this split's part
    lo, hi = _program_keys(seq_len, q_len, q_tile, split, window, tokens_per_split, BLOCK_Q, USE_WINDOW, NUM_SPLITS,
                           BLOCK_N)
    if NUM_SPLITS > 1:
        if (tokens_per_split == 0) & (lo >= hi):  # past this sequence's keys: no state to store, the merge does
            return  # not read this split

    if EARLY_KV == 2:  # the new key's K / V rows as the walk's dots take them, where this program stores it
        new_at = -1
        k_new_dot = _dot_operand(tl.zeros([BLOCK_D], tl.float32).to(kc_ptr.dtype.element_ty), q_ptr.dtype.element_ty,
                                 F32_DOT, F16_DOT, KV_FP8)
        v_new_dot = k_new_dot
    if PREP:
        if not EARLY_META:
            slot = tl.load(slot_ptr + q_start).to(tl.int64)
        if _holds_new_key(lo, hi, seq_len, slot):  # this program's keys end at the new one: store it first
            if EARLY_KV != 2:  # (EARLY_KV 2 read them with the queries)
                k_new, v_new = _new_key_rows(k_raw_ptr, v_raw_ptr, kp_ptr, vp_ptr, q_start, kvh, head_dim,
                                             k_raw_stride_t, v_raw_stride_t, tl.full([1, 1], 1, tl.int1), d, d_ok,
                                             kw_ptr, eps, cs_row, rot_half, NORM, IS_NEOX, PREP_PARTS, part_stride)
            blk_new = slot // PAGE
            in_new = slot % PAGE
            k_c = to_cache(k_new, load_kv_scale(k_scale_ptr, HAS_K_SCALE), kc_ptr.dtype.element_ty, KV_FP8, FP8_MAX,
                           MIN_EXP, EMULATE)
            v_c = to_cache(v_new, load_kv_scale(v_scale_ptr, HAS_V_SCALE), vc_ptr.dtype.element_ty, KV_FP8, FP8_MAX,
                           MIN_EXP, EMULATE)
            tl.store(kc_ptr + blk_new * kc_stride_b + in_new * kc_stride_s + kvh * kc_stride_h + d[None, :], k_c,
                     mask=d_ok[None, :])
            tl.store(vc_ptr + blk_new * vc_stride_b + in_new * vc_stride_s + kvh * vc_stride_h + d[None, :], v_c,
                     mask=d_ok[None, :])
            if EARLY_KV == 2:  # what a load of the stored rows gives (columns past head_dim read 0)
                new_at = seq_len - 1
                k_new_dot = tl.where(d_ok, _dot_operand(tl.reshape(k_c, [BLOCK_D]), q_ptr.dtype.element_ty, F32_DOT,
                                                        F16_DOT, KV_FP8), 0.0)
                v_new_dot = tl.where(d_ok, _dot_operand(tl.reshape(v_c, [BLOCK_D]), q_ptr.dtype.element_ty, F32_DOT,
                                                        F16_DOT, KV_FP8), 0.0)
        tl.debug_barrier()  # those stores visible to every thread of the program before the walk reads them

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # whole key tiles without bounds masks, then the partial one (if any) with them
    hi_full = lo + (hi - lo) // BLOCK_N * BLOCK_N
    first = lo  # the first full tile the loop loads
    if EARLY_KV == 2:  # the first tile, preloaded, masked as a partial one (a whole tile's masks are all true)
        if lo < hi:
            m_i, l_i, acc = _key_tile(q, m_i, l_i, acc, lo, hi, q_pos, kc_ptr, vc_ptr, bt_ptr, b, bt_stride, kvh,
                                      kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, d,
                                      d_ok, scale, qk_scale, softcap, window, q_ptr.dtype.element_ty, BLOCK_N, PAGE,
                                      OFF32, KV_ALIGN, F32_DOT, F16_DOT, KV_FP8, IEEE, USE_SOFTCAP, USE_WINDOW,
                                      BLOCK_Q, True, True, k_pre, v_pre, new_at, k_new_dot, v_new_dot)
        first = lo + BLOCK_N
    for start in range(first, hi_full, BLOCK_N):
        m_i, l_i, acc = _key_tile(q, m_i, l_i, acc, start, hi, q_pos, kc_ptr, vc_ptr, bt_ptr, b, bt_stride, kvh,
                                  kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, d,
                                  d_ok, scale, qk_scale, softcap, window, q_ptr.dtype.element_ty, BLOCK_N, PAGE,
                                  OFF32, KV_ALIGN, F32_DOT, F16_DOT, KV_FP8, IEEE, USE_SOFTCAP, USE_WINDOW, BLOCK_Q,
                                  False)
    tail = hi_full < hi
    if EARLY_KV == 2:
        tail = tail & (hi_full >= first)  # unless the partial tile was the preloaded first one
    if tail:
        m_i, l_i, acc = _key_tile(q, m_i, l_i, acc, hi_full, hi, q_pos, kc_ptr, vc_ptr, bt_ptr, b, bt_stride, kvh,
                                  kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, d,
                                  d_ok, scale, qk_scale, softcap, window, q_ptr.dtype.element_ty, BLOCK_N, PAGE,
                                  OFF32, KV_ALIGN, F32_DOT, F16_DOT, KV_FP8, IEEE, USE_SOFTCAP, USE_WINDOW, BLOCK_Q,
                                  True)

    if HAS_V_SCALE:  # an FP8 value is v_cache * v_scale
        acc = acc * tl.load(v_scale_ptr).to(tl.float32)
    tok = q_start + qi
    if NUM_SPLITS == 1:
        if USE_SINKS:  # the sink's exp joins the denominator (log2 units, like m_i)
            sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            m_fin = tl.maximum(m_i, sink)
            rescale = tl.exp2(m_i - m_fin)
            l_i = l_i * rescale + tl.exp2(sink - m_fin)
            acc = acc * rescale[:, None]
        out = (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + tok[:, None] * out_stride_t + head[:, None] * out_stride_h + d[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :])
        if MAXIMA:
            row_max = tl.max(tl.where(d_ok[None, :], tl.abs(out.to(tl.float32)), 0.0), axis=1)
            tl.store(max_ptr + tok * max_stride_t + head, row_max, mask=row_ok)
    else:
        part = (tok * num_heads + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def split_coords(NUM_SPLITS: tl.constexpr, SPLIT_MAJOR: tl.constexpr):
    """(head, split) of this program. SPLIT_MAJOR (decode launches of NUM_SPLITS > 1 and one query tile): the grid is
    (rows, heads, splits), so that the working splits of a short context come first in dispatch order; else
    (rows, query tiles, heads * NUM_SPLITS), head-major. `head`: a KV head, or MLA's head tile."""
    if SPLIT_MAJOR:
        return tl.program_id(1), tl.program_id(2)
    else:
        return tl.program_id(2) // NUM_SPLITS, tl.program_id(2) % NUM_SPLITS


@triton.jit
def _split_span(keys, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys a split takes when a sequence's `keys` go in NUM_SPLITS equal parts of whole key tiles (at least
    one tile: a sequence with no keys fills no split)."""
    return tl.cdiv(tl.cdiv(tl.maximum(keys, 1), NUM_SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _merge_splits_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, sinks_ptr, seq_lens_ptr, window,
                         per_sequence, num_heads, head_dim, out_stride_t, out_stride_h, NUM_SPLITS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_SINKS: tl.constexpr, PDL: tl.constexpr,
                         max_ptr=None, max_stride_t=0, MAXIMA: tl.constexpr = False):
    """One decode token's head: its splits' partial softmax states merged (token t is sequence t's query).
    per_sequence: the splits cut the sequence's own keys (window-limited), and only those that hold keys
    stored a state; otherwise every split did."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    base = (t * num_heads + h) * NUM_SPLITS
    filled = NUM_SPLITS
    if per_sequence != 0:
        keys = tl.load(seq_lens_ptr + t)
        if window > 0:
            keys = tl.minimum(keys, window)
        filled = tl.cdiv(keys, _split_span(keys, NUM_SPLITS, BLOCK_N))
    s_ok = s < filled
    m = tl.load(part_m_ptr + base + s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + base + s, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_ref)
    l_tot = tl.sum(l_s * w, axis=0)
    if USE_SINKS:
        l_tot += tl.exp2(sink - m_ref)
    acc = tl.load(part_acc_ptr + (base + s)[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    out = (tl.sum(acc * w[:, None], axis=0) / tl.where(l_tot == 0.0, 1.0, l_tot)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * out_stride_t + h * out_stride_h + d, out, mask=d < head_dim)
    if MAXIMA:  # as _attention_kernel's (its unsplit store)
        tl.store(max_ptr + t * max_stride_t + h + tl.arange(0, 1),
                 tl.max(tl.where(d < head_dim, tl.abs(out.to(tl.float32)), 0.0), axis=0, keep_dims=True))


def _tokens_per_split(per_sequence: bool, span: int, num_splits: int, block_n: int) -> int:
    """The kernels' tokens_per_split argument: 0 = each sequence's own keys in num_splits parts (SPLIT_PER_SEQUENCE,
    in the kernel), else parts of `span` (the batch's longest context; a CUDA graph's max_model_len)."""
    return 0 if per_sequence else triton.cdiv(triton.cdiv(span, num_splits), block_n) * block_n


def _decode_splits(device: torch.device, batch: int, num_kv_heads: int, max_seq_len: int, block_n: int) -> int:
    """Enough splits to give every SM a few programs, none shorter than one key tile; a power of two.
    (A floor of 4 tiles left small batches at short contexts on a handful of programs: at batch 1 and
    256 tokens, 8 programs walking 4 tiles each; one tile took a qwen3-0.6b decode step on an H200 from
    1.34 to 1.25 ms, with larger batches unchanged.)"""
    programs = batch * num_kv_heads
    want = triton.cdiv(DECODE_TILE["programs_per_sm"] * num_sms(device), max(programs, 1))
    most = max(1, max_seq_len // block_n)
    splits = min(want, most, 64)
    return 1 if splits <= 1 else triton.next_power_of_2(splits)


def paged_attention_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    prep: DecodePrep | None = None,
    maxima: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention` with the decode split count open to callers (tests force the merge path) and, for
    hosts that own the output buffer (atom-vllm), `out`: [num_tokens, num_heads, head_dim], unit last stride.
    maxima (float32 [num_tokens, num_heads], unit last stride): filled with each output row's absolute maximum
    over head_dim, as stored (the o_proj input's per-head maxima: fp8_linear_rowmax).
    prep (decode steps: one query a sequence): q is raw (before qk-norm and rope) and the kernel does
    qk_norm_rope_cache's work for the step's keys and values itself (see _attention_kernel)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    batch = seq_lens.shape[0]
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} (last stride {out.stride(-1)}) must be q's shape {tuple(q.shape)} "
                         "with a unit last stride")
    if maxima is not None and (tuple(maxima.shape) != (num_tokens, num_heads) or maxima.dtype != torch.float32
                               or maxima.stride(-1) != 1):
        raise ValueError(f"maxima {tuple(maxima.shape)} {maxima.dtype} must be float32 [{num_tokens}, {num_heads}] "
                         "with a unit last stride")
    max_args = dict(max_ptr=maxima, max_stride_t=maxima.stride(0), MAXIMA=True) if maxima is not None else {}
    if num_tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    # keys one decode query can see: a windowed layer splits its window, not the whole context
    span = min(max_seq_len, sliding_window) if sliding_window else max_seq_len
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    block_d = triton.next_power_of_2(head_dim)
    kv = kv_cache_consts(k_cache, k_scale, v_scale)
    f16_dot = _f16_dot(q.dtype, kv["KV_FP8"])
    if max_query_len == 1:
        tile = DECODE_TILE
        if num_splits is None:
            num_splits = _decode_splits(q.device, batch, num_kv_heads, span, tile["block_n"])
        if num_splits <= WIDE_TILE_MAX_SPLITS and f16_dot:
            tile = F16_DECODE_TILE
        block_q, block_n = 1, tile["block_n"]
    else:
        tile = PREFILL_TILE
        block_q, block_n = max(1, tile["block_m"] // group), tile["block_n"]
        num_splits = 1
    block_m = max(16, triton.next_power_of_2(block_q * group))
    elem = max(k_cache.element_size(), q.element_size())
    # per stage the K and V tiles; once the q tile and p (the second dot's operand)
    block_n, num_stages = fit_tile(tile["num_stages"], block_n,
                                   lambda n: (2 * n * block_d * elem, block_m * (block_d + n) * elem), q.device)
    # per sequence needs one query a sequence (token t = sequence t: the merge reads sequence t's length)
    tokens_per_split = _tokens_per_split(SPLIT_PER_SEQUENCE and num_tokens == batch, span, num_splits, block_n)
    if num_splits > 1:
        part_m = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(num_tokens, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out
    kv_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3])
    kv_align = 16 if all(st % 16 == 0 for st in kv_strides) else 1
    flat = block_q > 1  # (row, query tile) pairs on axis 0: see _attention_kernel's FLAT
    if flat:
        grid = (num_tokens // block_q + batch, 1, num_kv_heads * num_splits)
        flat_args = dict(num_rows=batch, FLAT=True, ROWS_PAD=triton.next_power_of_2(batch))
    else:
        grid = (batch, triton.cdiv(max_query_len, block_q), num_kv_heads * num_splits)
        flat_args = {}
    split_major = SPLIT_MAJOR and num_splits > 1  # splits only at decode: one query tile, not flat
    if split_major:  # see split_coords
        grid = (batch, num_kv_heads, num_splits)
    sinks_arg = sinks if sinks is not None else out  # any pointer when there are none
    early_meta = EARLY_META and prep is not None and not flat
    early_kv = EARLY_KV if early_meta else 0
    if early_kv == 2 and block_n * block_d * k_cache.element_size() > EARLY_LOAD_MAX_BYTES:
        early_kv = 1  # registers: the wide tile is prefetched instead
    kv_line = 128 // k_cache.element_size()  # elements a 128-byte line (K and V caches share the dtype)
    kv_lines = triton.next_power_of_2(triton.cdiv(head_dim, kv_line))
    parts_args = {}
    if prep is not None:
        if max_query_len != 1 or num_tokens != batch:
            raise ValueError("paged_attention_impl: prep is for decode steps (one query a sequence)")
        k_raw, v_raw = (unit_rows(x.reshape(num_tokens, -1)) for x in (prep.k, prep.v))
        cs = unit_rows(prep.cos_sin)
        norm = prep.q_weight is not None
        prep_args = (prep.positions, k_raw, v_raw, prep.q_weight if norm else q, prep.k_weight if norm else q, cs,
                     prep.slot_mapping, float(prep.eps), k_raw.stride(0), v_raw.stride(0), cs.stride(0),
                     cs.shape[-1] // 2)
        if prep.qkv_parts is not None:  # q / k / v unwritten: the prep adds the qkv GEMM's partials itself
            qp, kp, vp, n_parts, part_stride = prep.qkv_parts
            qp, kp, vp = qp.view(q.shape), kp.reshape(num_tokens, -1), vp.reshape(num_tokens, -1)
            if (qp.dtype != torch.float32 or qp.stride() != q.stride() or kp.stride() != k_raw.stride()
                    or vp.stride() != v_raw.stride()):
                raise ValueError("paged_attention_impl: the qkv partials must be float32 views with q / k / v's "
                                 "element strides")
            parts_args = dict(qp_ptr=qp, kp_ptr=kp, vp_ptr=vp, part_stride=part_stride, PREP_PARTS=n_parts)
    else:
        norm = False
        prep_args = (q, q, q, q, q, q, q, 0.0, 0, 0, 0, 0)
    _attention_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, part_m, part_l, part_acc,
        q if k_scale is None else k_scale, q if v_scale is None else v_scale, sinks_arg, float(scale),
        float(logit_softcap or 0.0), int(sliding_window or 0), head_dim, tokens_per_split, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), *prep_args,
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PAGE=k_cache.shape[1],
        EVEN_D=head_dim == block_d, OFF32=max(_span(k_cache), _span(v_cache)) < OFF32_LIMIT,
        USE_SOFTCAP=bool(logit_softcap), USE_WINDOW=bool(sliding_window), NUM_SPLITS=num_splits,
        F32_DOT=interpreting(), F16_DOT=f16_dot, IEEE=dot_ieee(q.dtype), KV_ALIGN=kv_align,
        USE_SINKS=sinks is not None,
        PREP=prep is not None, NORM=norm, IS_NEOX=bool(prep.is_neox) if prep is not None else True, **kv,
        num_warps=tile["num_warps"], num_stages=num_stages, **pdl_args(q.device),
        **(max_args if num_splits == 1 else {}), **flat_args, **parts_args, SPLIT_MAJOR=split_major,
        EARLY_META=early_meta, EARLY_KV=early_kv, KV_LINE=kv_line, KV_LINES=kv_lines, KV_ASM=not interpreting(),
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_m, part_l, part_acc, out, sinks_arg, seq_lens, int(sliding_window or 0),
            int(tokens_per_split == 0), num_heads, head_dim, out.stride(0), out.stride(1), NUM_SPLITS=num_splits,
            BLOCK_N=block_n, BLOCK_D=block_d, USE_SINKS=sinks is not None, num_warps=MERGE_WARPS,
            **pdl_args(q.device), **max_args)
    return out


@register("paged_attention", "triton")
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, num_heads, head_dim] -> out [T, num_heads, head_dim]; decode splits long contexts over SMs.
    FP8 caches are read as entry * k_scale / v_scale."""
    return paged_attention_impl(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                sliding_window, logit_softcap, max_query_len, max_seq_len, k_scale=k_scale,
                                v_scale=v_scale, sinks=sinks)
