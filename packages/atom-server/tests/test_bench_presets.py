"""The DeepSeek-V2-Lite bench preset is the released shape: ATOM builds it (on the meta device: no memory) with
15.7B parameters, 2.4B active per token (the 6 of 64 routed experts a token uses, the shared experts, attention,
the dense first layer and the LM head; the input embedding is a gather), its latent KV cache and yarn scale."""

from __future__ import annotations

import math

import pytest
import torch

from atom.layers.kv_cache import kv_cache_specs
from atom.layers.mla import mla_attention_specs
from atom.loader.model_loader import load_config
from atom.models import model_class_for_config
from atom_server.bench import PRESETS, preset_checkpoint


def test_deepseek_v2_lite_preset_is_the_released_shape(tmp_path):
    cfg = load_config(preset_checkpoint("deepseek-v2-lite", str(tmp_path)))
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("meta"):
            model = model_class_for_config(cfg)(cfg, max_positions=256)
    finally:
        torch.set_default_dtype(previous)
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    total = sum(p.numel() for p in model.parameters())
    experts = model.model.layers[1].mlp.experts
    per_expert = (experts.w13.numel() + experts.w2.numel()) / experts.num_experts
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    active = total - model.model.embed_tokens.weight.numel() - moe_layers * (64 - 6) * per_expert
    assert total == pytest.approx(15.7e9, rel=0.01) and active == pytest.approx(2.45e9, rel=0.01)
    specs = kv_cache_specs(model)
    assert len(specs) == 27 and specs[0].bytes_per_token() == (512 + 64) * 2  # one bf16 latent row a layer
    mscale = 0.1 * 0.707 * math.log(40) + 1.0
    assert mla_attention_specs(model)[0].scale == pytest.approx((128 + 64) ** -0.5 * mscale**2)
    assert PRESETS["deepseek-v2-lite"]["architectures"] == ["DeepseekV2ForCausalLM"]
