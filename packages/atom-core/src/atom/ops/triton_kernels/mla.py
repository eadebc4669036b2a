"""MLA over a paged latent cache (see atom.ops.mla for the layout and the two formulations).

Decode and prefill both run the absorbed form here: the query's no-rope half is folded into the latent
space (q_lat = q_nope @ W_UK, one batched GEMM over the heads), one kernel attends over the latent rows
of the cache, and the result goes back through W_UV (a second batched GEMM). The cache has one "KV head"
shared by all query heads, so a program stacks up to 16 heads (times BLOCK_Q query tokens of one
sequence) into the rows of its tile and reads each latent row once for all of them: logits are
q_lat . kv_c + q_pe . k_pe, values are kv_c itself. Decode (one query per sequence) splits the context
over several programs (flash-decoding) and merges their partial softmax states with the paged-attention
merge kernel. Nothing reads device values on the host, and the grid depends only on the batch size,
the head count and max_seq_len, so a padded decode batch replays in a CUDA graph.

FP8 latent cache: the write quantizes each row to fp8(clamp(row / kv_scale)) (fp8_common.to_cache: the
reference's rounding, emulated under the interpreter); the attention loads e4m3 rows, widens them to the
query's dtype (exact) and folds kv_scale into the softmax scale (logits) and into the accumulator (values:
the latent rows themselves), so a row is never dequantized element by element.

Prefill in the absorbed form costs (L + R + L) / (P + R + V) times the attention FLOPs of the expanded
form (3.4x at DeepSeek's shapes) but needs no K/V expansion of the cached prefix; the expanded form is
the torch reference (atom.ops.mla.mla_prefill) and the oracle these kernels are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.mla import split_kv_b
from atom.ops.registry import register
from atom.ops.triton_kernels import attention  # its SPLIT_PER_SEQUENCE rule
# one split rule (per program: a KV head there, a head tile here)
from atom.ops.triton_kernels.attention import (_decode_splits, _merge_splits_kernel, _split_span,
                                                 _tokens_per_split, flat_row_tile, split_coords)
from atom.ops.triton_kernels.common import dot_ieee, env_flag, fit_tile, interpreting, num_sms
from atom.ops.triton_kernels.fp8_common import kv_cache_consts, to_cache
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait

# Heads stacked per program; rows per prefill program; keys per step; warps; pipeline depth. Module-level
# so tools/device/kernel_bench.py can sweep them.
MAX_HEADS_PER_TILE = 16
DECODE_TILE = dict(block_m=16, block_n=32, num_warps=4, num_stages=2)  # splits: attention._decode_splits
# Decode batches whose unsplit programs already fill ~all SMs: one split (no merge) and a wider key tile. H200,
# DeepSeek-V2-Lite's layer at 128 sequences of ~192 tokens (tools/device/mla_decode_sweep.py, graph replays): ~20 us
# of kernel time against ~30 for 4 splits + merge with DECODE_TILE; at 32 sequences the split path stays best.
# ATOM_MLA_DECODE_FULL=0 keeps DECODE_TILE and the split rule everywhere (A/B).
FULL_DECODE_TILE = dict(block_m=16, block_n=64, num_warps=8, num_stages=2)
FULL_DECODE_SHARE = 0.9  # programs >= this share of the SMs
# H200, 128 sequences of 128 new tokens, V2-Lite's 16 heads (tools/device/mla_decode_sweep.py --prefill, 2026-12-04):
# 32-row tiles 982 us, 64-row (4 queries x 16 heads) 680 us; at 32 sequences 262 / 183 us
PREFILL_TILE = dict(block_m=64, block_n=32, num_warps=8, num_stages=2)


@triton.jit
def _latent_scale(scale_ptr, HAS_SCALE: tl.constexpr):
    """The per-tensor latent scale as a [1] float32 tensor (1.0 without one)."""
    if HAS_SCALE:
        return tl.load(scale_ptr + tl.zeros([1], tl.int32)).to(tl.float32)
    return tl.full([1], 1.0, tl.float32)


@triton.jit
def _latent_row(cache_ptr, slot, block_size, cache_stride_b, cache_stride_s):
    """Pointer to the cache row of a slot (block_table-resolved slot index)."""
    return cache_ptr + (slot // block_size) * cache_stride_b + (slot % block_size) * cache_stride_s


@triton.jit
def _store_latent(row, offs, vals, mask, s, KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr,
                  EMULATE: tl.constexpr):
    """row[offs] = cache entry of vals (fp8(clamp(vals / s)) in an FP8 cache, a cast otherwise)."""
    tl.store(row + offs, to_cache(vals, s, row.dtype.element_ty, KV_FP8, FP8_MAX, MIN_EXP, EMULATE), mask=mask)


@triton.jit
def _mla_cache_write_kernel(kv_c_ptr, k_pe_ptr, cache_ptr, slot_ptr, scale_ptr, lora, rope, block_size,
                            c_stride_t, pe_stride_t, cache_stride_b, cache_stride_s,
                            BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, KV_FP8: tl.constexpr,
                            HAS_SCALE: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr,
                            EMULATE: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    row = _latent_row(cache_ptr, slot, block_size, cache_stride_b, cache_stride_s)
    s = _latent_scale(scale_ptr, HAS_SCALE)
    lo = tl.arange(0, BLOCK_L)
    c = tl.load(kv_c_ptr + t * c_stride_t + lo, mask=lo < lora)
    _store_latent(row, lo, c, lo < lora, s, KV_FP8, FP8_MAX, MIN_EXP, EMULATE)
    r = tl.arange(0, BLOCK_R)
    pe = tl.load(k_pe_ptr + t * pe_stride_t + r, mask=r < rope)
    _store_latent(row, lora + r, pe, r < rope, s, KV_FP8, FP8_MAX, MIN_EXP, EMULATE)


def _fp8_consts(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> dict:
    """KV_FP8 / HAS_SCALE (+ the FP8 rounding constants) for a latent cache that may be FP8."""
    consts = kv_cache_consts(kv_cache, kv_scale, None)
    consts["HAS_SCALE"] = consts.pop("HAS_K_SCALE")
    consts.pop("HAS_V_SCALE")
    return consts


@register("mla_cache_write", "triton")
def mla_cache_write(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, kv_scale: torch.Tensor | None = None) -> None:
    """Write kv_c [T, L] and k_pe [T, R] into kv_cache [blocks, block_size, L + R]; slots < 0 are skipped.
    An FP8 cache stores fp8(clamp(row / kv_scale))."""
    num_tokens, lora = kv_c.shape
    rope = k_pe.shape[-1]
    if num_tokens == 0:
        return
    assert kv_c.stride(-1) == 1 and k_pe.stride(-1) == 1 and kv_cache.stride(-1) == 1
    consts = _fp8_consts(kv_cache, kv_scale)
    _mla_cache_write_kernel[(num_tokens,)](
        kv_c, k_pe, kv_cache, slot_mapping, slot_mapping if kv_scale is None else kv_scale, lora, rope,
        kv_cache.shape[1], kv_c.stride(0), k_pe.stride(0), kv_cache.stride(0), kv_cache.stride(1),
        BLOCK_L=triton.next_power_of_2(lora), BLOCK_R=triton.next_power_of_2(rope), **consts, num_warps=4,
        **pdl_args(kv_c.device))


@triton.jit
def _rotate_pair(x1, x2, cos, sin):
    """(x1 cos - x2 sin, x2 cos + x1 sin) in float32, rounded to the input dtype (rotary_embedding's rule)."""
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    return (x1f * cos - x2f * sin).to(x1.dtype), (x2f * cos + x1f * sin).to(x1.dtype)


@triton.jit
def _mla_norm_rope_cache_kernel(pos_ptr, qpe_ptr, kva_ptr, w_ptr, cs_ptr, q_out_ptr, cache_ptr, slot_ptr, scale_ptr,
                                eps, num_heads, lora, rot_half, block_size, qpe_stride_t, qpe_stride_h, kva_stride_t,
                                cs_stride, cache_stride_b, cache_stride_s,
                                IS_NEOX: tl.constexpr, ROUND_NORM: tl.constexpr, BLOCK_H: tl.constexpr,
                                BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, KV_FP8: tl.constexpr,
                                HAS_SCALE: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr,
                                EMULATE: tl.constexpr, PDL: tl.constexpr):
    """One program per token: rope q_pe (all heads) into q_out; norm kv_c, rope k_pe, both into the cache row."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_R)
    r_ok = i < rot_half
    cos = tl.load(cs_ptr + pos * cs_stride + i, mask=r_ok, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * cs_stride + rot_half + i, mask=r_ok, other=0.0).to(tl.float32)
    if IS_NEOX:
        i1, i2 = i, i + rot_half
    else:
        i1, i2 = 2 * i, 2 * i + 1
    # q_pe of every head -> q_out [T, H, R]
    heads = tl.arange(0, BLOCK_H)[:, None]
    m = (heads < num_heads) & r_ok[None, :]
    src = qpe_ptr + t * qpe_stride_t + heads * qpe_stride_h
    o1, o2 = _rotate_pair(tl.load(src + i1[None, :], mask=m, other=0.0), tl.load(src + i2[None, :], mask=m, other=0.0),
                          cos[None, :], sin[None, :])
    dst = q_out_ptr + (t * num_heads + heads) * (2 * rot_half)
    tl.store(dst + i1[None, :], o1, mask=m)
    tl.store(dst + i2[None, :], o2, mask=m)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    row = _latent_row(cache_ptr, slot, block_size, cache_stride_b, cache_stride_s)
    s = _latent_scale(scale_ptr, HAS_SCALE)
    # k_pe (one shared head) -> cache[L:]
    kp = kva_ptr + t * kva_stride_t + lora
    k1, k2 = _rotate_pair(tl.load(kp + i1, mask=r_ok, other=0.0), tl.load(kp + i2, mask=r_ok, other=0.0), cos, sin)
    _store_latent(row, lora + i1, k1, r_ok, s, KV_FP8, FP8_MAX, MIN_EXP, EMULATE)
    _store_latent(row, lora + i2, k2, r_ok, s, KV_FP8, FP8_MAX, MIN_EXP, EMULATE)
    # kv_c -> rms_norm(kv_c) * w -> cache[:L], rounded like the reference (normalized value to the input dtype,
    # times the weight, to the product's dtype)
    lo = tl.arange(0, BLOCK_L)
    l_ok = lo < lora
    c = tl.load(kva_ptr + t * kva_stride_t + lo, mask=l_ok, other=0.0)
    cf = c.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(cf * cf, axis=0) / lora + eps)
    normed = (cf * rstd).to(c.dtype).to(tl.float32) * tl.load(w_ptr + lo, mask=l_ok, other=0.0).to(tl.float32)
    if ROUND_NORM:
        normed = normed.to(c.dtype)
    _store_latent(row, lo, normed, l_ok, s, KV_FP8, FP8_MAX, MIN_EXP, EMULATE)


@register("mla_norm_rope_cache", "triton")
def mla_norm_rope_cache(positions: torch.Tensor, q_pe: torch.Tensor, kv_a: torch.Tensor, kv_weight: torch.Tensor,
                        eps: float, cos_sin: torch.Tensor, is_neox: bool, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q_pe [T, H, R] (any token / head strides), kv_a [T, L + R] -> roped q_pe [T, H, R]; writes
    [rms_norm(kv_c) * kv_weight | rope(k_pe)] into the latent cache (atom.ops.mla.mla_norm_rope_cache)."""
    num_tokens, num_heads, rope = q_pe.shape
    lora = kv_a.shape[-1] - rope
    q_out = torch.empty(num_tokens, num_heads, rope, dtype=q_pe.dtype, device=q_pe.device)
    if num_tokens == 0:
        return q_out
    assert q_pe.stride(-1) == 1 and kv_a.stride(-1) == 1 and kv_cache.stride(-1) == 1 and cos_sin.stride(-1) == 1
    rot_half = cos_sin.shape[-1] // 2
    assert 2 * rot_half == rope, "MLA ropes the whole q_pe / k_pe"
    # torch's promotion of weight * normalized (in kv_a's dtype): rounded to that dtype when both are it
    round_norm = kv_weight.dtype == kv_a.dtype and kv_a.dtype != torch.float32
    consts = _fp8_consts(kv_cache, kv_scale)
    _mla_norm_rope_cache_kernel[(num_tokens,)](
        positions, q_pe, kv_a, kv_weight, cos_sin, q_out, kv_cache, slot_mapping,
        slot_mapping if kv_scale is None else kv_scale, float(eps), num_heads, lora, rot_half, kv_cache.shape[1],
        q_pe.stride(0), q_pe.stride(1), kv_a.stride(0), cos_sin.stride(0), kv_cache.stride(0), kv_cache.stride(1),
        IS_NEOX=is_neox, ROUND_NORM=round_norm, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_L=triton.next_power_of_2(lora), BLOCK_R=triton.next_power_of_2(rot_half), **consts, num_warps=4,
        **pdl_args(q_pe.device))
    return q_out


@triton.jit
def _causal_logits(qa, ka, qb, kb, k_ok, k_pos, q_pos, qk_scale, IEEE: tl.constexpr, ONE_QUERY: tl.constexpr):
    """(qa . ka + qb . kb) * qk_scale for one key tile (two parts: the no-rope / latent part and the rope part),
    -inf where the key is past the tile's end or after the query (causal). ONE_QUERY: the tile holds one query
    position, whose keys all lie below the tile's end, so only the end masks."""
    if IEEE:
        s = tl.dot(qa, tl.trans(ka), input_precision="ieee")
        s += tl.dot(qb, tl.trans(kb), input_precision="ieee")
    else:
        s = tl.dot(qa, tl.trans(ka))
        s += tl.dot(qb, tl.trans(kb))
    s = s * qk_scale
    if ONE_QUERY:
        return tl.where(k_ok[None, :], s, float("-inf"))
    return tl.where(k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None]), s, float("-inf"))


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One key tile of the online softmax (base 2): logits s, values v -> (m_i, l_i, acc) after it. Rows with
    nothing visible yet stay at zero."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


