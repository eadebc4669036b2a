"""The DeepSeek-family models in atom-server: GLM-4-MoE (grouped-query attention + DeepSeek-V3's MoE) serves
greedy tokens equal to transformers' generate; DeepSeek-V2/V3 (multi-head latent attention, whose latent
KV cache this engine does not allocate yet) are refused at start with the reason."""

from __future__ import annotations

import math
import random

import pytest
import torch
import transformers

from atom_server import LLM, SamplingParams

MAX_NEW = 10


def _write(path, config) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    model.save_pretrained(path)
    model.generation_config.eos_token_id = None
    return model


def test_glm4_moe_greedy_matches_transformers(tmp_path):
    config = transformers.Glm4MoeConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
        routed_scaling_factor=1.5, use_qk_norm=True, attention_bias=True, max_position_embeddings=128,
        tie_word_embeddings=False)
    hf = _write(tmp_path, config)
    rng = random.Random(0)
    prompts = [[rng.randrange(300) for _ in range(n)] for n in (5, 19, 11)]
    want = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                              pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, max_model_len=64, max_num_batched_tokens=16,
              kv_cache_memory_bytes=1 << 20, skip_tokenizer_init=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


def test_mla_models_are_refused_with_the_reason(tmp_path):
    config = transformers.DeepseekV3Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=128)
    _write(tmp_path, config)
    with pytest.raises(ValueError, match="multi-head latent attention"):
        LLM(str(tmp_path), dtype="float32", block_size=4, max_model_len=64, kv_cache_memory_bytes=1 << 20,
            skip_tokenizer_init=True)
