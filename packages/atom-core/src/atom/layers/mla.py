"""The MLA attention seam: multi-head latent attention (DeepSeek-V2/V3) as the host sees it.

A model's MLA layer computes, per token, the query halves q_nope [T, H, P] and q_pe [T, H, R] (rope applied)
and the new latent entries kv_c [T, L] (normed compressed KV) and k_pe [T, R] (roped shared key), and hands
them to an implementation that the *host* supplies, through an `MLAAttentionFactory`: a callable taking the
layer's `MLAAttentionSpec` (what the layer computes) and its `kv_b_proj` module (whose weight holds W_UK and
W_UV, see atom.ops.mla) and returning a module `impl(q_nope, q_pe, kv_c, k_pe) -> out [T, H * V]`. The
implementation owns the latent cache (writes the new entries, attends over cached prefix + new tokens) and
chooses the formulation (absorbed for decode, expanded or absorbed for prefill). The model never sees the
cache. An implementation reads kv_b_proj's weight through `kv_b_weight(kv_b_proj)`, which asks the layer's
quantization method for the dense weight (a quantized checkpoint's kv_b_proj is dequantized there).

`PagedMLAAttention` is ATOM's own implementation over a paged latent cache. Like PagedAttention it follows
the KV-cache spec seam (atom.layers.kv_cache): its `kv_cache_spec` is an `MLAKVSpec` (ONE tensor per layer,
[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]); the host allocates it from the spec and binds
the `MLAKVCache` with the generic `bind_kv_caches`. It reads `PagedAttentionMetadata` (its
`metadata_builder_cls` is PagedAttention's builder: slots, block tables, query offsets and lengths are all
MLA needs, in eager steps and captured decode graphs alike), so a host that runs PagedAttention runs MLA
unchanged. With an FP8 kv_cache_dtype the latent cache is e4m3 with ONE per-tensor scale per layer (the
checkpoint's k_scale of the layer, else 1.0: what vLLM's MLA layer reads; a checkpoint's v_scale has no
tensor to apply to and is ignored, as in vLLM), handed to every MLA op as `kv_scale`.

Checkpoint FP8 KV-cache scales reach the host's implementation through `MLAAttention.load_kv_scale(kind,
value)`, which calls the implementation's own `load_kv_scale` (PagedMLAAttention's spec; vLLM's MLAAttention
parameter; SGLang's RadixAttention).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from atom.envs import env_flag
from atom.forward_context import get_forward_context
from atom.layers.attention import PagedAttentionMetadata, PagedAttentionMetadataBuilder, hand_kv_scale
from atom.layers.kv_cache import MLAKVCache, MLAKVSpec, check_cache_dtype, check_kv_scale, is_fp8
from atom.ops.registry import resolve
from atom.quantization.base import mark_dense_weight_read

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MLAAttentionSpec:
    """What one MLA layer computes (the MLA counterpart of AttentionSpec). Its cache is the implementation's
    business: PagedMLAAttention describes it with an MLAKVSpec (kv_lora_rank + qk_rope_head_dim values per
    token, against 2 * num_heads * head_dim for the multi-head equivalent)."""

    layer_idx: int
    num_heads: int  # heads on this TP rank
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    scale: float  # softmax scale, DeepSeek's yarn mscale included
    prefix: str = ""
    q_lora_rank: int | None = None  # the model's query compression (None: a plain q_proj); hosts may want it

    @property
    def head_size(self) -> int:
        """Values per cached token (the latent row): kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.qk_rope_head_dim


MLAAttentionFactory = Callable[[MLAAttentionSpec, nn.Module], nn.Module]


def kv_b_weight(kv_b_proj: nn.Module) -> torch.Tensor:
    """kv_b_proj's weight [H * (P + V), L] as a dense tensor, whatever its quantization method stores (the
    unquantized method hands out the parameter itself: no copy)."""
    return kv_b_proj.quant_method.dequantized_weight(kv_b_proj)