# do_not_specialize: the block-table row stride (the widest table of an eager batch) changes from batch to
# batch; Triton would compile again each time it turns 1 or a multiple of 16, for a divisibility hint that
# this scalar offset does not use (tools/triton_specializations.py counts the compiles).
@triton.jit(do_not_specialize=["bt_stride"])
def _mla_attention_kernel(
    ql_ptr, qp_ptr, cache_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    kv_scale_ptr, scale, lora, rope, tokens_per_split, num_heads,
    ql_stride_t, ql_stride_h, qp_stride_t, qp_stride_h, out_stride_t, out_stride_h, c_stride_b, c_stride_s,
    bt_stride,
    HEADS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr,
    F32_DOT: tl.constexpr, IEEE: tl.constexpr, ROW_ALIGN: tl.constexpr, KV_FP8: tl.constexpr,
    HAS_SCALE: tl.constexpr, PDL: tl.constexpr, PAGE: tl.constexpr, EVEN: tl.constexpr, OFF32: tl.constexpr,
    num_rows=0, ROWS_PAD: tl.constexpr = 1, SPLIT_MAJOR: tl.constexpr = False,
):
    """PAGE: the cache's block size; EVEN: lora == BLOCK_L and rope == BLOCK_R (no column masks); OFF32: int32 row
    offsets (the cache spans fewer than 2^31 elements). As in attention._attention_kernel. Multi-query launches
    (not DECODE) enumerate (row, query tile) pairs on axis 0 (attention.flat_row_tile: num_rows rows, ROWS_PAD
    their power-of-two bound) instead of rows x the longest row's query tiles."""
    pdl_wait(PDL)
    if DECODE:
        b = tl.program_id(0)
        q_tile = 0
    else:
        b, q_tile = flat_row_tile(qsl_ptr, num_rows, BLOCK_Q, ROWS_PAD)
    head_tile, split = split_coords(NUM_SPLITS, SPLIT_MAJOR)

    if DECODE:  # token b is sequence b's only query
        q_start = b.to(tl.int64)
        q_len = 1
    else:
        q_start = tl.load(qsl_ptr + b).to(tl.int64)
        q_len = (tl.load(qsl_ptr + b + 1) - q_start).to(tl.int32)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    ctx = seq_len - q_len  # cached prefix before this sequence's queries

    r = tl.arange(0, BLOCK_M)
    qi = q_tile * BLOCK_Q + r // HEADS
    head = head_tile * HEADS + r % HEADS
    row_ok = (r < BLOCK_Q * HEADS) & (qi < q_len) & (head < num_heads)
    q_pos = ctx + qi
    tok = q_start + qi
    lc = tl.arange(0, BLOCK_L)
    e = tl.arange(0, BLOCK_R)
    if EVEN:
        l_ok = tl.full([BLOCK_L], 1, tl.int1)
        e_ok = tl.full([BLOCK_R], 1, tl.int1)
    else:
        l_ok = lc < lora
        e_ok = e < rope
    q_lat = tl.load(ql_ptr + tok[:, None] * ql_stride_t + head[:, None] * ql_stride_h + lc[None, :],
                    mask=row_ok[:, None] & l_ok[None, :], other=0.0)
    q_pe = tl.load(qp_ptr + tok[:, None] * qp_stride_t + head[:, None] * qp_stride_h + e[None, :],
                   mask=row_ok[:, None] & e_ok[None, :], other=0.0)
    if F32_DOT:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    # keys this tile can see: causal up to its last query
    hi = tl.minimum(seq_len, ctx + tl.minimum((q_tile + 1) * BLOCK_Q, q_len))
    lo = 0
    if NUM_SPLITS > 1:
        span = tokens_per_split
        if span == 0:  # this sequence's keys in equal parts (attention.SPLIT_PER_SEQUENCE)
            span = _split_span(hi, NUM_SPLITS, BLOCK_N)
        empty = (tokens_per_split == 0) & (split * span >= hi)
        if empty:  # past this sequence's keys: no state to store, the merge does not read this split
            return
        lo = split * span
        hi = tl.minimum(hi, lo + span)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_L], tl.float32)
    if HAS_SCALE:  # an FP8 latent row is entry * kv_scale: the logits scale by it (the values below too)
        scale = scale * tl.load(kv_scale_ptr).to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        blk = tl.load(bt_ptr + b.to(tl.int64) * bt_stride + k_pos // PAGE, mask=k_ok, other=0)
        in_blk = k_pos % PAGE
        if not OFF32:
            blk = blk.to(tl.int64)
            in_blk = in_blk.to(tl.int64)
        # offsets come from the block table: say they are aligned, or rows are read element by element
        row = tl.multiple_of(blk * c_stride_b + in_blk * c_stride_s, ROW_ALIGN)
        c = tl.load(cache_ptr + row[:, None] + lc[None, :], mask=k_ok[:, None] & l_ok[None, :], other=0.0)
        pe = tl.load(cache_ptr + row[:, None] + lora + e[None, :], mask=k_ok[:, None] & e_ok[None, :], other=0.0)
        if F32_DOT:
            c = c.to(tl.float32)
            pe = pe.to(tl.float32)
        elif KV_FP8:  # e4m3 -> bf16/fp16 is exact
            c = c.to(ql_ptr.dtype.element_ty)
            pe = pe.to(ql_ptr.dtype.element_ty)
        s = _causal_logits(q_lat, c, q_pe, pe, k_ok, k_pos, q_pos, qk_scale, IEEE, BLOCK_Q == 1)
        m_i, l_i, acc = _online_softmax_step(s, c, m_i, l_i, acc, IEEE)  # the values are the latent rows

    if HAS_SCALE:  # the values are the latent rows, entry * kv_scale (linear: the split merge is unchanged)
        acc = acc * tl.load(kv_scale_ptr).to(tl.float32)
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok[:, None] * out_stride_t + head[:, None] * out_stride_h + lc[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & l_ok[None, :])
    else:
        part = (tok * num_heads + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * BLOCK_L + lc[None, :], acc, mask=row_ok[:, None])


def mla_latent_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor | None,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    num_splits: int | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the latent cache (the absorbed core): q_lat [T, H, L], q_pe [T, H, R] -> o_lat, a
    [T, H, L] view of an [H, T, L] tensor (what the W_UV batched GEMM reads). query_start_loc None: decode,
    token b is sequence b's only query. num_splits is open to tests (forces the merge path). An FP8 cache
    is read as entry * kv_scale."""
    num_tokens, num_heads, lora = q_lat.shape
    rope = q_pe.shape[-1]
    batch = seq_lens.shape[0]
    out = torch.empty(num_heads, num_tokens, lora, dtype=q_lat.dtype, device=q_lat.device).transpose(0, 1)
    if num_tokens == 0 or batch == 0:
        return out
    assert q_lat.stride(-1) == 1 and q_pe.stride(-1) == 1 and kv_cache.stride(-1) == 1
    decode = query_start_loc is None
    assert not decode or num_tokens == batch, "decode: one query token per sequence"
    heads = min(triton.next_power_of_2(num_heads), MAX_HEADS_PER_TILE)
    head_tiles = triton.cdiv(num_heads, heads)
    if decode:
        tile, block_q = DECODE_TILE, 1
        if num_splits is None:
            if (batch * head_tiles >= FULL_DECODE_SHARE * num_sms(q_lat.device)
                    and env_flag("ATOM_MLA_DECODE_FULL", True)):
                tile, num_splits = FULL_DECODE_TILE, 1
            else:
                num_splits = _decode_splits(q_lat.device, batch, head_tiles, max_seq_len, tile["block_n"])
    else:
        tile, num_splits = PREFILL_TILE, 1
        block_q = max(1, tile["block_m"] // heads)
    block_m = max(16, triton.next_power_of_2(block_q * heads))
    block_l, block_r = max(16, triton.next_power_of_2(lora)), max(16, triton.next_power_of_2(rope))
    elem = max(kv_cache.element_size(), q_lat.element_size())
    # per stage the latent rows (kv_c and k_pe); once the query tiles and p (the second dot's operand)
    block_n, num_stages = fit_tile(tile["num_stages"], tile["block_n"],
                                   lambda n: (n * (block_l + block_r) * elem, block_m * (block_l + block_r + n) * elem),
                                   q_lat.device)
    tokens_per_split = _tokens_per_split(attention.SPLIT_PER_SEQUENCE, max_seq_len, num_splits, block_n)
    if num_splits > 1:
        part_m = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q_lat.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(num_tokens, num_heads, num_splits, block_l, dtype=torch.float32, device=q_lat.device)
    else:
        part_m = part_l = part_acc = out
    row_align = 16 if all(st % 16 == 0 for st in kv_cache.stride()[:2]) else 1
    fp8 = _fp8_consts(kv_cache, kv_scale)
    # decode: a program per sequence; else (row, query tile) pairs on axis 0 (flat_row_tile): at most
    # T // block_q + batch of them, whatever the longest row
    grid = (batch if decode else num_tokens // block_q + batch, 1, head_tiles * num_splits)
    split_major = attention.SPLIT_MAJOR and decode and num_splits > 1
    if split_major:  # attention.split_coords
        grid = (batch, head_tiles, num_splits)
    flat_args = {} if decode else dict(num_rows=batch, ROWS_PAD=triton.next_power_of_2(batch))
    _mla_attention_kernel[grid](
        q_lat, q_pe, kv_cache, block_tables, query_start_loc if not decode else seq_lens, seq_lens, out,
        part_m, part_l, part_acc, seq_lens if kv_scale is None else kv_scale, float(scale), lora, rope,
        tokens_per_split, num_heads,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        HEADS=heads, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_R=block_r,
        NUM_SPLITS=num_splits, DECODE=decode, F32_DOT=interpreting(), IEEE=dot_ieee(q_lat.dtype),
        ROW_ALIGN=row_align, KV_FP8=fp8["KV_FP8"], HAS_SCALE=fp8["HAS_SCALE"], PAGE=kv_cache.shape[1],
        EVEN=lora == block_l and rope == block_r, OFF32=attention._span(kv_cache) < attention.OFF32_LIMIT,
        num_warps=tile["num_warps"],
        num_stages=num_stages, **flat_args, **pdl_args(q_lat.device), SPLIT_MAJOR=split_major,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](  # out as the sinks: none (unread)
            part_m, part_l, part_acc, out, out, seq_lens, 0, int(tokens_per_split == 0), num_heads, lora,
            out.stride(0), out.stride(1), NUM_SPLITS=num_splits, BLOCK_N=block_n, BLOCK_D=block_l, USE_SINKS=False,
            num_warps=4, **pdl_args(q_lat.device))
    return out


def _absorbed(q_nope, q_pe, kv_cache, w_kv_b, block_tables, query_start_loc, seq_lens, scale, max_query_len,
              max_seq_len, num_splits=None, kv_scale=None) -> torch.Tensor:
    num_heads, nope_dim = q_nope.shape[1], q_nope.shape[2]
    w_uk, w_uv = split_kv_b(w_kv_b, num_heads, nope_dim)
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk.to(q_nope.dtype)).transpose(0, 1)  # [T, H, L]
    o_lat = mla_latent_attention(q_lat, q_pe, kv_cache, block_tables, query_start_loc, seq_lens, scale,
                                 max_query_len, max_seq_len, num_splits, kv_scale)
    # [T, H, V] contiguous, as the op's contract says: the batched GEMM writes it directly (cuBLAS takes the
    # [H, T, V] view's row stride H * V; no transpose copy after it)
    out = torch.empty(q_nope.shape[0], num_heads, w_uv.shape[1], dtype=o_lat.dtype, device=o_lat.device)
    torch.bmm(o_lat.transpose(0, 1), w_uv.to(o_lat.dtype).transpose(1, 2), out=out.transpose(0, 1))
    return out


def mla_decode_impl(q_nope, q_pe, kv_cache, w_kv_b, block_tables, seq_lens, scale, max_seq_len=None,
                    num_splits=None, kv_scale=None) -> torch.Tensor:
    """`mla_decode` with the split count open to callers (tests force the merge path)."""
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * kv_cache.shape[1]
    return _absorbed(q_nope, q_pe, kv_cache, w_kv_b, block_tables, None, seq_lens, scale, 1, max_seq_len,
                     num_splits, kv_scale)


@register("mla_decode", "triton")
def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    w_kv_b: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q_nope [B, H, P], q_pe [B, H, R] -> out [B, H, V]; one query per sequence."""
    return mla_decode_impl(q_nope, q_pe, kv_cache, w_kv_b, block_tables, seq_lens, scale, max_seq_len,
                           kv_scale=kv_scale)


# Prefill in the expanded form (see the module docstring): the latent rows of each sequence go through kv_b_proj
# into per-head K (no-rope part) and V, then a causal flash kernel with the shared rope key. Taken when it does
# not expand much more than the new tokens (batch * max_seq_len <= EXPANDED_MAX_ROWS_PER_TOKEN * new tokens: no
# long cached prefix, no decode rows in the batch) and the cache is not FP8. H200, 128 sequences of 128 tokens,
# V2-Lite, one layer (tools/device/mla_decode_sweep.py --prefill): 261 us expanded against 680 us absorbed (its two
# batched GEMMs included); 32 sequences 92 against 183 us.
EXPANDED_MAX_ROWS_PER_TOKEN = 2
# At most this many bytes of expanded K|V at a time (sequences in groups beyond it; DeepSeek-V3's 128 heads
# expand a latent row to 64 KiB).
EXPANDED_CHUNK_BYTES = 256 << 20
# "absorbed" / "expanded" for tests and sweeps; None: the rule above.
PREFILL_FORM_OVERRIDE: str | None = None
EXPANDED_TILE = dict(block_q=64, block_n=64, num_warps=4, num_stages=2)


@triton.jit
def _mla_expanded_kernel(
    qn_ptr, qp_ptr, kv_ptr, kpe_ptr, qsl_ptr, seq_lens_ptr, out_ptr, scale, seq0, rows_per_seq, nope, rope, v_dim,
    qn_stride_t, qn_stride_h, qp_stride_t, qp_stride_h, kv_stride, kpe_stride, out_stride_t, out_stride_h,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    """Sequence seq0 + program_id(0), head program_id(2), BLOCK_Q of its queries: causal attention over its
    expanded rows kv[(b - seq0) * rows_per_seq + position] = [k_nope (heads x nope) | v (heads x v_dim)] per
    head, with the head-shared rope key kpe[...]."""
    pdl_wait(PDL)
    b = seq0 + tl.program_id(0)
    q_tile = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    q_len = (tl.load(qsl_ptr + b + 1) - q_start).to(tl.int32)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    ctx = seq_len - q_len
    qi = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qi < q_len
    tok = q_start + qi
    q_pos = ctx + qi
    pc = tl.arange(0, BLOCK_P)
    rc = tl.arange(0, BLOCK_R)
    vc = tl.arange(0, BLOCK_V)
    qn = tl.load(qn_ptr + tok[:, None] * qn_stride_t + h * qn_stride_h + pc[None, :],
                 mask=q_ok[:, None] & (pc < nope)[None, :], other=0.0)
    qp = tl.load(qp_ptr + tok[:, None] * qp_stride_t + h * qp_stride_h + rc[None, :],
                 mask=q_ok[:, None] & (rc < rope)[None, :], other=0.0)
    if F32_DOT:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)
    row0 = (b - seq0).to(tl.int64) * rows_per_seq
    head_col = h * (nope + v_dim)
    hi = tl.minimum(seq_len, ctx + tl.minimum((q_tile + 1) * BLOCK_Q, q_len))  # causal: up to the last query
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_V], tl.float32)
    qk_scale = scale * 1.4426950408889634
    for start in range(0, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        rows = row0 + k_pos
        kn = tl.load(kv_ptr + rows[:, None] * kv_stride + head_col + pc[None, :],
                     mask=k_ok[:, None] & (pc < nope)[None, :], other=0.0)
        kp = tl.load(kpe_ptr + rows[:, None] * kpe_stride + rc[None, :], mask=k_ok[:, None] & (rc < rope)[None, :],
                     other=0.0)
        v = tl.load(kv_ptr + rows[:, None] * kv_stride + head_col + nope + vc[None, :],
                    mask=k_ok[:, None] & (vc < v_dim)[None, :], other=0.0)
        if F32_DOT:
            kn, kp, v = kn.to(tl.float32), kp.to(tl.float32), v.to(tl.float32)
        s = _causal_logits(qn, kn, qp, kp, k_ok, k_pos, q_pos, qk_scale, IEEE, False)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + tok[:, None] * out_stride_t + h * out_stride_h + vc[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_ok[:, None] & (vc < v_dim)[None, :])


def _expanded(q_nope, q_pe, kv_cache, w_kv_b, block_tables, query_start_loc, seq_lens, scale, max_query_len,
              max_seq_len) -> torch.Tensor:
    """Prefill in the expanded form: each sequence's max_seq_len latent rows (positions past its length are
    read but masked) are gathered from the paged cache, expanded by kv_b_proj in one GEMM per group of
    sequences, and attended by _mla_expanded_kernel. No host sync (sizes come from the host maxima)."""
    num_tokens, num_heads, nope = q_nope.shape
    rope = q_pe.shape[-1]
    lora = kv_cache.shape[-1] - rope
    v_dim = w_kv_b.shape[0] // num_heads - nope
    batch, block_size = seq_lens.shape[0], kv_cache.shape[1]
    out = torch.empty(num_tokens, num_heads, v_dim, dtype=q_nope.dtype, device=q_nope.device)
    if num_tokens == 0 or batch == 0:
        return out
    assert q_nope.stride(-1) == 1 and q_pe.stride(-1) == 1
    pos = torch.arange(max_seq_len, device=q_nope.device)
    blk_col, in_blk = pos // block_size, pos % block_size
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    w = w_kv_b.to(q_nope.dtype)
    row_bytes = w.shape[0] * q_nope.element_size()
    per_chunk = max(1, min(batch, EXPANDED_CHUNK_BYTES // max(1, max_seq_len * row_bytes)))
    t = EXPANDED_TILE
    for seq0 in range(0, batch, per_chunk):
        n = min(per_chunk, batch - seq0)
        slots = block_tables[seq0:seq0 + n, blk_col].long() * block_size + in_blk
        latent = flat[slots.reshape(-1)].to(q_nope.dtype)  # [n * max_seq_len, lora + rope]
        kv = torch.mm(latent[:, :lora], w.t())  # [rows, heads * (nope + v)]
        k_pe = latent[:, lora:]
        grid = (n, triton.cdiv(max_query_len, t["block_q"]), num_heads)
        _mla_expanded_kernel[grid](
            q_nope, q_pe, kv, k_pe, query_start_loc, seq_lens, out, float(scale), seq0, max_seq_len, nope, rope,
            v_dim, q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), kv.stride(0), k_pe.stride(0),
            out.stride(0), out.stride(1), BLOCK_Q=t["block_q"], BLOCK_N=t["block_n"],
            BLOCK_P=max(16, triton.next_power_of_2(nope)), BLOCK_R=max(16, triton.next_power_of_2(rope)),
            BLOCK_V=max(16, triton.next_power_of_2(v_dim)), F32_DOT=interpreting(), IEEE=dot_ieee(q_nope.dtype),
            num_warps=t["num_warps"], num_stages=t["num_stages"], **pdl_args(q_nope.device))
    return out


def prefill_form(num_tokens: int, batch: int, max_seq_len: int, kv_cache: torch.Tensor) -> str:
    """Which formulation mla_prefill runs (EXPANDED_MAX_ROWS_PER_TOKEN above)."""
    if PREFILL_FORM_OVERRIDE is not None:
        return PREFILL_FORM_OVERRIDE
    fp8 = kv_cache.element_size() == 1
    return ("expanded" if not fp8 and batch * max_seq_len <= EXPANDED_MAX_ROWS_PER_TOKEN * num_tokens
            else "absorbed")


@register("mla_prefill", "triton")
def mla_prefill(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    w_kv_b: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal MLA over cached prefix + new tokens: q_nope [T, H, P], q_pe [T, H, R] -> [T, H, V]."""
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if prefill_form(q_nope.shape[0], seq_lens.shape[0], max_seq_len, kv_cache) == "expanded":
        assert kv_cache.element_size() > 1, "the expanded MLA prefill reads an unquantized latent cache"
        return _expanded(q_nope, q_pe, kv_cache, w_kv_b, block_tables, query_start_loc, seq_lens, scale,
                         max_query_len, max_seq_len)
    return _absorbed(q_nope, q_pe, kv_cache, w_kv_b, block_tables, query_start_loc, seq_lens, scale,
                     max_query_len, max_seq_len, kv_scale=kv_scale)
