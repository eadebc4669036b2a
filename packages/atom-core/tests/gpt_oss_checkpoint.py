"""Tiny GPT-OSS checkpoints for tests: one written by transformers (dense experts, float32) and its MXFP4
version written by tools/quantize_mxfp4.py, plus transformers' model on the dequantized weights."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[3]


def _reference_swiglu_limit(wanted: float) -> float:
    """transformers before 5.18 hard-codes GPT-OSS's SwiGLU limit (7.0) and ignores config.swiglu_limit (seen
    with 5.17 on the GPU machine: every logit off); there the tiny checkpoints use 7.0, so reference and ATOM
    (which reads the config) compute the same model."""
    import inspect

    from transformers.models.gpt_oss import modeling_gpt_oss

    return wanted if "config.swiglu_limit" in inspect.getsource(modeling_gpt_oss.GptOssExperts) else 7.0

# Every GPT-OSS feature at a size the CPU runs in seconds: GQA (4 heads, 2 KV heads), sliding window 5
# (smaller than the prompts, ending inside 4-token blocks) on layer 0 and full attention on layer 1, YaRN
# with truncate false as the released checkpoints, and a SwiGLU limit low enough that the clamps engage.
CONFIG = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
              max_position_embeddings=128, swiglu_limit=_reference_swiglu_limit(1.2), tie_word_embeddings=False,
              rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "truncate": False, "original_max_position_embeddings": 32, "rope_theta": 150000.0})


def quantize_tool():
    spec = importlib.util.spec_from_file_location("quantize_mxfp4", REPO / "tools" / "quantize_mxfp4.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize_(model: torch.nn.Module) -> None:
    """Weights with spread: norms around 1, sinks and biases clearly non-zero, projections ~ unit gain."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            elif name.startswith("lm_head"):
                p.copy_(4 * torch.randn_like(p) / math.sqrt(p.shape[-1]))  # clear top-1 margins
            elif ".experts." in name:  # [E, in, out]
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-2]))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))


def write_dense(path, **overrides) -> transformers.PreTrainedModel:
    """Save a random tiny GptOssForCausalLM (float32) to path; returns the transformers model (eager attention)."""
    config = transformers.GptOssConfig(**{**CONFIG, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32).eval()
    randomize_(model)
    model.save_pretrained(path)
    return model


def write_mxfp4(dense_path, path) -> transformers.PreTrainedModel:
    """The MXFP4 checkpoint of dense_path (the tool), and transformers' model loaded from it: transformers
    dequantizes the experts itself (on a CPU) and keeps them in bf16, which holds every MXFP4 value exactly;
    they are cast to float32 so the reference runs in float32."""
    quantize_tool().convert(str(dense_path), str(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    return model.float().eval()