class PagedMLAAttention(nn.Module):
    """ATOM's MLA over a paged latent cache: decode (every query length 1) runs the absorbed `mla_decode`
    (split-K over the context, CUDA-graph capturable); any step with a longer query runs `mla_prefill`
    (queries see their cached prefix and each other, causally)."""

    metadata_builder_cls = PagedAttentionMetadataBuilder

    def __init__(self, spec: MLAAttentionSpec, kv_b_proj: nn.Module, kv_cache_dtype: torch.dtype | None = None):
        """kv_cache_dtype: None = the dtype the model is built in (torch's default dtype at construction); an
        FP8 type (torch.float8_e4m3fn, or float8_e4m3fnuz on MI300) stores fp8([kv_c | k_pe] / scale) with one
        per-tensor scale from the checkpoint (load_kv_scale), else 1.0."""
        super().__init__()
        self.spec = spec
        # The model owns kv_b_proj (its checkpoint name is the model's); hold it without making it a child,
        # so its weight is not a second parameter of the model.
        self.__dict__["kv_b_proj"] = kv_b_proj
        dtype = check_cache_dtype(kv_cache_dtype or torch.get_default_dtype())
        self.kv_cache_spec = MLAKVSpec(layer_idx=spec.layer_idx, dtype=dtype, kv_lora_rank=spec.kv_lora_rank,
                                       qk_rope_head_dim=spec.qk_rope_head_dim)
        self.kv_cache: MLAKVCache | None = None
        # An FP8 cache is a build-time property of the ops (an implementation without it declines the layer)
        static = {"kv_cache_dtype": dtype} if is_fp8(dtype) else None
        self._write = resolve("mla_cache_write", static=static)
        self._decode = resolve("mla_decode", static=static)
        self._prefill = resolve("mla_prefill", static=static)
        self._prep = resolve("mla_norm_rope_cache", static=static)

    def load_kv_scale(self, kind: str, value: float) -> None:
        """The checkpoint's per-tensor FP8 KV-cache scale of this layer: "k" is the latent cache's scale (the
        cache stores fp8(row / scale)); "v" has no tensor of its own in MLA and is ignored, as vLLM does."""
        value = check_kv_scale(self.spec.prefix, kind, value, self.kv_cache_spec.dtype)
        if kind == "v":
            logger.debug("%s: v_scale ignored (the latent cache has one scale, the checkpoint's k_scale)",
                         self.spec.prefix)
            return
        self.kv_cache_spec = dataclasses.replace(self.kv_cache_spec, scale=value)
        if self.kv_cache is not None and self.kv_cache.scale is not None:
            self.kv_cache.scale.fill_(value)

    def _context(self) -> PagedAttentionMetadata:
        md = get_forward_context()
        if not isinstance(md, PagedAttentionMetadata) or self.kv_cache is None:
            raise RuntimeError("PagedMLAAttention needs PagedAttentionMetadata in the forward context and a bound "
                               "latent cache (bind_kv_caches)")
        return md

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor,
                k_pe: torch.Tensor) -> torch.Tensor:
        md = self._context()
        cache, kv_scale = self.kv_cache
        self._write(kv_c, k_pe, cache, md.slot_mapping, kv_scale=kv_scale)
        return self._attend(md, q_nope, q_pe)

    def forward_with_prep(self, positions: torch.Tensor, q_nope: torch.Tensor, q_pe: torch.Tensor,
                          kv_a: torch.Tensor, kv_weight: torch.Tensor, eps: float, cos_sin: torch.Tensor,
                          is_neox: bool) -> torch.Tensor:
        """forward() with the latent norm and both ropes folded in: one mla_norm_rope_cache op ropes q_pe and
        writes [rms_norm(kv_c) * kv_weight | rope(k_pe)] into the cache (at decode one kernel instead of the
        k_pe / q_pe copies, the norm, the rope and the cache write). q_pe un-roped, kv_a = [kv_c | k_pe] as
        kv_a_proj_with_mqa gives it."""
        md = self._context()
        cache, kv_scale = self.kv_cache
        q_pe = self._prep(positions, q_pe, kv_a, kv_weight, eps, cos_sin, is_neox, cache, md.slot_mapping,
                          kv_scale=kv_scale)
        return self._attend(md, q_nope, q_pe)

    def _attend(self, md: PagedAttentionMetadata, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        s = self.spec
        cache, kv_scale = self.kv_cache
        w = kv_b_weight(self.kv_b_proj)
        if md.max_query_len == 1:
            out = self._decode(q_nope, q_pe, cache, w, md.block_tables, md.seq_lens, s.scale, md.max_seq_len,
                               kv_scale=kv_scale)
        else:
            out = self._prefill(q_nope, q_pe, cache, w, md.block_tables, md.query_start_loc, md.seq_lens,
                                s.scale, md.max_query_len, md.max_seq_len, kv_scale=kv_scale)
        return out.reshape(q_nope.shape[0], s.num_heads * s.v_head_dim)


def paged_mla_factory(spec: MLAAttentionSpec, kv_b_proj: nn.Module) -> nn.Module:
    return PagedMLAAttention(spec, kv_b_proj)


def paged_mla_factory_for(kv_cache_dtype: torch.dtype | None) -> MLAAttentionFactory:
    """ATOM's paged MLA with its latent cache in `kv_cache_dtype` (None: the model's dtype)."""
    if kv_cache_dtype is None:
        return paged_mla_factory

    def factory(spec: MLAAttentionSpec, kv_b_proj: nn.Module) -> nn.Module:
        return PagedMLAAttention(spec, kv_b_proj, kv_cache_dtype=kv_cache_dtype)

    return factory


class MLAAttention(nn.Module):
    """Model-side MLA front-end: holds the spec and the host's implementation."""

    def __init__(self, spec: MLAAttentionSpec, kv_b_proj: nn.Module, mla_factory: MLAAttentionFactory | None = None):
        super().__init__()
        self.spec = spec
        mark_dense_weight_read(kv_b_proj)  # every host's implementation reads it through kv_b_weight
        self.impl = (mla_factory or paged_mla_factory)(spec, kv_b_proj)

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [T, H, P], q_pe [T, H, R] (roped), kv_c [T, L] (normed), k_pe [T, R] (roped) -> [T, H * V]."""
        return self.impl(q_nope, q_pe, kv_c, k_pe)

    @property
    def fused_prep(self):
        """The implementation's forward_with_prep (latent norm + ropes + cache write in one op; see
        PagedMLAAttention), or None when it has none (vLLM's and SGLang's MLA layers) or
        ATOM_MLA_FUSED_PREP=0."""
        if not env_flag("ATOM_MLA_FUSED_PREP", True):
            return None
        return getattr(self.impl, "forward_with_prep", None)

    def load_kv_scale(self, kind: str, value: float) -> None:
        """A checkpoint's per-tensor FP8 KV-cache scale ("k" or "v") for this layer, handed to the host's
        implementation (see Attention.load_kv_scale)."""
        hand_kv_scale(self.impl, self.spec.prefix, kind, value)


def mla_attention_specs(model: nn.Module) -> list[MLAAttentionSpec]:
    """The spec of every MLA layer of a model, in layer order (what a host builds its MLA layers from)."""
    return sorted((m.spec for m in model.modules() if isinstance(m, MLAAttention)), key=lambda s: s.layer_idx)
