"""Multi-head latent attention (DeepSeek-V2/V3 MLA) over a paged latent cache.

Names (per attention layer, on this TP rank): H heads; L = kv_lora_rank; R = qk_rope_head_dim;
P = qk_nope_head_dim; V = v_head_dim.

Cache layout: one tensor per layer, kv_cache [num_blocks, block_size, L + R]: per token the normed
compressed KV (kv_c, L values) then the roped shared key (k_pe, R values). Slots as in paged attention:
block_table[p // block_size] * block_size + p % block_size.

kv_b_proj's weight w_kv_b [H * (P + V), L] holds, per head, W_UK (P rows) then W_UV (V rows):
    k_nope[h] = kv_c @ W_UK[h]^T, v[h] = kv_c @ W_UV[h]^T.
Attention logits are q_nope . k_nope + q_pe . k_pe, times `scale`.

Two formulations, equal in exact arithmetic:
- expanded ("MHA", compute-friendly): gather the latent, expand K/V per head, attend. The prefill
  reference uses it.
- absorbed ("MQA", data-movement friendly): q_lat[h] = q_nope[h] @ W_UK[h] (L values), attend over the
  latent cache itself (logits q_lat . kv_c + q_pe . k_pe, values kv_c), then out[h] = o_lat[h] @ W_UV[h]^T.
  Decode uses it: the cache is read once for all heads.

FP8 latent cache (float8_e4m3fn / float8_e4m3fnuz caches): one per-tensor scale per layer, `kv_scale`, a
float32 tensor of one element (the checkpoint's k_scale of the layer, else 1.0, as vLLM's MLA reads it); the
cache holds fp8(clamp([kv_c | k_pe] / kv_scale)) and is read back as entry * kv_scale (the same convention
as the paged attention's k_scale, atom.ops.attention). kv_scale is the trailing optional argument of every
MLA op (torch, Triton, the op schemas); None means 1.0, and it is ignored for caches that are not FP8.
"""

from __future__ import annotations

import torch

from atom.ops.attention import from_cache, to_cache_dtype
from atom.ops.quant_fp8 import FP8_DTYPES
from atom.ops.registry import define_op, register

CHECK_BLOCK_SIZE = 16


def _dims(static) -> tuple[int, int, int, int, int]:
    """(heads, L, R, P, V) of a self-check: the layer's (static) or small DeepSeek-like ones."""
    return tuple(int(static.get(k, d)) for k, d in (("num_heads", 4), ("kv_lora_rank", 64),
                                                     ("qk_rope_head_dim", 16), ("qk_nope_head_dim", 32),
                                                     ("v_head_dim", 32)))


def _latent_cache_example(t, static, num_blocks: int, fill: bool) -> tuple:
    """(cache, trailing kv_scale arguments) in the layer's cache dtype (static["kv_cache_dtype"], default the
    activations'): an FP8 cache holds random rows quantized with a scale != 1, passed as (kv_scale,); other
    caches give ()."""
    _, lora, rope, _, _ = _dims(static)
    dtype = static.get("kv_cache_dtype") or t.dtype
    rows = t.randn(num_blocks, CHECK_BLOCK_SIZE, lora + rope, dtype=torch.float32) if fill else \
        torch.zeros(num_blocks, CHECK_BLOCK_SIZE, lora + rope, device=t.device)
    if dtype not in FP8_DTYPES:
        return rows.to(dtype), ()
    scale = t.tensor(0.5, torch.float32)
    return to_cache_dtype(rows, dtype, scale), (scale,)


def _write_example(t, static):
    from atom.ops.attention import slot_example

    _, lora, rope, _, _ = _dims(static)
    cache, scales = _latent_cache_example(t, static, 4, fill=False)
    return (t.randn(6, lora), t.randn(6, rope), cache, slot_example(t, 6), *scales)


def _latent_example(t, static, q_lens: list[int], ctx: list[int]):
    h, lora, rope, nope, v = _dims(static)
    cache, scales = _latent_cache_example(t, static, 8, fill=True)
    tables = t.randperm(8)[:6].view(2, 3).to(torch.int32)
    tokens = sum(q_lens)
    return (t.randn(tokens, h, nope), t.randn(tokens, h, rope), cache, t.randn(h * (nope + v), lora, scale=lora**-0.5),
            tables, t.tensor(ctx, torch.int32)), scales


def _decode_example(t, static):
    (q_nope, q_pe, cache, w, tables, lens), scales = _latent_example(t, static, [1, 1], [40, 7])
    return (q_nope, q_pe, cache, w, tables, lens, 0.1, 40, *scales)


