"""Attention over a paged KV cache.

Cache layout (per layer): k_cache, v_cache = [num_blocks, block_size, num_kv_heads, head_dim].
A token at position p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.

`paged_attention` is varlen: sequence b has query tokens q[query_start_loc[b]:query_start_loc[b+1]],
which are the *last* tokens of its seq_lens[b] context tokens (the earlier ones are a cached prefix).
Decode is the case where every query length is 1. Causal masking, GQA/MQA (num_heads a multiple of
num_kv_heads), sliding window (a query at position i sees keys j with i - j < window, as
transformers defines it) and logit soft-capping (cap * tanh(s / cap)) are supported.
"""

from __future__ import annotations

import torch

from atom.ops.registry import define_op, register

CHECK_BLOCK_SIZE = 16


def _heads(static) -> tuple[int, int, int]:
    return int(static.get("num_heads", 4)), int(static.get("num_kv_heads", 2)), int(static.get("head_dim", 128))


def slot_example(t, num_tokens: int, num_blocks: int = 4) -> torch.Tensor:
    """Distinct cache slots for a self-check, one of them -1 (a padding token, not written)."""
    slots = t.randperm(num_blocks * CHECK_BLOCK_SIZE)[:num_tokens]
    slots[num_tokens // 2] = -1
    return slots


def _cache_example(t, static):
    _, kv, d = _heads(static)
    caches = [torch.zeros(4, CHECK_BLOCK_SIZE, kv, d, dtype=t.dtype, device=t.device) for _ in range(2)]
    return (t.randn(6, kv, d), t.randn(6, kv, d), *caches, slot_example(t, 6))


def _attention_example(t, static):
    """A decode-only batch and a mixed prefill/decode batch over a paged cache with shuffled blocks."""
    h, kv, d = _heads(static)
    window, softcap = static.get("sliding_window"), static.get("logit_softcap")
    k_cache, v_cache = t.randn(8, CHECK_BLOCK_SIZE, kv, d), t.randn(8, CHECK_BLOCK_SIZE, kv, d)
    tables = t.randperm(8)[:6].view(2, 3).to(torch.int32)
    calls = []
    for q_lens, ctx in (([1, 1], [40, 7]), ([1, 5], [23, 40])):
        qsl = t.tensor([0, q_lens[0], q_lens[0] + q_lens[1]], torch.int32)
        calls.append((t.randn(sum(q_lens), h, d), k_cache, v_cache, tables, qsl, t.tensor(ctx, torch.int32),
                      d**-0.5, window, softcap, max(q_lens), max(ctx)))
    return calls


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
) -> None:
    """Write key/value [T, num_kv_heads, head_dim] into the caches; slots < 0 (padding) are skipped."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slots, value[keep].to(v_cache.dtype))


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
) -> torch.Tensor:
    """q [T, num_heads, head_dim] -> out [T, num_heads, head_dim] (T = query_start_loc[-1])."""
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
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)

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
        # Padding keys read the sequence's first slot instead of slot 0: written, so finite, and masked
        # out below (a NaN there would survive 0-probability in probs @ v).
        safe = torch.where(key_valid, slots, slots[:, :1])
        k = flat_k.transpose(0, 1)[:, safe]
        v = flat_v.transpose(0, 1)[:, safe]
        # queries [Hkv, B, max_q * group, D], row = query * group + g
        qp = q[tok].view(batch, max_q, num_kv_heads, group, head_dim).permute(2, 0, 1, 3, 4)
        qp = qp.reshape(num_kv_heads, batch, max_q * group, head_dim).to(k.dtype)
        scores = torch.matmul(qp, k.transpose(-1, -2)).float() * scale  # [Hkv, B, max_q * group, max_l]
        mask = (~allowed)[None, :, :, None, :].expand(1, batch, max_q, group, max_l)
        scores = scores.masked_fill_(mask.reshape(1, batch, max_q * group, max_l), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0).to(v.dtype)
        out = torch.matmul(probs, v).view(num_kv_heads, batch, max_q, group, head_dim)
        out = out.permute(1, 2, 0, 3, 4).reshape(batch, max_q, num_heads, head_dim)
    else:  # soft-capped logits, or an 8-bit cache: everything in float32
        # Padding keys read slot 0, which may hold garbage (NaN/inf in a torch.empty cache); zero them so
        # 0-probability * garbage cannot poison the output.
        pad = ~key_valid[:, :, None, None]
        k = flat_k[slots].float().masked_fill(pad, 0.0)
        v = flat_v[slots].float().masked_fill(pad, 0.0)
        qp = q[tok].float().view(batch, max_q, num_kv_heads, group, head_dim)
        scores = torch.einsum("bqhgd,bkhd->bhgqk", qp, k) * scale
        scores = logit_softcap * torch.tanh(scores / logit_softcap)
        scores = scores.masked_fill(~allowed[:, None, None, :, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(batch, max_q, num_heads, head_dim)
    result = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=device)
    result[tok[q_valid]] = out[q_valid].to(q.dtype)
    return result
