"""Tiny random HF checkpoints, one per architecture ATOM serves in SGLang (written with save_pretrained)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, vocab_size=256)

_MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=12,
            moe_intermediate_size=32, first_k_dense_replace=1)  # SGLang on CPU pads sizes to 32

CONFIGS = {
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(
        **_COMMON, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "MistralForCausalLM": lambda: transformers.MistralConfig(**_COMMON, sliding_window=5, head_dim=16),
    "Qwen2ForCausalLM": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=False),
    "Qwen3ForCausalLM": lambda: transformers.Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=True),
    "Qwen3MoeForCausalLM": lambda: transformers.Qwen3MoeConfig(
        **{**_COMMON, "intermediate_size": 64}, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1]),
    "MixtralForCausalLM": lambda: transformers.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
    # DeepSeek-V2-Lite's layout (no q_lora, greedy softmax routing, 2 shared experts, yarn with mscale): SGLang
    # gives it its MLA pool by architecture name
    "DeepseekV2ForCausalLM": lambda: transformers.DeepseekV2Config(
        **{**_COMMON, "num_key_value_heads": 4}, **_MLA, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=2, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "beta_fast": 32, "beta_slow": 1}),
    # DeepSeek-V3: q_lora, sigmoid routing with correction bias over 4 groups, norm_topk
    "DeepseekV3ForCausalLM": lambda: transformers.DeepseekV3Config(
        **{**_COMMON, "num_key_value_heads": 4}, **_MLA, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        topk_method="noaux_tc"),
    # GLM-4-MoE: grouped-query attention (SGLang's MHA pool) with partial rotary and qk-norm, DeepSeek-V3's MoE
    "Glm4MoeForCausalLM": lambda: transformers.Glm4MoeConfig(
        **_COMMON, head_dim=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=1.5, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5),
}
MLA_ARCHS = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}


def write_checkpoint(arch: str, path: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Save a random float32 model of `arch` to `path`; returns the HF model (eval mode)."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config.architectures = [arch]
    config.initializer_range = 0.2  # large enough that greedy decoding does not just repeat a token
    model = getattr(transformers, arch)(config).float().eval()
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0; perturb them so they matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for name, buf in model.named_buffers():  # a zero routing correction bias would change no choice
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    model.save_pretrained(path)
    return model


# one_batch's --correctness-test prompts (sglang.benchmark.one_batch.prepare_inputs_for_correctness_test)
ONE_BATCH_PROMPTS = ["The capital of France is", "The capital of the United Kindom is",
                     "Today is a sunny day and I like"]


def write_tokenizer(path: Path, vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly `vocab_size` entries, one word per id, so decoded text is injective."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>"] + sorted({w for p in ONE_BATCH_PROMPTS for w in p.split()})
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.save_pretrained(path)
    return fast
