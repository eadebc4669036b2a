"""Torch reference ops vs independent formulations (transformers' own modules where they exist).

Inputs are random and fresh each run (seed printed on failure, see conftest.py); float32 is compared
tightly, bfloat16 loosely.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply_rotary
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from atom.layers.rotary import RotaryEmbedding
from atom.ops.registry import resolve

F32 = {"rtol": 1e-5, "atol": 1e-5}


# ---------------------------------------------------------------- norm


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_matches_llama_rmsnorm(dtype, tol):
    hidden, eps = 96, 1e-5
    x = (torch.randn(13, hidden) * 3 + 0.5).to(dtype)
    ref = LlamaRMSNorm(hidden, eps=eps).to(dtype)
    ref.weight.data = (1 + 0.5 * torch.randn(hidden)).to(dtype)
    out = resolve("rms_norm", "torch")(x, ref.weight.data, eps)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_add_rms_norm_returns_norm_of_sum_and_the_sum(dtype, tol):
    hidden, eps = 64, 1e-6
    x, residual = torch.randn(9, hidden).to(dtype), (torch.randn(9, hidden) * 2).to(dtype)
    ref = LlamaRMSNorm(hidden, eps=eps).to(dtype)
    ref.weight.data = torch.randn(hidden).to(dtype)
    out, new_residual = resolve("fused_add_rms_norm", "torch")(x, residual, ref.weight.data, eps)
    torch.testing.assert_close(new_residual, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(out, ref(x + residual), rtol=tol, atol=tol)


# ---------------------------------------------------------------- rotary

_ROPE_CASES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


def _llama_rope_config(params: dict, max_positions: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       max_position_embeddings=max_positions, rope_parameters={"rope_theta": 5000.0, **params})


@pytest.mark.parametrize("rope", list(_ROPE_CASES))
@pytest.mark.parametrize("num_positions", [24, 90])  # 90 is past the original context of the scaled types
def test_neox_rotary_matches_transformers_for_each_rope_type(rope, num_positions):
    config = _llama_rope_config(_ROPE_CASES[rope], max_positions=64 if rope != "dynamic" else 48)
    head_dim, nq, nk = 32, 4, 2
    positions = torch.randperm(num_positions)[: num_positions // 2 + 3]
    if rope != "dynamic":
        positions = positions.clamp(max=config.max_position_embeddings - 1)
    q, k = torch.randn(len(positions), nq * head_dim), torch.randn(len(positions), nk * head_dim)

    with torch.device("cpu"):  # CPU tensors below, CPU kernels also in a GPU process
        rope_mod = RotaryEmbedding(config, head_dim, is_neox=True)
    q_out, k_out = rope_mod(positions, q.clone(), k.clone())

    hf = LlamaRotaryEmbedding(config)
    qh = q.view(1, -1, nq, head_dim).transpose(1, 2)
    kh = k.view(1, -1, nk, head_dim).transpose(1, 2)
    cos, sin = hf(qh, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(qh, kh, cos, sin)
    torch.testing.assert_close(q_out.view(1, -1, nq, head_dim).transpose(1, 2), q_ref, **F32)
    torch.testing.assert_close(k_out.view(1, -1, nk, head_dim).transpose(1, 2), k_ref, **F32)


def test_neox_partial_rotary_matches_gpt_neox():
    head_dim, heads = 32, 3
    config = GPTNeoXConfig(hidden_size=head_dim * heads, num_attention_heads=heads, rotary_pct=0.25,
                           max_position_embeddings=64)
    positions = torch.randint(0, 64, (11,))
    q, k = torch.randn(11, heads * head_dim), torch.randn(11, heads * head_dim)
    with torch.device("cpu"):
        rope_mod = RotaryEmbedding(config, head_dim, is_neox=True)
    q_out, k_out = rope_mod(positions, q, k)

    qh, kh = (t.view(1, -1, heads, head_dim).transpose(1, 2) for t in (q, k))
    cos, sin = GPTNeoXRotaryEmbedding(config)(qh, positions[None])
    assert cos.shape[-1] == head_dim // 4  # the oracle really is partial
    q_ref, k_ref = neox_apply_rotary(qh, kh, cos, sin)
    torch.testing.assert_close(q_out.view(1, -1, heads, head_dim).transpose(1, 2), q_ref, **F32)
    torch.testing.assert_close(k_out.view(1, -1, heads, head_dim).transpose(1, 2), k_ref, **F32)
    # the pass-through channels are untouched
    torch.testing.assert_close(q_out.view(11, heads, head_dim)[..., head_dim // 4:],
                               q.view(11, heads, head_dim)[..., head_dim // 4:], rtol=0, atol=0)


@pytest.mark.parametrize("rot_dim", [16, 8])
def test_gptj_rotary_matches_complex_formulation(rot_dim):
    head_dim, nq, nk, n_pos = 16, 4, 1, 40
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq[None]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).float()
    positions = torch.randint(0, n_pos, (9,))
    q, k = torch.randn(9, nq * head_dim), torch.randn(9, nk * head_dim)
    q_out, k_out = resolve("rotary_embedding", "torch")(positions, q, k, head_dim, cos_sin, False)

    def reference(x, heads):
        x = x.view(-1, heads, head_dim).double()
        pairs = torch.view_as_complex(x[..., :rot_dim].reshape(*x.shape[:-1], rot_dim // 2, 2).contiguous())
        rotated = pairs * torch.polar(torch.ones_like(angles[positions]), angles[positions])[:, None, :]
        out = torch.cat((torch.view_as_real(rotated).flatten(-2), x[..., rot_dim:]), dim=-1)
        return out.reshape(-1, heads * head_dim).float()

    torch.testing.assert_close(q_out, reference(q, nq), **F32)
    torch.testing.assert_close(k_out, reference(k, nk), **F32)


# ---------------------------------------------------------------- activations


@pytest.mark.parametrize("op,act", [("silu_and_mul", "silu"), ("gelu_tanh_and_mul", "gelu_pytorch_tanh")])
def test_gated_activation_matches_act2fn(op, act):
    x = torch.randn(7, 2 * 48) * 3
    ref = ACT2FN[act](x[:, :48]) * x[:, 48:]
    torch.testing.assert_close(resolve(op, "torch")(x), ref, **F32)


# ---------------------------------------------------------------- moe


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_topk_softmax_matches_per_row_formulation(renormalize):
    tokens, experts, top_k = 17, 8, 3
    logits = torch.randn(tokens, experts) * 2
    weights, ids = resolve("moe_topk_softmax", "torch")(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    for t in range(tokens):
        row = logits[t].double()
        probs = [math.exp(v) / sum(math.exp(u) for u in row.tolist()) for v in row.tolist()]
        best = sorted(range(experts), key=lambda e: -probs[e])[:top_k]
        w = [probs[e] for e in best]
        if renormalize:
            w = [v / sum(w) for v in w]
        assert ids[t].tolist() == best
        torch.testing.assert_close(weights[t].double(), torch.tensor(w, dtype=torch.float64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("activation,act,skipped", [("silu", "silu", False), ("gelu_tanh", "gelu_pytorch_tanh", False),
                                                    ("silu", "silu", True)])
def test_fused_experts_matches_dense_per_token_loop(activation, act, skipped):
    tokens, experts, hidden, inter, top_k = 11, 6, 32, 24, 2
    x = torch.randn(tokens, hidden)
    w1, w3 = torch.randn(experts, inter, hidden) / 4, torch.randn(experts, inter, hidden) / 4
    w2 = torch.randn(experts, hidden, inter) / 4
    weights = torch.rand(tokens, top_k)
    # Distinct experts per token, some experts unused.
    ids = torch.stack([torch.randperm(experts - 1)[:top_k] for _ in range(tokens)])
    if skipped:  # expert parallelism: pairs routed to another rank's expert are -1 and contribute nothing
        ids[torch.rand(tokens, top_k) < 0.4] = -1
        ids[0] = -1  # a token with no expert here at all
        assert (ids >= 0).any()
    out = resolve("fused_experts", "torch")(x, torch.cat((w1, w3), dim=1), w2, weights, ids, activation)
    ref = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(top_k):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = ACT2FN[act](w1[e] @ x[t]) * (w3[e] @ x[t])
            ref[t] += weights[t, j] * (w2[e] @ h)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- paged attention


def _paged_case(ctx_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32):
    """Random per-sequence K/V written into a NaN-filled paged cache through shuffled block tables.

    The prefix (ctx - q tokens) is written in one reshape_and_cache call, the new tokens (with padding
    slots interleaved) in another, as a host does across steps.
    """
    write = resolve("reshape_and_cache", "torch")
    blocks_per_seq = [-(-n // block_size) for n in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 5
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    pool = torch.randperm(num_blocks).tolist()
    width = max(blocks_per_seq) + 2
    tables = torch.zeros(len(ctx_lens), width, dtype=torch.int32)
    keys, values, queries = [], [], []
    for b, (n, nb) in enumerate(zip(ctx_lens, blocks_per_seq)):
        tables[b, :nb] = torch.tensor([pool.pop() for _ in range(nb)])
        tables[b, nb:] = torch.randint(0, num_blocks, (width - nb,))  # stale entries past the end
        keys.append(torch.randn(n, num_kv_heads, head_dim, dtype=dtype))
        values.append(torch.randn(n, num_kv_heads, head_dim, dtype=dtype))
        queries.append(torch.randn(q_lens[b], num_heads, head_dim, dtype=dtype))

    def slots(b, lo, hi):
        p = torch.arange(lo, hi)
        return tables[b, p // block_size].long() * block_size + p % block_size

    prefix = [(b, 0, n - q) for b, (n, q) in enumerate(zip(ctx_lens, q_lens)) if n > q]
    if prefix:
        write(torch.cat([keys[b][lo:hi] for b, lo, hi in prefix]),
              torch.cat([values[b][lo:hi] for b, lo, hi in prefix]),
              k_cache, v_cache, torch.cat([slots(b, lo, hi) for b, lo, hi in prefix]))
    pad_k = torch.randn(1, num_kv_heads, head_dim, dtype=dtype)
    new_k, new_v, new_slots = [], [], []
    for b, (n, q) in enumerate(zip(ctx_lens, q_lens)):
        new_k += [keys[b][n - q:], pad_k]
        new_v += [values[b][n - q:], pad_k]
        new_slots += [slots(b, n - q, n), torch.tensor([-1])]
    write(torch.cat(new_k), torch.cat(new_v), k_cache, v_cache, torch.cat(new_slots))
    qsl = torch.tensor([0] + list(q_lens)).cumsum(0).to(torch.int32)
    return torch.cat(queries), k_cache, v_cache, tables, qsl, keys, values, queries


def _reference_attention(q, k, v, scale, window, softcap):
    """One sequence: q [Q, H, D] are the last Q of the L context tokens k, v [L, Hkv, D]."""
    n_q, heads, _ = q.shape
    n_ctx, kv_heads, head_dim = k.shape
    qpos = torch.arange(n_ctx - n_q, n_ctx)[:, None]
    kpos = torch.arange(n_ctx)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed &= (qpos - kpos) < window
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=allowed, scale=scale, enable_gqa=heads != kv_heads)
        return out[0].transpose(0, 1)
    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim = heads // kv_heads, head_dim
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    out, _ = eager_attention_forward(module.eval(), qh, kh, vh, mask[None, None], scaling=scale, softcap=softcap)
    return out[0]


_ATTN_CASES = {
    # name: (ctx_lens, q_lens, heads, kv_heads, block_size, window, softcap)
    "prefill_varlen": ([5, 11, 1, 8], [5, 11, 1, 8], 4, 2, 4, None, None),
    "prefill_on_cached_prefix": ([9, 14, 6], [3, 5, 6], 4, 2, 4, None, None),
    "decode_gqa": ([7, 13, 2, 20], [1, 1, 1, 1], 8, 2, 4, None, None),
    "decode_mqa": ([7, 13, 2, 20], [1, 1, 1, 1], 4, 1, 4, None, None),
    "prefill_mha": ([6, 10], [4, 10], 3, 3, 4, None, None),
    "sliding_window": ([9, 14, 6], [3, 5, 6], 4, 2, 4, 4, None),
    "sliding_window_decode": ([9, 14, 3], [1, 1, 1], 4, 1, 2, 5, None),
    "softcap": ([9, 14, 6], [3, 5, 6], 4, 2, 4, None, 5.0),
    "block_size_1": ([5, 3], [2, 3], 2, 1, 1, None, None),
    "block_size_16": ([5, 40], [2, 7], 2, 1, 16, 20, 8.0),
}


@pytest.mark.parametrize("case", list(_ATTN_CASES))
def test_paged_attention_matches_unpaged_reference(case):
    ctx_lens, q_lens, heads, kv_heads, block_size, window, softcap = _ATTN_CASES[case]
    head_dim = 16
    q, k_cache, v_cache, tables, qsl, keys, values, queries = _paged_case(
        ctx_lens, q_lens, heads, kv_heads, head_dim, block_size)
    if softcap:
        q = q * 6  # make the cap bite
        queries = [x * 6 for x in queries]
    scale = head_dim**-0.5
    out = resolve("paged_attention", "torch")(
        q, k_cache, v_cache, tables, qsl, torch.tensor(ctx_lens, dtype=torch.int32), scale, window, softcap,
        max(q_lens), max(ctx_lens))
    assert out.shape == q.shape and torch.isfinite(out).all()
    for b in range(len(ctx_lens)):
        ref = _reference_attention(queries[b], keys[b], values[b], scale, window, softcap)
        torch.testing.assert_close(out[int(qsl[b]):int(qsl[b + 1])], ref, rtol=1e-5, atol=1e-5)


def test_paged_attention_bfloat16_close_to_float32():
    ctx_lens, q_lens = [9, 14, 6], [3, 1, 6]
    q, k_cache, v_cache, tables, qsl, keys, values, queries = _paged_case(ctx_lens, q_lens, 4, 2, 16, 4)
    args = (tables, qsl, torch.tensor(ctx_lens, dtype=torch.int32), 0.25)
    attend = resolve("paged_attention", "torch")
    ref = attend(q, k_cache, v_cache, *args)
    out = attend(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), *args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_sinks_and_stale_blocks_before_the_window(dtype):
    """GPT-OSS under atom-server's window pool: sink logits join the softmax denominator only, and table
    entries before every query's window point at a block of NaN (freed, never written), which must not
    reach the output."""
    ctx_lens, q_lens, heads, kv_heads, block_size, window = [13, 18, 9], [1, 4, 2], 4, 2, 2, 5
    q, k_cache, v_cache, tables, qsl, keys, values, queries = _paged_case(
        ctx_lens, q_lens, heads, kv_heads, 16, block_size, dtype)
    nan_block = k_cache.shape[0]  # an extra block nobody writes
    k_cache = torch.cat((k_cache, torch.full_like(k_cache[:1], float("nan"))))
    v_cache = torch.cat((v_cache, torch.full_like(v_cache[:1], float("nan"))))
    for b, (n, n_q) in enumerate(zip(ctx_lens, q_lens)):
        first_read = n - n_q - window + 1
        tables[b, : max(first_read, 0) // block_size] = nan_block
    sinks = torch.randn(heads)
    scale = 0.25
    out = resolve("paged_attention", "torch")(
        q, k_cache, v_cache, tables, qsl, torch.tensor(ctx_lens, dtype=torch.int32), scale, window, None,
        max(q_lens), max(ctx_lens), sinks=sinks)
    assert torch.isfinite(out).all()
    for b, (n, n_q) in enumerate(zip(ctx_lens, q_lens)):
        qh = queries[b].double()  # [Q, H, D]
        kh = keys[b].double().repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
        vh = values[b].double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qh, kh) * scale
        qpos, kpos = torch.arange(n - n_q, n)[:, None], torch.arange(n)[None, :]
        scores = scores.masked_fill(~((kpos <= qpos) & (qpos - kpos < window)), float("-inf"))
        with_sink = torch.cat((scores, sinks.double()[:, None, None].expand(-1, n_q, 1)), dim=-1)
        probs = torch.softmax(with_sink, dim=-1)[..., :-1]
        ref = torch.einsum("hqk,khd->qhd", probs, vh)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out[int(qsl[b]):int(qsl[b + 1])].double(), ref, rtol=tol, atol=tol)


def test_reshape_and_cache_writes_each_token_to_its_slot_and_skips_padding():
    num_blocks, block_size, kv_heads, head_dim = 6, 4, 2, 8
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:10]
    slots[3] = -1
    key, value = torch.randn(10, kv_heads, head_dim), torch.randn(10, kv_heads, head_dim)
    resolve("reshape_and_cache", "torch")(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    keep = slots >= 0
    torch.testing.assert_close(flat_k[slots[keep]], key[keep], rtol=0, atol=0)
    torch.testing.assert_close(flat_v[slots[keep]], value[keep], rtol=0, atol=0)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.equal(flat_k[untouched], before_k.view(-1, kv_heads, head_dim)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, kv_heads, head_dim)[untouched])


# ---------------------------------------------------------------- sampling


def _brute_force_keep(logits_row, top_k, top_p, min_p) -> set[int]:
    """Tokens surviving min-p (vs the max prob), top-k, then top-p on the renormalized survivors."""
    values = logits_row.double().tolist()
    z = max(values)
    probs = [math.exp(v - z) for v in values]
    total = sum(probs)
    probs = [p / total for p in probs]
    order = sorted(range(len(values)), key=lambda i: -values[i])
    keep = order
    if min_p > 0:
        keep = [i for i in keep if probs[i] >= min_p * max(probs)]
    if 0 < top_k < len(values):
        keep = keep[:top_k]
    if top_p < 1.0:
        mass = sum(probs[i] for i in keep)
        kept, cum = [], 0.0
        for i in keep:
            if cum >= top_p:
                break
            kept.append(i)
            cum += probs[i] / mass
        keep = kept
    return set(keep)


def test_greedy_rows_are_argmax_in_a_mixed_batch():
    logits = torch.randn(6, 50) * 3
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0, 1.3])
    tokens = resolve("sample", "torch")(logits, temperature)
    assert tokens.dtype == torch.int64
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
    assert torch.equal(resolve("sample", "torch")(logits, torch.zeros(6)), logits.argmax(-1))


def test_top_k_top_p_min_p_masks_match_brute_force():
    from atom.ops.sampling import apply_top_k_top_p_min_p

    rows, vocab = 24, 40
    logits = torch.randn(rows, vocab) * 2
    top_k = torch.randint(0, vocab + 5, (rows,))
    top_p = torch.rand(rows).clamp(min=0.05)
    min_p = torch.rand(rows) * 0.3
    # some rows with each filter off
    top_k[::4] = 0
    top_p[1::4] = 1.0
    min_p[2::4] = 0.0
    masked = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    for r in range(rows):
        expected = _brute_force_keep(logits[r], int(top_k[r]), float(top_p[r]), float(min_p[r]))
        kept = set(torch.isfinite(masked[r]).nonzero().flatten().tolist())
        assert kept == expected, f"row {r}: k={int(top_k[r])} p={float(top_p[r]):.3f} min_p={float(min_p[r]):.3f}"
        assert torch.equal(masked[r][list(kept)], logits[r][list(kept)])


def test_seeded_rows_reproducible_regardless_of_batch():
    sample = resolve("sample", "torch")
    vocab, steps = 64, 12
    target = torch.randn(steps, vocab)

    def run(batch_size, index, seed):
        gen = torch.Generator().manual_seed(seed)
        out = []
        for s in range(steps):
            logits = torch.randn(batch_size, vocab)
            logits[index] = target[s]
            gens = [None] * batch_size
            gens[index] = gen
            temp = torch.rand(batch_size) + 0.5
            temp[index] = 1.0
            out.append(int(sample(logits, temp, torch.full((batch_size,), 50), torch.full((batch_size,), 0.95),
                                  None, gens)[index]))
        return out

    first = run(1, 0, seed=1234)
    assert run(5, 3, seed=1234) == first
    assert run(3, 2, seed=1234) == first
    assert run(4, 1, seed=99) != first  # the seed does matter


def test_sampled_frequencies_match_the_filtered_distribution():
    vocab, draws, temperature, top_k, top_p = 10, 40_000, 0.7, 6, 0.9
    while True:  # a distribution where the filters leave several tokens, so frequencies say something
        row = torch.randn(vocab)
        keep = sorted(_brute_force_keep(row / temperature, top_k, top_p, 0.0))
        if len(keep) >= 3:
            break
    probs = torch.softmax((row / temperature).double()[keep], dim=0)
    tokens = resolve("sample", "torch")(row.expand(draws, vocab).clone(), torch.full((draws,), temperature),
                                        torch.full((draws,), top_k), torch.full((draws,), top_p))
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts.sum() == counts[keep].sum(), "sampled a filtered-out token"
    expected = probs * draws
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    # df <= 5; P(chi2 > 60) < 1e-11 for a correct sampler, while a wrong temperature or a missed filter
    # shifts tens of percent of the mass (chi2 in the thousands at 40k draws).
    assert chi2 < 60, f"chi2={chi2:.1f} counts={counts[keep].tolist()} expected={expected.tolist()}"
