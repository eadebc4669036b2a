"""Attention over a paged KV cache.

Cache layout (per layer): k_cache, v_cache = [num_blocks, block_size, num_kv_heads, head_dim].
A token at position p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.
The torch and Triton implementations also take strided views with a unit last stride (a host's cache: vLLM's
K and V halves of a block, or K | V on the last axis), reading and writing them in place.

`paged_attention` is varlen: sequence b has query tokens q[query_start_loc[b]:query_start_loc[b+1]],
which are the *last* tokens of its seq_lens[b] context tokens (the earlier ones are a cached prefix).
Decode is the case where every query length is 1. Causal masking, GQA/MQA (num_heads a multiple of
num_kv_heads), sliding window (a query at position i sees keys j with i - j < window, as
transformers defines it), logit soft-capping (cap * tanh(s / cap)) and attention sinks are supported.
A sink (GPT-OSS) is a learned logit per query head that joins each row's softmax denominator and
nothing else: p_j = exp(s_j) / (sum_j' exp(s_j') + exp(sink_h)), on the scale of the (scaled, capped)
scores, as transformers' eager attention of gpt_oss computes it.

FP8 KV cache (float8_e4m3fn / float8_e4m3fnuz caches): the cache holds fp8(clamp(k / k_scale)) and
fp8(clamp(v / v_scale)) (vLLM's convention; per-tensor scales from the checkpoint, else 1.0), read back
as q * scale. k_scale / v_scale are float32 tensors of one element (so CUDA graphs capture them as
inputs) or None (1.0); they are ignored for caches that are not FP8.

Trailing optional arguments of paged_attention, in this order everywhere (torch, Triton, AITER, the op
schema): ..., max_query_len, max_seq_len, k_scale, v_scale, sinks; callers pass them by keyword.

The torch implementation has three formulations: `paged_attention_padded` (every query padded to the longest of
the step: any feature, any device; the oracle), `paged_decode_attention` (one query per row; on CPU the native
kernel of atom.ops.cpu_native, else gathered batched matmuls), and on CPU `_paged_attention_rows` (decoding
rows together, each prefill row through torch's fused scaled_dot_product_attention), which
`paged_attention` picks from max_query_len (1: decode) and the device and features.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from atom.ops import cpu_native
from atom.ops.quant_fp8 import FP8_DTYPES, fp8_max
from atom.ops.registry import define_op, register

CHECK_BLOCK_SIZE = 16


def _heads(static) -> tuple[int, int, int]:
    return int(static.get("num_heads", 4)), int(static.get("num_kv_heads", 2)), int(static.get("head_dim", 128))


def slot_example(t, num_tokens: int, num_blocks: int = 4) -> torch.Tensor:
    """Distinct cache slots for a self-check, one of them -1 (a padding token, not written)."""
    slots = t.randperm(num_blocks * CHECK_BLOCK_SIZE)[:num_tokens]
    slots[num_tokens // 2] = -1
    return slots


def kv_cache_example(t, static, num_blocks: int = 4, fill: bool = False) -> tuple:
    """(k_cache, v_cache, scales) for a self-check in the layer's cache dtype (static["kv_cache_dtype"],
    default the activations'): scales are the trailing (k_scale, v_scale) arguments, != 1, of an FP8
    cache, and () otherwise (the call then leaves them out)."""
    _, kv, d = _heads(static)
    dtype = static.get("kv_cache_dtype") or t.dtype
    caches = []
    for _ in range(2):
        c = t.randn(num_blocks, CHECK_BLOCK_SIZE, kv, d, dtype=torch.float32) if fill else \
            torch.zeros(num_blocks, CHECK_BLOCK_SIZE, kv, d, device=t.device)
        caches.append(c.to(dtype))
    if dtype not in FP8_DTYPES:
        return (*caches, ())
    return (*caches, (t.tensor(0.5, torch.float32), t.tensor(2.0, torch.float32)))


def _cache_example(t, static):
    _, kv, d = _heads(static)
    k_cache, v_cache, scales = kv_cache_example(t, static)
    return (t.randn(6, kv, d), t.randn(6, kv, d), k_cache, v_cache, slot_example(t, 6), *scales)


def _attention_example(t, static):
    """A decode-only batch and a mixed prefill/decode batch over a paged cache with shuffled blocks."""
    h, kv, d = _heads(static)
    window, softcap = static.get("sliding_window"), static.get("logit_softcap")
    k_cache, v_cache, scales = kv_cache_example(t, static, num_blocks=8, fill=True)
    tables = t.randperm(8)[:6].view(2, 3).to(torch.int32)
    calls = []
    for q_lens, ctx in (([1, 1], [40, 7]), ([1, 5], [23, 40])):
        qsl = t.tensor([0, q_lens[0], q_lens[0] + q_lens[1]], torch.int32)
        call = (t.randn(sum(q_lens), h, d), k_cache, v_cache, tables, qsl, t.tensor(ctx, torch.int32), d**-0.5,
                window, softcap, max(q_lens), max(ctx), *scales)
        if static.get("has_sinks"):
            call += (() if scales else (None, None)) + (t.randn(h, dtype=torch.float32, scale=2.0),)
        calls.append(call)
    return calls


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """x as the cache stores it: fp8(clamp(x / scale)) for FP8 caches, a plain cast otherwise."""
    if cache_dtype not in FP8_DTYPES:
        return x.to(cache_dtype)
    y = x.float() if scale is None else x.float() / scale.float().reshape(())
    return y.clamp(-fp8_max(cache_dtype), fp8_max(cache_dtype)).to(cache_dtype)


def from_cache(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 values of cache entries (dequantized for FP8 caches)."""
    y = x.float()
    if x.dtype in FP8_DTYPES and scale is not None:
        y = y * scale.float().reshape(())
    return y


