"""The MLA attention seam: multi-head latent attention (DeepSeek-V2/V3) as the host sees it.

A model's MLA layer computes, per token, the query halves q_nope [T, H, P] and q_pe [T, H, R] (rope applied)
and the new latent entries kv_c [T, L] (normed compressed KV) and k_pe [T, R] (roped shared key), and hands
them to an implementation that the *host* supplies, through an `MLAAttentionFactory`: a callable taking the
layer's `MLAAttentionSpec` and its `kv_b_proj` module (whose weight holds W_UK and W_UV, see atom.ops.mla)
and returning a module `impl(q_nope, q_pe, kv_c, k_pe) -> out [T, H * V]`. The implementation owns the
latent cache (writes the new entries, attends over cached prefix + new tokens) and chooses the formulation
(absorbed for decode, expanded or absorbed for prefill). The model never sees the cache.

`PagedMLAAttention` is ATOM's own implementation over a paged latent cache, one tensor per layer of
`MLAAttentionSpec.cache_shape(num_blocks, block_size)` = [num_blocks, block_size, L + R], bound by the host
with `bind_mla_kv_caches`. It reads `PagedAttentionMetadata` from the forward context, like PagedAttention.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from atom.forward_context import get_forward_context
from atom.layers.attention import PagedAttentionMetadata
from atom.ops.registry import resolve


@dataclass(frozen=True)
class MLAAttentionSpec:
    """One MLA layer: what its implementation computes and what its KV cache holds.

    The cache is a single latent tensor per layer (no K/V pair): per token kv_lora_rank + qk_rope_head_dim
    values of `dtype`, against 2 * num_heads * head_dim for the multi-head equivalent.
    """

    kind: ClassVar[str] = "mla"

    layer_idx: int
    num_heads: int  # heads on this TP rank
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    scale: float  # softmax scale, DeepSeek's yarn mscale included
    prefix: str = ""
    dtype: torch.dtype = field(default_factory=torch.get_default_dtype)  # cache dtype

    @property
    def head_size(self) -> int:
        """Values per cached token (the latent row): kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int]:
        return (num_blocks, block_size, self.head_size)

    def bytes_per_block(self, block_size: int) -> int:
        return block_size * self.head_size * self.dtype.itemsize

    def allocate(self, num_blocks: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """This layer's cache, zero-filled (attention never reads an unwritten slot, but zeros keep a stray
        read finite)."""
        return torch.zeros(self.cache_shape(num_blocks, block_size), dtype=self.dtype, device=device)


MLAAttentionFactory = Callable[[MLAAttentionSpec, nn.Module], nn.Module]


class PagedMLAAttention(nn.Module):
    """ATOM's MLA over a paged latent cache: decode (every query length 1) runs the absorbed `mla_decode`
    (split-K over the context, CUDA-graph capturable); any step with a longer query runs `mla_prefill`
    (queries see their cached prefix and each other, causally)."""

    def __init__(self, spec: MLAAttentionSpec, kv_b_proj: nn.Module):
        super().__init__()
        self.spec = spec
        # The model owns kv_b_proj (its checkpoint name is the model's); hold it without making it a child,
        # so its weight is not a second parameter of the model.
        self.__dict__["kv_b_proj"] = kv_b_proj
        self.kv_cache: torch.Tensor | None = None
        self._write = resolve("mla_cache_write")
        self._decode = resolve("mla_decode")
        self._prefill = resolve("mla_prefill")

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor,
                k_pe: torch.Tensor) -> torch.Tensor:
        md = get_forward_context()
        if not isinstance(md, PagedAttentionMetadata) or self.kv_cache is None:
            raise RuntimeError("PagedMLAAttention needs PagedAttentionMetadata in the forward context and a bound "
                               "latent cache (bind_mla_kv_caches)")
        s = self.spec
        self._write(kv_c, k_pe, self.kv_cache, md.slot_mapping)
        w = self.kv_b_proj.weight
        if md.max_query_len == 1:
            out = self._decode(q_nope, q_pe, self.kv_cache, w, md.block_tables, md.seq_lens, s.scale,
                               md.max_seq_len)
        else:
            out = self._prefill(q_nope, q_pe, self.kv_cache, w, md.block_tables, md.query_start_loc, md.seq_lens,
                                s.scale, md.max_query_len, md.max_seq_len)
        return out.reshape(q_nope.shape[0], s.num_heads * s.v_head_dim)


def paged_mla_factory(spec: MLAAttentionSpec, kv_b_proj: nn.Module) -> nn.Module:
    return PagedMLAAttention(spec, kv_b_proj)


class MLAAttention(nn.Module):
    """Model-side MLA front-end: holds the spec and the host's implementation."""

    def __init__(self, spec: MLAAttentionSpec, kv_b_proj: nn.Module, mla_factory: MLAAttentionFactory | None = None):
        super().__init__()
        self.spec = spec
        self.impl = (mla_factory or paged_mla_factory)(spec, kv_b_proj)

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [T, H, P], q_pe [T, H, R] (roped), kv_c [T, L] (normed), k_pe [T, R] (roped) -> [T, H * V]."""
        return self.impl(q_nope, q_pe, kv_c, k_pe)


def mla_attention_specs(model: nn.Module) -> list[MLAAttentionSpec]:
    """The spec of every MLA layer of a model, in layer order (what a host sizes its latent caches from)."""
    return sorted((m.spec for m in model.modules() if isinstance(m, MLAAttention)), key=lambda s: s.layer_idx)


def bind_mla_kv_caches(model: nn.Module, caches: Sequence[torch.Tensor | None] | Mapping[int, torch.Tensor]) -> None:
    """Give each PagedMLAAttention its layer's latent cache (indexed by layer index)."""
    for m in model.modules():
        if isinstance(m, PagedMLAAttention):
            m.kv_cache = caches[m.spec.layer_idx]
