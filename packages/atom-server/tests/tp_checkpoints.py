"""Tiny float32 checkpoints of the tensor-parallel test families, and transformers' greedy tokens on them.

Weights are drawn larger than transformers' default init, so the logits stand far apart: no near-ties that
a different summation order (all-reduce over ranks) could flip in argmax.
"""

from __future__ import annotations

import os

import torch
import transformers

BASE = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
            intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**BASE, num_key_value_heads=2),
    # one KV head for two ranks: replicated
    "qwen3": lambda: transformers.Qwen3Config(**BASE, num_key_value_heads=1),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**BASE, num_key_value_heads=2, num_experts=4,
                                                     num_experts_per_tok=2, moe_intermediate_size=32,
                                                     norm_topk_prob=True),
    "mixtral": lambda: transformers.MixtralConfig(**{**BASE, "intermediate_size": 32}, num_key_value_heads=2,
                                                  num_local_experts=4, num_experts_per_tok=2),
    # MLA (latent cache, whole on every rank), grouped top-k routing, a shared expert, a dense first layer
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1,
        max_position_embeddings=64, tie_word_embeddings=False),
}


def write_checkpoint(name: str, path) -> str:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.2) + (p.dim() == 1))
    hf.save_pretrained(path)
    return os.fspath(path)


def hf_greedy(path: str, prompts: list[list[int]], max_new: int, device: str = "cpu") -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p], device=device), do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=max_new, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def kv_bytes(name: str, tp: int, num_blocks: int, block_size: int) -> int:
    """Bytes per rank for num_blocks float32 blocks: each rank holds max(1, kv_heads / tp) KV heads, or the
    whole latent row (MLA)."""
    cfg = CONFIGS[name]()
    if getattr(cfg, "kv_lora_rank", None):
        return num_blocks * cfg.num_hidden_layers * block_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    heads = max(1, cfg.num_key_value_heads // tp)
    return num_blocks * 2 * cfg.num_hidden_layers * block_size * heads * cfg.head_dim * 4