define_op("reshape_and_cache", mutates_args=("k_cache", "v_cache"), example=_cache_example,
          fake=lambda *args, **kwargs: None)
define_op("paged_attention", example=_attention_example, fake=lambda q, *args, **kwargs: q.new_empty(q.shape))


# Boolean-mask indexing: a data-dependent shape, so no graph capture and a custom op under compile.
@register("reshape_and_cache", "torch", cuda_graph=False, traceable=False)
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
    FP8 caches store key / k_scale and value / v_scale (module docstring)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for cache, x, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        _write_slots(cache, slots, to_cache_dtype(x[keep], cache.dtype, scale))


def _write_slots(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """cache [num_blocks, block_size, ...][slot] = rows, for contiguous caches and strided views of a host's
    cache alike (vLLM >= 0.30 interleaves K and V on the last axis)."""
    if cache.dtype in FP8_DTYPES:  # no FP8 index kernels on CPU: copy the bytes
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    if cache.is_contiguous():
        cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:]).index_copy_(0, slots, rows)
    else:
        block_size = cache.shape[1]
        cache[slots // block_size, slots % block_size] = rows


def _read_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, ...] at slots (any shape) -> [*slots.shape, ...], without flattening a
    strided host cache (that would copy all of it)."""
    if cache.is_contiguous():
        return cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])[slots]
    block_size = cache.shape[1]
    return cache[slots // block_size, slots % block_size]


def _read_slots_by_head(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, Hkv, D] at slots [B, L] -> [Hkv, B, L, D], gathered straight into that
    layout for a contiguous cache (no re-layout copy before the matmuls)."""
    if cache.is_contiguous():
        return cache.view(-1, *cache.shape[2:]).transpose(0, 1)[:, slots]
    return _read_slots(cache, slots).permute(2, 0, 1, 3)


class DecodePrep(NamedTuple):
    """qk_norm_rope_cache's arguments, for a decode step whose attention does that work itself (the prep of
    atom.ops.triton_kernels.attention.paged_attention_impl): positions [T], raw k / v [T, Hk * D] (or [T, Hk,
    D]), the qk-norm weights (None: no qk-norm), eps, the cos | sin table [max_pos, rot_dim], neox-style halves
    or interleaved pairs, and the cache slots [T] (-1: padding, nothing stored). qkv_parts (Triton kernel only):
    q, k and v were left unwritten by a split-K qkv GEMM; (qp, kp, vp, splits, part_stride) are the matching views
    of its float32 partials (atom.layers.fp8_input.SplitKPartials), which the kernel adds itself."""

    positions: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None
    eps: float
    cos_sin: torch.Tensor
    is_neox: bool
    slot_mapping: torch.Tensor
    qkv_parts: tuple | None = None


def write_kv_slots(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """reshape_and_cache when every slot is a real one (no -1 padding): no boolean mask, so torch.compile
    traces it (Inductor writes the rows in place)."""
    slots = slot_mapping.long()
    for cache, x, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        _write_slots(cache, slots, to_cache_dtype(x, cache.dtype, scale))


@register("paged_attention", "torch", cuda_graph=False, traceable=False)
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
    """q [T, num_heads, head_dim] -> out [T, num_heads, head_dim] (T = query_start_loc[-1]); FP8 caches
    are read as entry * k_scale / v_scale. sinks: optional [num_heads] sink logits (any float dtype)."""
    if max_query_len == 1:  # every row decodes one token (the caller says so)
        return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                                      logit_softcap, k_scale=k_scale, v_scale=v_scale, sinks=sinks)
    if (q.device.type == "cpu" and not logit_softcap and sinks is None
            and k_cache.dtype in (torch.float32, torch.bfloat16, torch.float16) and q.dtype == k_cache.dtype):
        return _paged_attention_rows(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                     sliding_window)
    return paged_attention_padded(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                  sliding_window, logit_softcap, max_query_len, max_seq_len, k_scale, v_scale, sinks)


