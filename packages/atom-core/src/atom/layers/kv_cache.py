"""KV cache specs: each attention layer that keeps a paged cache says what its cache looks like.

A host that owns the KV cache (atom-server's runner) never knows K/V pairs or latent vectors. It asks
every cache-owning attention module of the model for its `kv_cache_spec` (`kv_cache_specs(model)`),
sizes the pool from the specs' bytes per block, calls `spec.allocate(num_blocks, block_size, device)`
for each layer and binds whatever that returns to the layer (`bind_kv_caches`). Only the attention
implementation that made the spec reads the object it allocated.

The contract of a spec (subclass `KVCacheSpec`, in any module; a frozen dataclass is the natural form):
- `kind`: what the layer attends over, e.g. "full", "sliding_window", "mla" (hosts may group or size
  layers by kind; atom-server sizes every kind by blocks of the same block size);
- `layer_idx`: the layer the cache belongs to;
- `dtype`: the cache's element type (the model's compute dtype, or an FP8 type with per-tensor scales);
- `cache_shape(num_blocks, block_size)`: the shape of the one tensor allocated for the layer;
- `bytes_per_block(block_size)`: what one block of this layer costs (the sizing input);
- `allocate(num_blocks, block_size, device)`: the object bound to the layer (a tensor, or a small
  tuple of views of it plus scales).
The defaults below derive `bytes_per_block` from `cache_shape` and `dtype` and allocate one zeroed tensor
of `cache_shape`; a spec overrides `allocate` to hand its layer named views.

Specs defined here:
- `FullAttentionKVSpec`: K and V pages of [num_blocks, block_size, num_kv_heads, head_dim] each (sized as
  one [2, ...] shape, allocated as two tensors) bound as `PagedKVCache(k, v, k_scale, v_scale)`; an FP8 dtype (e.g. torch.float8_e4m3fn) halves the bytes of
  bf16 and carries per-tensor float32 scales (1.0 unless the checkpoint gives them, as in vLLM).
- `SlidingWindowKVSpec`: the same layout for a layer with a window (the pool keeps whole sequences today;
  a host may later free blocks that slid out of every window).
- `MLAKVSpec`: multi-head latent attention's compressed cache, ONE tensor
  [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] bound as `MLAKVCache(latent, scale)`; an FP8
  dtype halves its bytes too and carries ONE per-tensor float32 scale (1.0 unless the checkpoint gives the
  layer a k_scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2")
                   if hasattr(torch, n))


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def check_cache_dtype(dtype: torch.dtype) -> torch.dtype:
    """An attention cache's element type, refused when it is an FP8 type ATOM's kernels do not store."""
    if is_fp8(dtype) and dtype not in (torch.float8_e4m3fn, getattr(torch, "float8_e4m3fnuz", None)):
        raise ValueError(f"kv_cache_dtype {dtype}: ATOM's FP8 KV caches are e4m3 (torch.float8_e4m3fn, or "
                         "float8_e4m3fnuz on MI300); use one of those")
    return dtype


def check_kv_scale(prefix: str, kind: str, value: float, cache_dtype: torch.dtype) -> float:
    """A checkpoint's per-tensor FP8 KV-cache scale ("k" or "v") as the cache of `cache_dtype` applies it:
    checked positive, doubled for e4m3fnuz (checkpoint scales are for e4m3fn, max 448; e4m3fnuz's values are
    worth half)."""
    if kind not in ("k", "v"):
        raise ValueError(f"KV-cache scale kind must be 'k' or 'v', got {kind!r}")
    if not value > 0:
        raise ValueError(f"{prefix}: the checkpoint's {kind}_scale is {value}; KV-cache scales must be "
                         "positive")
    return float(value) * (2.0 if cache_dtype == torch.float8_e4m3fnuz else 1.0)


def _scale(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    return torch.tensor(value, dtype=torch.float32, device=device) if is_fp8(dtype) else None


@dataclass(frozen=True, kw_only=True)
class KVCacheSpec:
    """Base of every layer's KV cache spec (see the module docstring for the contract)."""

    kind: ClassVar[str] = ""
    layer_idx: int
    dtype: torch.dtype

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        raise NotImplementedError

    def bytes_per_block(self, block_size: int) -> int:
        return math.prod(self.cache_shape(1, block_size)) * self.dtype.itemsize

    def bytes_per_token(self) -> int:
        return self.bytes_per_block(1)

    def allocate(self, num_blocks: int, block_size: int, device: torch.device | str) -> Any:
        return torch.zeros(self.cache_shape(num_blocks, block_size), dtype=self.dtype, device=device)


