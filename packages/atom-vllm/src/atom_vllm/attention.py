"""AttentionFactory that builds vLLM's `Attention` layer from ATOM's AttentionSpec (DESIGN.md, seam 1).

On GPUs the layer runs ATOM's attention kernels (atom_vllm.attention_backend, handed over as `attn_backend`);
on CPU, or with ATOM_VLLM_ATTENTION=0, vLLM chooses (FlashAttention 3 on Hopper, CPU_ATTN on CPU);
ATOM_VLLM_ATTENTION=1 asks for ATOM's kernels on CPU too; with them, ATOM_ATTN_FUSED_DECODE_PREP=1 (off by default)
runs a decode step's qk-norm, rope and KV write inside ATOM's Triton attention kernel (atom_vllm.attention_backend).
vLLM owns the KV cache, its layout, prefix caching, scheduling and CUDA graphs either way; the layer registers
itself under `spec.prefix`, which carries the layer index (vLLM requires exactly one integer in it).
A sliding-window layer passes its window (`per_layer_sliding_window`: vLLM's hybrid KV cache manager then
keeps only the window for it); a layer with attention sinks passes the model's sink tensor (`sinks=`,
in the model dtype as vLLM's own GPT-OSS does), which ATOM's kernels take (with ATOM_VLLM_ATTENTION=0 vLLM
selects a backend that has them: CPU_ATTN on CPU, FlashAttention 3 or Triton on Hopper).
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
    def __init__(self, cache_config, quant_config=None, atom_backend: bool | None = None):
        """atom_backend: run ATOM's kernels inside vLLM's Attention layers (atom_vllm.attention_backend);
        None = ATOM_VLLM_ATTENTION, by default on GPUs and not on CPU (atom_vllm.switches)."""
        self.cache_config = cache_config
        self.quant_config = quant_config
        self.attention_cls = vllm_attention_cls()
        if atom_backend is None:
            from vllm.platforms import current_platform

            from atom_vllm.switches import atom_attention_enabled

            atom_backend = atom_attention_enabled(current_platform.is_cpu())
        self.backend_cls = None
        if atom_backend:
            from atom_vllm.attention_backend import AtomAttentionBackend

            self.backend_cls = AtomAttentionBackend

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
        cls = self.attention_cls
        if self.backend_cls is not None:
            kwargs["attn_backend"] = self.backend_cls
            cls = _prep_attention_cls(self.attention_cls)
        # Attention(q [T, H*D], k, v [T, Hkv*D]) -> [T, H*D]: the same contract as ATOM's impl modules.
        # vLLM's cache_config carries --kv-cache-dtype; its quant_config gives the layer a KV-cache method
        # (k_scale / v_scale parameters) for FP8 checkpoints, which vLLM's loader finalizes after loading.
        layer = cls(
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


@functools.cache
def _prep_attention_cls(base: type[nn.Module]) -> type[nn.Module]:
    """vLLM's Attention with atom-core's `forward_with_prep` hook (atom.layers.attention.PagedAttention has the
    same): the model hands over q and k before its qk-norm and rope, and ATOM's qk_norm_rope_cache op does norm,
    rope and the KV write in one kernel (atom_vllm::norm_rope_write); vLLM's attention op then only attends.
    With ATOM_ATTN_FUSED_DECODE_PREP=1 a pure decode step's prep runs inside the attention kernel instead: the prep
    op hands its arguments to the attention op through the layer's impl (atom_vllm.attention_backend)."""

    class AtomPrepAttention(base):
        def forward_with_prep(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                              cos_sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
            from atom_vllm.attention_backend import norm_rope_write

            q = norm_rope_write(positions, q, k, v, q_weight, k_weight, float(eps), cos_sin, bool(is_neox),
                                self.layer_name)
            # no rows of K and V: the cache holds them already (vLLM's attention op takes tensors, not None)
            none = k.new_empty((0, k.shape[-1]))
            return self.forward(q, none, none)

    AtomPrepAttention.__qualname__ = AtomPrepAttention.__name__ = f"AtomPrep{base.__name__}"
    return AtomPrepAttention


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
