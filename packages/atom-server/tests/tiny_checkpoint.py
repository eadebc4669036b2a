"""A tiny llama checkpoint with a real (byte-level BPE) tokenizer, written offline for engine tests."""

from __future__ import annotations

import os

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "A scheduler batches prefill chunks and decode steps together.",
    "Hello world! How are you today? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16.",
    "Prefix caching lets requests with a shared system prompt skip work.",
] * 4

EOS = "</s>"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
BOS = "<s>"


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_llama(path: str, seed: int = 0, **overrides) -> str:
    """Save a 2-layer GQA llama (float32, random weights) plus tokenizer to path; returns path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
               initializer_range=0.2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return os.fspath(path)


def _reference_swiglu_limit(wanted: float) -> float:
    """transformers before 5.18 hard-codes GPT-OSS's SwiGLU limit (7.0) and ignores config.swiglu_limit (seen
    with 5.17 on the GPU machine: every logit off); there the tiny checkpoints use 7.0, so reference and ATOM
    (which reads the config) compute the same model."""
    import inspect

    from transformers.models.gpt_oss import modeling_gpt_oss

    return wanted if "config.swiglu_limit" in inspect.getsource(modeling_gpt_oss.GptOssExperts) else 7.0


def write_tiny_gpt_oss(path: str, seed: int = 0, tokenizer=None, max_positions: int = 256) -> str:
    """Save a 2-layer GPT-OSS (float32, dense experts; sliding window 5 on layer 0, sinks, YaRN from 64 positions
    to max_positions) plus tokenizer (build_tokenizer()'s unless one is given)."""
    import math

    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    tok = tokenizer if tokenizer is not None else build_tokenizer()
    config = GptOssConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=5, max_position_embeddings=max_positions,
                          swiglu_limit=_reference_swiglu_limit(1.2),
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "yarn", "factor": max_positions / 64, "beta_fast": 32.0, "beta_slow": 1.0,
                                           "truncate": False, "original_max_position_embeddings": 64,
                                           "rope_theta": 150000.0})
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # spread: sinks, biases and norms away from their init, ~unit-gain projections
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("sinks") or "bias" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                fan_in = p.shape[-2] if ".experts." in name else p.shape[-1]
                p.copy_((4 if name.startswith("lm_head") else 1) * torch.randn_like(p) / math.sqrt(fan_in))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return os.fspath(path)
