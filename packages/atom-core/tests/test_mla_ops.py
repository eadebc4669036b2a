"""Torch references of the MLA ops and of grouped top-k routing (the oracles of the Triton kernels).

- routing: against transformers' own DeepSeek-V2 / V3 and GLM-4-MoE routers on random inputs;
- MLA: the absorbed decode reference and the expanded prefill reference agree on decode steps (two
  formulations of the same attention), the latent cache write puts rows where the block table says;
- the latent cache sizing against the multi-head layout of the same model.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

from atom.layers.kv_cache import MLAKVSpec
from atom.ops.mla import mla_cache_write, mla_decode, mla_prefill
from atom.ops.moe_routing import check_routing, moe_grouped_topk

ROUTERS = {
    # name: (router class, config class, config overrides, grouped_topk arguments after the bias)
    "v2_greedy": (DeepseekV2TopkRouter, "DeepseekV2Config",
                  dict(n_routed_experts=12, num_experts_per_tok=3, topk_method="greedy", routed_scaling_factor=1.7),
                  (3, 1, 1, "softmax", "max", False, 1.7)),
    "v2_group_limited": (DeepseekV2TopkRouter, "DeepseekV2Config",
                         dict(n_routed_experts=12, num_experts_per_tok=3, topk_method="group_limited_greedy",
                              n_group=4, topk_group=2, routed_scaling_factor=1.0),
                         (3, 4, 2, "softmax", "max", False, 1.0)),
    "v3_norm_topk": (DeepseekV3TopkRouter, "DeepseekV3Config",
                     dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True,
                          routed_scaling_factor=2.5),
                     (4, 4, 2, "sigmoid", "top2_sum", True, 2.5)),
    "glm4_moe_no_norm": (Glm4MoeTopkRouter, "Glm4MoeConfig",
                         dict(n_routed_experts=10, num_experts_per_tok=2, n_group=2, topk_group=1,
                              norm_topk_prob=False, routed_scaling_factor=1.0),
                         (2, 2, 1, "sigmoid", "top2_sum", False, 1.0)),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_grouped_topk_matches_transformers_routers(name):
    router_cls, config_cls, overrides, args = ROUTERS[name]
    config = getattr(transformers, config_cls)(hidden_size=32, num_attention_heads=4, **overrides)
    router = router_cls(config)
    hidden = torch.randn(40, 32)
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight) / 4)
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(0.1 * torch.randn_like(bias))
        _, ref_w, ref_ids = router(hidden)
    logits = torch.nn.functional.linear(hidden, router.weight)
    w, ids = moe_grouped_topk(logits, bias, *args)
    # the order of the k picks is unspecified (topk sorted=False): compare sorted by expert id
    ids_s, order = ids.sort(-1)
    ref_s, ref_order = ref_ids.sort(-1)
    assert torch.equal(ids_s, ref_s)
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad, message", [
    (dict(num_groups=3), "does not divide"),
    (dict(topk_group=5), "topk_group=5"),
    (dict(top_k=9), "exceeds"),
    (dict(scoring="relu"), "scoring function 'relu'"),
])
def test_bad_routing_configs_get_a_clear_error(bad, message):
    args = dict(num_experts=8, top_k=2, num_groups=4, topk_group=2, scoring="sigmoid", group_score="top2_sum")
    with pytest.raises(ValueError, match=message):
        check_routing(**{**args, **bad})


def _latent_cache(num_blocks, block_size, lora, rope, lens):
    cache = torch.randn(num_blocks, block_size, lora + rope)
    perm = torch.randperm(num_blocks)
    width = max(-(-n // block_size) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        k = -(-n // block_size)
        tables[i, :k] = perm[used:used + k].int()
        used += k
    return cache, tables


def test_absorbed_decode_equals_expanded_attention():
    """mla_decode (absorbed: attention in the latent space) and mla_prefill (expanded: K/V per head from
    the latent) on the same decode step: the same numbers up to float32 rounding."""
    heads, lora, rope, nope, v, bs = 3, 24, 8, 16, 12, 4
    lens = [1, 6, 13]
    cache, tables = _latent_cache(12, bs, lora, rope, lens)
    q_nope, q_pe = torch.randn(3, heads, nope), torch.randn(3, heads, rope)
    w = torch.randn(heads * (nope + v), lora) / 4
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.arange(4, dtype=torch.int32)
    absorbed = mla_decode(q_nope, q_pe, cache, w, tables, seq_lens, 0.2)  # reads the whole block table
    expanded = mla_prefill(q_nope, q_pe, cache, w, tables, qsl, seq_lens, 0.2)
    torch.testing.assert_close(absorbed, expanded, rtol=1e-5, atol=1e-5)
    # a padded batch slot (length 0) attends to nothing
    zero = mla_decode(q_nope, q_pe, cache, w, tables, torch.tensor([0, 6, 13], dtype=torch.int32), 0.2)
    assert torch.all(zero[0] == 0) and torch.equal(zero[1:], absorbed[1:])


def test_latent_cache_write_follows_the_slots():
    cache = torch.zeros(3, 4, 10)
    kv_c, k_pe = torch.randn(4, 7), torch.randn(4, 3)
    slots = torch.tensor([5, -1, 0, 11])
    mla_cache_write(kv_c, k_pe, cache, slots)
    flat = cache.view(12, 10)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[s], torch.cat((kv_c[t], k_pe[t])))
    assert int((flat.abs().sum(-1) > 0).sum()) == 3  # the padding token wrote nothing


def test_latent_cache_sizing_vs_multi_head_equivalent():
    """Per token the latent cache holds kv_lora_rank + rope_dim values; the multi-head layout of the same
    model holds keys and values of every head (2 * heads * (nope + rope) values). For a given memory
    budget the block count grows by that ratio (DeepSeek-V2-Lite's shapes, bf16, block size 16: 10.7x)."""
    heads, lora, nope, rope, block = 16, 512, 128, 64, 16
    spec = MLAKVSpec(layer_idx=0, kv_lora_rank=lora, qk_rope_head_dim=rope, dtype=torch.bfloat16)
    assert spec.kind == "mla"
    assert spec.cache_shape(7, block) == (7, block, lora + rope)
    assert spec.bytes_per_block(block) == block * (lora + rope) * 2
    assert spec.allocate(2, block, "cpu").latent.dtype == torch.bfloat16
    mha_bytes_per_block = block * 2 * heads * (nope + rope) * 2
    ratio = mha_bytes_per_block / spec.bytes_per_block(block)
    assert ratio == pytest.approx(2 * 16 * 192 / 576)
    budget = 40 << 30
    mla_blocks, mha_blocks = budget // spec.bytes_per_block(block), budget // mha_bytes_per_block
    assert mha_blocks * ratio - 1 < mla_blocks <= mha_blocks * ratio + ratio
