"""Tiny random checkpoints (Llama, Qwen3, Qwen3-MoE) with a small offline WordLevel tokenizer."""

from __future__ import annotations

import os

ARCHS = ("llama", "qwen3", "qwen3_moe")
VOCAB_WORDS = 380  # + 4 specials = 384 tokens
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
VOCAB_SIZE = len(SPECIALS) + VOCAB_WORDS

# The prompts every engine run uses (words of the tokenizer's vocabulary).
PROMPTS = [
    "w1 w2 w3 w4 w5",
    "w17 w300 w42",
    "w99 w98 w97 w96 w95 w94 w93 w92 w91 w90 w89 w88",
    "w7",
    "w250 w251 w12 w13 w14 w15 w16",
]

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # vLLM's CPU attention needs a head size from its list (32, 64, ...)
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=1,
    tie_word_embeddings=False,
    initializer_range=0.1,  # peaked logits: greedy choices far from ties
)


def _config(arch: str):
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    if arch == "llama":
        return LlamaConfig(**_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "qwen3":
        return Qwen3Config(**{**_COMMON, "tie_word_embeddings": True},
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                              decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[],
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    raise ValueError(arch)


def save_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(VOCAB_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def make_checkpoint(arch: str, path: str, seed: int = 0) -> str:
    """Write a random `arch` checkpoint (safetensors, float32) plus tokenizer to `path`; returns path."""
    import torch
    from transformers import AutoModelForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


def make_fp8_checkpoints(floats: dict[str, str], root) -> dict[str, str]:
    """FP8 versions of the float checkpoints, written by tools/quantize_fp8.py (tokenizer copied)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tools"))
    import quantize_fp8

    out = {"llama_fp8_kv": str(root / "llama_fp8_kv"), "qwen3_moe_fp8_block": str(root / "qwen3_moe_fp8_block")}
    if not os.path.exists(os.path.join(out["llama_fp8_kv"], "config.json")):
        quantize_fp8.quantize_checkpoint(floats["llama"], out["llama_fp8_kv"], "compressed-tensors",
                                         kv_cache_scales=True)
    if not os.path.exists(os.path.join(out["qwen3_moe_fp8_block"], "config.json")):
        quantize_fp8.quantize_checkpoint(floats["qwen3_moe"], out["qwen3_moe_fp8_block"], "fp8-block", (128, 128))
    return out
