"""A tiny DeepSeek-V3 checkpoint with an MTP layer, for the speculative-decoding tests.

transformers writes DeepSeek-V3 checkpoints without MTP tensors, so the MTP layer (checkpoint layer
num_hidden_layers: enorm, hnorm, eh_proj, a decoder block, shared_head) is written here from the same config.
Two kinds:
- random MTP weights (`draft="random"`): its drafts are almost never accepted;
- a drafter that accepts part of the time (`draft="bigram"`): the target's attention and MLP outputs are scaled
  by `target_scale`, so its next token depends mostly (not only) on the current one, and the MTP layer predicts
  exactly that bigram: eh_proj passes the normed embedding of token p + 1 through, its block adds nothing, and
  its shared head is the target's final norm and LM head. target_scale = 0 makes the target a pure bigram
  model: every draft is accepted.
"""

from __future__ import annotations

import math
import os

import torch

VOCAB = 300


def deepseek_v3_config(vocab_size: int = VOCAB, **overrides):
    import transformers

    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=12, n_shared_experts=1, first_k_dense_replace=1,
               max_position_embeddings=128, tie_word_embeddings=False, q_lora_rank=24, n_routed_experts=8,
               num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
               num_nextn_predict_layers=1)
    cfg.update(overrides)
    return transformers.DeepseekV3Config(**cfg)


def write_deepseek_v3_mtp(path, draft: str = "random", target_scale: float = 1.0, seed: int = 0, tokenizer=None,
                          **overrides) -> str:
    import safetensors.torch
    import transformers

    config = deepseek_v3_config(len(tokenizer) if tokenizer is not None else VOCAB, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
            # (routed experts are one fused `experts.down_proj` parameter in memory, per expert once saved)
            if name.endswith("o_proj.weight") or name.endswith(("down_proj.weight", "experts.down_proj")):
                p.mul_(target_scale)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    file = os.path.join(path, "model.safetensors")
    weights = safetensors.torch.load_file(file)
    n, h = config.num_hidden_layers, config.hidden_size
    last = f"model.layers.{n - 1}."
    mtp = {name.replace(last, f"model.layers.{n}."): t.clone() for name, t in weights.items() if name.startswith(last)}
    mtp[f"model.layers.{n}.embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()  # as V3 repeats it
    if draft == "random":
        mtp.update({f"model.layers.{n}.enorm.weight": 1 + 0.2 * torch.randn(h),
                    f"model.layers.{n}.hnorm.weight": 1 + 0.2 * torch.randn(h),
                    f"model.layers.{n}.eh_proj.weight": torch.randn(h, 2 * h) / math.sqrt(2 * h),
                    f"model.layers.{n}.shared_head.norm.weight": 1 + 0.2 * torch.randn(h),
                    f"model.layers.{n}.shared_head.head.weight": torch.randn(config.vocab_size, h) / math.sqrt(h)})
    elif draft == "bigram":
        for name in mtp:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                mtp[name].zero_()
        eh = torch.zeros(h, 2 * h)
        eh[:, :h] = torch.eye(h)
        mtp.update({f"model.layers.{n}.enorm.weight": torch.ones(h), f"model.layers.{n}.hnorm.weight": torch.ones(h),
                    f"model.layers.{n}.eh_proj.weight": eh,
                    f"model.layers.{n}.shared_head.norm.weight": weights["model.norm.weight"].clone(),
                    f"model.layers.{n}.shared_head.head.weight": weights["lm_head.weight"].clone()})
    else:
        raise ValueError(draft)
    safetensors.torch.save_file({**weights, **mtp}, file, metadata={"format": "pt"})
    return os.fspath(path)


def kv_bytes_per_token(config, mtp_layers: int = 1) -> int:
    """float32 latent-cache bytes per token over the model's layers and its running MTP layer."""
    return (config.num_hidden_layers + mtp_layers) * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