def _prefill_example(t, static):
    (q_nope, q_pe, cache, w, tables, lens), scales = _latent_example(t, static, [1, 5], [23, 40])
    return (q_nope, q_pe, cache, w, tables, t.tensor([0, 1, 6], torch.int32), lens, 0.1, 5, 40, *scales)


def _out_like(q_nope: torch.Tensor, w_kv_b: torch.Tensor) -> torch.Tensor:
    """[T, H, V]: V from kv_b_proj's rows, H * (P + V)."""
    num_heads, nope = q_nope.shape[1], q_nope.shape[2]
    return q_nope.new_empty(q_nope.shape[0], num_heads, w_kv_b.shape[0] // num_heads - nope)


define_op("mla_cache_write", mutates_args=("kv_cache",), example=_write_example, fake=lambda *args, **kwargs: None)
define_op("mla_decode", example=_decode_example,
          fake=lambda q_nope, q_pe, kv_cache, w_kv_b, *args, **kwargs: _out_like(q_nope, w_kv_b))
define_op("mla_prefill", example=_prefill_example,
          fake=lambda q_nope, q_pe, kv_cache, w_kv_b, *args, **kwargs: _out_like(q_nope, w_kv_b))


def _prep_example(t, static):
    from atom.ops.attention import slot_example
    from atom.ops.rope import rope_example

    h, lora, rope, nope, _ = _dims(static)
    positions, cos_sin = rope_example(t, {"head_dim": rope})
    n = positions.shape[0]
    cache, scales = _latent_cache_example(t, static, 4, fill=False)
    q = t.randn(n, h, nope + rope)
    return (positions, q[..., nope:], t.randn(n, lora + rope), 1 + t.randn(lora, scale=0.1), 1e-6, cos_sin,
            bool(static.get("is_neox", False)), cache, slot_example(t, n), *scales)


define_op("mla_norm_rope_cache", mutates_args=("kv_cache",), example=_prep_example,
          fake=lambda positions, q_pe, *args, **kwargs: q_pe.new_empty(q_pe.shape))


def split_kv_b(w_kv_b: torch.Tensor, num_heads: int, nope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_UK [H, P, L], W_UV [H, V, L]) as views of kv_b_proj's weight [H * (P + V), L]."""
    w = w_kv_b.view(num_heads, -1, w_kv_b.shape[-1])
    return w[:, :nope_dim], w[:, nope_dim:]


# Boolean-mask indexing (padding slots skipped): a data-dependent shape, so no capture, a custom op under compile.
@register("mla_cache_write", "torch", cuda_graph=False, traceable=False)
def mla_cache_write(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, kv_scale: torch.Tensor | None = None) -> None:
    """Write kv_c [T, L] and k_pe [T, R] into kv_cache [blocks, block_size, L + R]; slots < 0 are skipped.
    An FP8 cache stores fp8(clamp(row / kv_scale)) (module docstring)."""
    keep = slot_mapping >= 0
    rows = to_cache_dtype(torch.cat((kv_c, k_pe), dim=-1)[keep], kv_cache.dtype, kv_scale)
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    if kv_cache.dtype in FP8_DTYPES:  # index_copy_ has no FP8 kernel on CPU: copy the bytes
        flat, rows = flat.view(torch.uint8), rows.view(torch.uint8)
    flat.index_copy_(0, slot_mapping[keep].long(), rows)


# Composes ops that cannot be captured (mla_cache_write's boolean mask).
@register("mla_norm_rope_cache", "torch", cuda_graph=False, traceable=False)
def mla_norm_rope_cache(positions: torch.Tensor, q_pe: torch.Tensor, kv_a: torch.Tensor, kv_weight: torch.Tensor,
                        eps: float, cos_sin: torch.Tensor, is_neox: bool, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """MLA's input prep in one op: q_pe [T, H, R] (un-roped; any strides, e.g. a view into q_proj's output) and
    kv_a [T, L + R] (kv_a_proj_with_mqa's output: the latent kv_c, then k_pe) -> the roped q_pe [T, H, R]
    (contiguous); writes the cache row [rms_norm(kv_c) * kv_weight | rope(k_pe)] at slot_mapping (-1 skipped).
    The same arithmetic as rms_norm, rotary_embedding and mla_cache_write one after the other."""
    from atom.ops.norm import rms_norm
    from atom.ops.rope import rotary_embedding

    num_tokens, num_heads, rope = q_pe.shape
    lora = kv_a.shape[-1] - rope
    kv_c = rms_norm(kv_a[:, :lora], kv_weight, eps)
    q_rot, k_pe = rotary_embedding(positions, q_pe.reshape(num_tokens, num_heads * rope), kv_a[:, lora:], rope,
                                   cos_sin, is_neox)
    mla_cache_write(kv_c, k_pe, kv_cache, slot_mapping, kv_scale)
    return q_rot.reshape(num_tokens, num_heads, rope)


def _gather_latent(kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   max_seq_len: int, kv_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's latent rows, padded: (latent [B, max_l, L + R] float32 (an FP8 cache's dequantized
    with kv_scale), key positions [max_l], valid [B, max_l]). Padding rows are zero (a torch.empty cache may
    hold NaN there)."""
    block_size = kv_cache.shape[1]
    pos = torch.arange(max_seq_len, device=kv_cache.device)
    blocks = block_tables.long()[:, (pos // block_size).clamp(max=block_tables.shape[1] - 1)]
    valid = pos[None, :] < seq_lens.long()[:, None]
    slots = torch.where(valid, blocks * block_size + pos % block_size, 0)
    rows = kv_cache.view(-1, kv_cache.shape[-1])[slots]
    latent = from_cache(rows, kv_scale).masked_fill(~valid[..., None], 0.0)
    return latent, pos, valid


@register("mla_decode", "torch")
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
    """One query per sequence (token b belongs to sequence b), absorbed form.
    q_nope [B, H, P], q_pe [B, H, R] -> out [B, H, V]. A sequence of length 0 (batch padding) gives zeros.
    Without max_seq_len the whole block table is read (no host sync: capturable). An FP8 cache is read as
    entry * kv_scale."""
    num_heads, nope_dim = q_nope.shape[1], q_nope.shape[2]
    lora = kv_cache.shape[-1] - q_pe.shape[-1]
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * kv_cache.shape[1]
    w_uk, w_uv = split_kv_b(w_kv_b, num_heads, nope_dim)
    q_lat = torch.einsum("bhp,hpl->bhl", q_nope.float(), w_uk.float())
    latent, _, valid = _gather_latent(kv_cache, block_tables, seq_lens, max_seq_len, kv_scale)
    kv_c, k_pe = latent[..., :lora], latent[..., lora:]
    scores = (torch.einsum("bhl,bkl->bhk", q_lat, kv_c) + torch.einsum("bhr,bkr->bhk", q_pe.float(), k_pe)) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    o_lat = torch.einsum("bhk,bkl->bhl", probs, kv_c)
    return torch.einsum("bhl,hvl->bhv", o_lat, w_uv.float()).to(q_nope.dtype)


# Scatters the packed queries back by a boolean mask (and reads the longest query on the host when not told).
@register("mla_prefill", "torch", cuda_graph=False, traceable=False)
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
    """Varlen causal MLA, expanded form: sequence b's queries q[qsl[b]:qsl[b+1]] are the last tokens of its
    seq_lens[b] cached tokens (their own latent rows already written), so they see the cached prefix and
    each other causally. q_nope [T, H, P], q_pe [T, H, R] -> out [T, H, V]. An FP8 cache is read as
    entry * kv_scale."""
    num_tokens, num_heads, nope_dim = q_nope.shape
    lora = kv_cache.shape[-1] - q_pe.shape[-1]
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    max_q = int(max_query_len if max_query_len is not None else q_lens.max())
    max_l = int(max_seq_len if max_seq_len is not None else seq_lens.max())
    latent, pos, valid = _gather_latent(kv_cache, block_tables, seq_lens, max_l, kv_scale)
    kv_c, k_pe = latent[..., :lora], latent[..., lora:]
    w_uk, w_uv = split_kv_b(w_kv_b, num_heads, nope_dim)
    k_nope = torch.einsum("bkl,hpl->bkhp", kv_c, w_uk.float())
    v = torch.einsum("bkl,hvl->bkhv", kv_c, w_uv.float())

    qi = torch.arange(max_q, device=q_nope.device)
    q_valid = qi[None, :] < q_lens[:, None]
    tok = torch.where(q_valid, qsl[:-1, None] + qi[None, :], 0)
    qn, qp = q_nope[tok].float(), q_pe[tok].float()  # [B, max_q, H, *]
    scores = (torch.einsum("bqhp,bkhp->bhqk", qn, k_nope) + torch.einsum("bqhr,bkr->bhqk", qp, k_pe)) * scale
    q_pos = (seq_lens.long() - q_lens)[:, None] + qi[None, :]
    allowed = (pos[None, None, :] <= q_pos[:, :, None]) & valid[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhv->bqhv", probs, v)
    result = torch.empty(num_tokens, num_heads, v.shape[-1], dtype=q_nope.dtype, device=q_nope.device)
    result[tok[q_valid]] = out[q_valid].to(q_nope.dtype)
    return result