def _paged_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                          sliding_window: int | None) -> torch.Tensor:
    """paged_attention on CPU, row by row: the decoding rows (one query) together through
    paged_decode_attention, each prefill row through torch's fused scaled_dot_product_attention over the keys
    it can see (gathered from its blocks; with a window, only the window's: blocks before it may be stale).
    No [rows, longest query, longest context] score tensor as in the padded form."""
    if q.shape[0] == seq_lens.shape[0]:  # one query per row: decode
        return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [b - a for a, b in zip(starts, starts[1:])]
    out = torch.empty_like(q)
    decode = [b for b, n in enumerate(q_lens) if n == 1]
    if decode:
        rows = torch.tensor(decode, device=q.device)
        tokens = torch.tensor([starts[b] for b in decode], device=q.device)
        out[tokens] = paged_decode_attention(q[tokens], k_cache, v_cache, block_tables[rows], seq_lens[rows], scale,
                                             sliding_window)
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    for b, n in enumerate(q_lens):
        if n <= 1:
            continue
        length, first_query = lens[b], lens[b] - n
        first_key = max(0, first_query - sliding_window + 1) if sliding_window else 0
        blocks = block_tables[b, first_key // block_size:-(-length // block_size)].long()
        offset = first_key // block_size * block_size  # position of the first gathered slot
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[first_key - offset:length - offset]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[first_key - offset:length - offset]
        queries = q[starts[b]:starts[b] + n].transpose(0, 1)[None]  # [1, H, n, D]
        mask = None
        if first_key or first_query:  # causal from position first_query on, within the window
            key_pos = torch.arange(first_key, length, device=q.device)
            query_pos = torch.arange(first_query, length, device=q.device)[:, None]
            mask = key_pos[None, :] <= query_pos
            if sliding_window:
                mask &= query_pos - key_pos[None, :] < sliding_window
        elif sliding_window and sliding_window < n:
            pos = torch.arange(n, device=q.device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < sliding_window)
        o = torch.nn.functional.scaled_dot_product_attention(
            queries, k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
            scale=scale, enable_gqa=True)
        out[starts[b]:starts[b] + n] = o[0].transpose(0, 1)
    return out


def paged_attention_padded(
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
    """paged_attention for any rows and features, every query padded to the longest of the step (the general
    formulation: GPUs' torch backend, soft-capping, sinks, FP8 caches; the oracle the others are checked
    against)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    device = q.device
    batch = seq_lens.shape[0]
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    seq_lens = seq_lens.long()
    max_q = int(max_query_len if max_query_len is not None else q_lens.max())
    max_l = int(max_seq_len if max_seq_len is not None else seq_lens.max())

    # Each sequence's cache slots, padded to max_l.
    pos = torch.arange(max_l, device=device)
    blocks = block_tables.long()[:, (pos // block_size).clamp(max=block_tables.shape[1] - 1)]
    slots = blocks * block_size + pos % block_size
    key_valid = pos[None, :] < seq_lens[:, None]
    slots = torch.where(key_valid, slots, 0)
    # Keys no query reads: padding past seq_len, and (sliding windows) keys before every query's window,
    # where a host that keeps only the window (atom-server's window pool) leaves stale block ids whose
    # blocks may hold garbage (NaN/inf in a torch.empty cache). 0-probability * NaN would poison the output.
    unused = ~key_valid
    if sliding_window:
        unused |= pos[None, :] < (seq_lens - q_lens - sliding_window + 1)[:, None]

    # Pack queries into [B, max_q, H, D].
    qi = torch.arange(max_q, device=device)
    q_valid = qi[None, :] < q_lens[:, None]
    tok = torch.where(q_valid, qsl[:-1, None] + qi[None, :], 0)
    q_pos = (seq_lens - q_lens)[:, None] + qi[None, :]  # absolute position of each query
    allowed = (pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
    if sliding_window:
        allowed &= (q_pos[:, :, None] - pos[None, None, :]) < sliding_window

    if not logit_softcap and k_cache.dtype in (torch.float32, torch.bfloat16, torch.float16):
        # Batched matmuls in the cache dtype on keys/values gathered straight into [Hkv, B, max_l, D]: no
        # float32 copies of them and no einsum re-layouts (on CPU those cost more than the GEMMs at batch
        # 32); only the small scores go through float32 for the softmax.
        # Unused keys read the sequence's newest slot instead (just written, so finite) and are masked out
        # below by `allowed`.
        newest = slots.gather(1, (seq_lens - 1).clamp(0, max_l - 1)[:, None])
        safe = torch.where(unused, newest, slots)
        k, v = _read_slots_by_head(k_cache, safe), _read_slots_by_head(v_cache, safe)
        # queries [Hkv, B, max_q * group, D], row = query * group + g
        qp = q[tok].view(batch, max_q, num_kv_heads, group, head_dim).permute(2, 0, 1, 3, 4)
        qp = qp.reshape(num_kv_heads, batch, max_q * group, head_dim).to(k.dtype)
        scores = torch.matmul(qp, k.transpose(-1, -2)).float() * scale  # [Hkv, B, max_q * group, max_l]
        mask = (~allowed)[None, :, :, None, :].expand(1, batch, max_q, group, max_l)
        scores = scores.masked_fill_(mask.reshape(1, batch, max_q * group, max_l), float("-inf"))
        if sinks is not None:  # head = kv_head * group + g; the sink joins the denominator only
            sink = sinks.float().view(num_kv_heads, 1, 1, group).expand(-1, batch, max_q, -1)
            scores = torch.cat((scores, sink.reshape(num_kv_heads, batch, max_q * group, 1)), dim=-1)
            probs = torch.softmax(scores, dim=-1)[..., :-1].to(v.dtype)
        else:
            probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0).to(v.dtype)
        out = torch.matmul(probs, v).view(num_kv_heads, batch, max_q, group, head_dim)
        out = out.permute(1, 2, 0, 3, 4).reshape(batch, max_q, num_heads, head_dim)
    else:  # soft-capped logits, or an 8-bit (FP8) cache: everything in float32
        pad = unused[:, :, None, None]
        k = from_cache(_read_slots(k_cache, slots), k_scale).masked_fill(pad, 0.0)
        v = from_cache(_read_slots(v_cache, slots), v_scale).masked_fill(pad, 0.0)
        qp = q[tok].float().view(batch, max_q, num_kv_heads, group, head_dim)
        scores = torch.einsum("bqhgd,bkhd->bhgqk", qp, k) * scale
        if logit_softcap:
            scores = logit_softcap * torch.tanh(scores / logit_softcap)
        scores = scores.masked_fill(~allowed[:, None, None, :, :], float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(1, num_kv_heads, group, 1, 1).expand(batch, -1, -1, max_q, 1)
            probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(batch, max_q, num_heads, head_dim)
    result = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=device)
    result[tok[q_valid]] = out[q_valid].to(q.dtype)
    return result


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_attention where every row has one query, its newest token: q [B, H, D] -> out [B, H, D].

    No host reads and shapes set by (B, block-table width), so torch.compile traces it. On CPU the native kernel
    (atom.ops.cpu_native, one pass over each row's keys and values; an opaque custom op under torch.compile)
    runs it; elsewhere, or without the kernel, each row's blocks are gathered once into [B, Hkv, L, D] for
    batched matmuls. Keys past a row's length (the rest of its last block, table padding) and, with a window,
    keys before it (possibly stale blocks) are never read by the kernel and are masked out (values zeroed) by
    the matmul form, so garbage there (NaN in a torch.empty cache) never reaches the output."""
    if cpu_native.decode_attention_supported(q, k_cache, v_cache):
        return cpu_native.paged_decode_attention_op(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                    sliding_window, logit_softcap, sinks)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_l = block_tables.shape[1] * block_size
    pos = torch.arange(max_l, device=q.device)
    seq = seq_lens.long()[:, None]
    used = pos[None, :] < seq  # [B, L]
    if sliding_window:  # the query (position seq - 1) sees keys j with seq - 1 - j < window
        used = used & (pos[None, :] >= seq - sliding_window)
    # table entries past a row's blocks may be anything: read block 0 there (masked out below)
    blocks_used = -(-seq // block_size)  # [B, 1]
    tables = torch.where(torch.arange(block_tables.shape[1], device=q.device)[None, :] < blocks_used,
                         block_tables.long(), 0)
    k = k_cache[tables].reshape(batch, max_l, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache[tables].reshape(batch, max_l, num_kv_heads, head_dim).transpose(1, 2)
    if not logit_softcap and k_cache.dtype in (torch.float32, torch.bfloat16, torch.float16):
        k, v = k.contiguous(), v.contiguous()  # matmuls in the cache dtype
    else:  # soft-capped or FP8: float32
        k, v = from_cache(k, k_scale), from_cache(v, v_scale)
    v = v.masked_fill(~used[:, None, :, None], 0.0)
    qg = q.view(batch, num_kv_heads, group, head_dim).to(k.dtype)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    if logit_softcap:
        scores = logit_softcap * torch.tanh(scores / logit_softcap)
    scores = scores.masked_fill(~used[:, None, None, :], float("-inf"))
    if sinks is not None:  # head = kv_head * group + g; the sink joins the denominator only
        sink = sinks.float().view(1, num_kv_heads, group, 1).expand(batch, -1, -1, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)