class PagedKVCache(NamedTuple):
    """One layer's K and V pages, each [num_blocks, block_size, num_kv_heads, head_dim]; scales only for FP8."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class FullAttentionKVSpec(KVCacheSpec):
    kind: ClassVar[str] = "full"
    num_kv_heads: int
    head_dim: int
    k_scale: float = 1.0  # per-tensor scales of an FP8 cache (ignored for other dtypes)
    v_scale: float = 1.0

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def allocate(self, num_blocks: int, block_size: int, device: torch.device | str) -> PagedKVCache:
        # Two tensors, not two views of one: Inductor (torch 2.11) drops the write-back of a custom op's
        # in-place update to inputs that alias each other, so a compiled model over views of one K|V tensor
        # lost every cache write after its first step (H200, test_compile's inductor model test).
        shape = self.cache_shape(num_blocks, block_size)[1:]
        k = torch.zeros(shape, dtype=self.dtype, device=device)
        v = torch.zeros(shape, dtype=self.dtype, device=device)
        return PagedKVCache(k, v, _scale(self.k_scale, self.dtype, k.device), _scale(self.v_scale, self.dtype, k.device))


@dataclass(frozen=True, kw_only=True)
class SlidingWindowKVSpec(FullAttentionKVSpec):
    kind: ClassVar[str] = "sliding_window"
    sliding_window: int


class MLAKVCache(NamedTuple):
    """One layer's latent pages [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]; scale only for FP8."""

    latent: torch.Tensor
    scale: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class MLAKVSpec(KVCacheSpec):
    kind: ClassVar[str] = "mla"
    kv_lora_rank: int
    qk_rope_head_dim: int
    scale: float = 1.0  # per-tensor scale of an FP8 latent cache (ignored for other dtypes)

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.kv_lora_rank + self.qk_rope_head_dim)

    def allocate(self, num_blocks: int, block_size: int, device: torch.device | str) -> MLAKVCache:
        latent = super().allocate(num_blocks, block_size, device)
        return MLAKVCache(latent, _scale(self.scale, self.dtype, latent.device))


def kv_cache_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of a model that keep a host-allocated paged cache (they have a `kv_cache_spec`), in
    layer order."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "kv_cache_spec", None), KVCacheSpec)]
    return sorted(layers, key=lambda m: m.kv_cache_spec.layer_idx)


def kv_cache_specs(model: nn.Module) -> list[KVCacheSpec]:
    return [m.kv_cache_spec for m in kv_cache_layers(model)]


def bytes_per_block(specs: Sequence[KVCacheSpec], block_size: int) -> int:
    """One block of every layer: what the pool pays per block id."""
    return sum(s.bytes_per_block(block_size) for s in specs)


def allocate_kv_caches(specs: Sequence[KVCacheSpec], num_blocks: int, block_size: int,
                       device: torch.device | str) -> list[Any]:
    return [s.allocate(num_blocks, block_size, device) for s in specs]


def bind_kv_caches(model: nn.Module, caches: Sequence[Any] | None) -> None:
    """Give each cache-owning layer the object its spec allocated (caches in `kv_cache_layers` order);
    None unbinds every layer."""
    layers = kv_cache_layers(model)
    if caches is not None and len(caches) != len(layers):
        raise ValueError(f"{len(caches)} KV caches for {len(layers)} cache-owning layers")
    for i, m in enumerate(layers):
        m.kv_cache = caches[i] if caches is not None else None
