"""The attention seam (DESIGN.md, seam 1).

A model's attention layer computes q, k, v (after rope / qk-norm) and hands them to an implementation
that the *host* supplies when the model is built, through an `AttentionFactory`: a callable taking an
`AttentionSpec` and returning a module `impl(q, k, v) -> out` with q [T, H*D], k and v [T, Hkv*D],
out [T, H*D]. The model never builds or sees a KV cache.

`PagedAttention` is ATOM's own implementation over a paged KV cache (used by atom-server and by the
core's tests). It reads `PagedAttentionMetadata` from the forward context and its layer's cache from
`self.kv_cache`, bound by the host with `bind_kv_caches`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from atom.forward_context import get_forward_context
from atom.ops.registry import resolve


@dataclass(frozen=True)
class AttentionSpec:
    layer_idx: int
    num_heads: int  # heads on this TP rank
    num_kv_heads: int  # KV heads on this TP rank
    head_dim: int
    scale: float
    sliding_window: int | None = None
    logit_softcap: float | None = None
    prefix: str = ""


AttentionFactory = Callable[[AttentionSpec], nn.Module]


@dataclass
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, -1 = padding (not written)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context + new tokens
    max_query_len: int
    max_seq_len: int


class PagedAttention(nn.Module):
    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._write = resolve("reshape_and_cache")
        self._attend = resolve("paged_attention")
        self._prep = resolve("qk_norm_rope_cache")

    def _context(self):
        md = get_forward_context()
        if not isinstance(md, PagedAttentionMetadata) or self.kv_cache is None:
            raise RuntimeError("PagedAttention needs PagedAttentionMetadata in the forward context and a bound KV cache")
        return md

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.spec
        md = self._context()
        num_tokens = q.shape[0]
        k = k.view(num_tokens, s.num_kv_heads, s.head_dim)
        v = v.view(num_tokens, s.num_kv_heads, s.head_dim)
        k_cache, v_cache = self.kv_cache
        self._write(k, v, k_cache, v_cache, md.slot_mapping)
        return self._attend_cached(q, md)

    def forward_with_prep(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                          cos_sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
        """forward() with the model's qk-norm (optional) and rope folded in: one qk_norm_rope_cache op does
        norm + rope + KV write (fewer launches per layer in decode). q, k un-normed and un-rotated."""
        md = self._context()
        k_cache, v_cache = self.kv_cache
        q, _ = self._prep(positions, q, k, v, q_weight, k_weight, eps, self.spec.head_dim, cos_sin, is_neox,
                          k_cache, v_cache, md.slot_mapping)
        return self._attend_cached(q, md)

    def _attend_cached(self, q: torch.Tensor, md: PagedAttentionMetadata) -> torch.Tensor:
        s = self.spec
        num_tokens = q.shape[0]
        k_cache, v_cache = self.kv_cache
        out = self._attend(q.view(num_tokens, s.num_heads, s.head_dim), k_cache, v_cache, md.block_tables,
                           md.query_start_loc, md.seq_lens, s.scale, s.sliding_window, s.logit_softcap,
                           md.max_query_len, md.max_seq_len)
        return out.reshape(num_tokens, s.num_heads * s.head_dim)


def paged_attention_factory(spec: AttentionSpec) -> nn.Module:
    return PagedAttention(spec)


def attention_specs(model: nn.Module) -> list[AttentionSpec]:
    """The spec of every attention layer of a model, in layer order (what a host sizes its cache from)."""
    return sorted((m.spec for m in model.modules() if isinstance(m, Attention)), key=lambda s: s.layer_idx)


def bind_kv_caches(model: nn.Module, caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give each PagedAttention its layer's (k_cache, v_cache)."""
    for m in model.modules():
        if isinstance(m, PagedAttention):
            m.kv_cache = caches[m.spec.layer_idx]


class Attention(nn.Module):
    """Model-side attention front-end: holds the spec and the host's implementation."""

    def __init__(self, spec: AttentionSpec, attn_factory: AttentionFactory | None = None):
        super().__init__()
        self.spec = spec
        self.impl = (attn_factory or paged_attention_factory)(spec)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.impl(q, k, v)
