"""AttentionFactory that builds vLLM's `Attention` layer from ATOM's AttentionSpec (DESIGN.md, seam 1).

vLLM then owns the KV cache, its layout, prefix caching, scheduling and CUDA graphs; the layer registers
itself under `spec.prefix`, which carries the layer index (vLLM requires exactly one integer in it).
A sliding-window layer passes its window (`per_layer_sliding_window`: vLLM's hybrid KV cache manager then
keeps only the window for it); a layer with attention sinks passes the model's sink tensor (`sinks=`,
in the model dtype as vLLM's own GPT-OSS does), which selects a backend that has them (CPU_ATTN on CPU;
FlashAttention 3 or Triton on Hopper).
"""

from __future__ import annotations

import functools
import logging
import re

import torch
from torch import nn

from atom.layers.attention import AttentionSpec

logger = logging.getLogger("vllm.atom_vllm")


def vllm_attention_cls() -> type[nn.Module]:
    try:  # vLLM >= 0.30
        from vllm.model_executor.layers.attention import Attention
    except ImportError:  # vLLM 0.24 - 0.29
        from vllm.attention import Attention
    return Attention


class VllmAttentionFactory:
    def __init__(self, cache_config, quant_config=None):
        self.cache_config = cache_config
        self.quant_config = quant_config
        self.attention_cls = vllm_attention_cls()

    def __call__(self, spec: AttentionSpec, sinks: torch.Tensor | None = None) -> nn.Module:
        numbers = re.findall(r"\d+", spec.prefix)
        if len(numbers) != 1 or int(numbers[0]) != spec.layer_idx:
            raise ValueError(f"attention layer name {spec.prefix!r} must contain exactly one integer, the layer "
                             f"index {spec.layer_idx} (vLLM keys its KV cache by it)")
        kwargs = {}
        if spec.sliding_window is not None:
            kwargs["per_layer_sliding_window"] = spec.sliding_window
        if spec.logit_softcap is not None:
            kwargs["logits_soft_cap"] = spec.logit_softcap
        if sinks is not None:
            kwargs["sinks"] = sinks
        # Attention(q [T, H*D], k, v [T, Hkv*D]) -> [T, H*D]: the same contract as ATOM's impl modules.
        # vLLM's cache_config carries --kv-cache-dtype; its quant_config gives the layer a KV-cache method
        # (k_scale / v_scale parameters) for FP8 checkpoints, which vLLM's loader finalizes after loading.
        layer = self.attention_cls(
            spec.num_heads,
            spec.head_dim,
            spec.scale,
            num_kv_heads=spec.num_kv_heads,
            cache_config=self.cache_config,
            quant_config=self.quant_config,
            prefix=spec.prefix,
            **kwargs,
        )
        layer.load_kv_scale = functools.partial(load_kv_scale, layer)
        return layer


def load_kv_scale(layer: nn.Module, kind: str, value: float) -> None:
    """A checkpoint's FP8 KV-cache scale (ATOM's loader found it under any of vLLM's spellings) into vLLM's
    Attention: its `k_scale` / `v_scale` parameter, which vLLM's KV-cache method turns into the scales its
    kernels read after loading. A layer without one (no KV-cache method for this quantization) ignores the
    scale, as vLLM's own loader does."""
    param = getattr(layer, f"{kind}_scale", None)
    if isinstance(param, nn.Parameter):
        param.data.fill_(value)
    else:
        logger.debug("%s: no %s_scale parameter (vLLM's quantization gives this layer no KV-cache method); "
                     "checkpoint scale ignored", getattr(layer, "layer_name", "?"), kind)
