"""The attention seam (DESIGN.md, seam 1).

A model's attention layer computes q, k, v (after rope / qk-norm) and hands them to an implementation
that the *host* supplies when the model is built, through an `AttentionFactory`: a callable taking an
`AttentionSpec` and returning a module `impl(q, k, v) -> out` with q [T, H*D], k and v [T, Hkv*D],
out [T, H*D]. The model never builds or sees a KV cache.

Attention sinks (GPT-OSS: a learned logit per head in the softmax denominator) are the model's parameter;
a layer that has them sets `spec.has_sinks` and the factory is called as `factory(spec, sinks=tensor)`, so
the implementation holds the tensor from construction on (vLLM's Attention takes it there; SGLang's
RadixAttention takes it per call, which its wrapper can do from the stored reference). A factory without
a `sinks` parameter cannot build such a layer and is refused with the reason.

`PagedAttention` is ATOM's own implementation over a paged KV cache (used by atom-server and by the
core's tests). It reads `PagedAttentionMetadata` from the forward context and its layer's cache from
`self.kv_cache`, bound by the host with `bind_kv_caches`.
"""

from __future__ import annotations

import inspect
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
    has_sinks: bool = False  # per-head sink logits join the softmax denominator (passed to the factory)


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
    def __init__(self, spec: AttentionSpec, sinks: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        # A reference to the model's parameter, deliberately not registered here: the model owns and loads
        # it (registering it twice would list it under a second name).
        object.__setattr__(self, "sinks", sinks)
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
                           md.max_query_len, md.max_seq_len, sinks=self.sinks)
        return out.reshape(num_tokens, s.num_heads * s.head_dim)


def paged_attention_factory(spec: AttentionSpec, sinks: torch.Tensor | None = None) -> nn.Module:
    return PagedAttention(spec, sinks=sinks)


def attention_specs(model: nn.Module) -> list[AttentionSpec]:
    """The spec of every attention layer of a model, in layer order (what a host sizes its cache from)."""
    return sorted((m.spec for m in model.modules() if isinstance(m, Attention)), key=lambda s: s.layer_idx)


def bind_kv_caches(model: nn.Module, caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give each PagedAttention its layer's (k_cache, v_cache)."""
    for m in model.modules():
        if isinstance(m, PagedAttention):
            m.kv_cache = caches[m.spec.layer_idx]


def _takes_sinks(factory: AttentionFactory) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: let the call decide
        return True
    return any(p.name == "sinks" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class Attention(nn.Module):
    """Model-side attention front-end: holds the spec and the host's implementation."""

    def __init__(self, spec: AttentionSpec, attn_factory: AttentionFactory | None = None,
                 sinks: torch.Tensor | None = None):
        super().__init__()
        if spec.has_sinks != (sinks is not None):
            raise ValueError(f"attention layer {spec.prefix!r}: spec.has_sinks={spec.has_sinks} but sinks "
                             f"{'missing' if sinks is None else 'given'}")
        self.spec = spec
        factory = attn_factory or paged_attention_factory
        if sinks is None:
            self.impl = factory(spec)
            return
        if not _takes_sinks(factory):
            raise ValueError(f"attention layer {spec.prefix!r} has attention sinks, which this host's attention "
                             f"implementation ({getattr(factory, '__qualname__', type(factory).__qualname__)}) "
                             "does not support")
        self.impl = factory(spec, sinks=sinks)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.impl(q, k, v)
