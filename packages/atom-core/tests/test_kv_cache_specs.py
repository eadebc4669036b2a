"""KV cache specs own the cache layout: shapes, bytes per block and what is allocated for each kind
(full attention, sliding window, MLA latent, FP8 with scales), and a spec written outside atom-core
plugs into the same sizing and allocation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from atom.layers.attention import (AttentionSpec, PagedAttention, PagedAttentionMetadataBuilder, metadata_builder)
from atom.layers.kv_cache import (FullAttentionKVSpec, KVCacheSpec, MLAKVCache, MLAKVSpec, PagedKVCache,
                                  SlidingWindowKVSpec, allocate_kv_caches, bind_kv_caches, bytes_per_block,
                                  kv_cache_specs)

BLOCK = 16


def _full(dtype=torch.bfloat16, **kw) -> FullAttentionKVSpec:
    return FullAttentionKVSpec(layer_idx=0, dtype=dtype, num_kv_heads=8, head_dim=128, **kw)


def test_full_attention_spec_layout_and_allocation():
    spec = _full()
    assert spec.kind == "full"
    assert spec.cache_shape(10, BLOCK) == (2, 10, BLOCK, 8, 128)
    assert spec.bytes_per_block(BLOCK) == 2 * BLOCK * 8 * 128 * 2
    assert spec.bytes_per_token() * BLOCK == spec.bytes_per_block(BLOCK)
    cache = spec.allocate(10, BLOCK, "cpu")
    assert isinstance(cache, PagedKVCache) and cache.k_scale is None and cache.v_scale is None
    for t in (cache.k, cache.v):
        assert t.shape == (10, BLOCK, 8, 128) and t.dtype == torch.bfloat16 and t.is_contiguous()
    cache.k.fill_(1.0)  # K and V are separate pages
    assert cache.v.abs().sum() == 0
    # ... in separate tensors: Inductor loses in-place writes to aliased inputs (see FullAttentionKVSpec.allocate)
    assert cache.k.untyped_storage().data_ptr() != cache.v.untyped_storage().data_ptr()


def test_sliding_window_spec_keeps_the_full_layout():
    spec = SlidingWindowKVSpec(layer_idx=3, dtype=torch.bfloat16, num_kv_heads=8, head_dim=128, sliding_window=4096)
    assert spec.kind == "sliding_window" and spec.sliding_window == 4096
    assert spec.bytes_per_block(BLOCK) == _full().bytes_per_block(BLOCK)
    assert spec.cache_shape(7, BLOCK) == _full().cache_shape(7, BLOCK)


def test_fp8_spec_halves_the_bytes_and_carries_scales():
    fp8 = _full(torch.float8_e4m3fn, k_scale=0.5, v_scale=2.0)
    assert fp8.bytes_per_block(BLOCK) * 2 == _full().bytes_per_block(BLOCK)
    cache = fp8.allocate(4, BLOCK, "cpu")
    assert cache.k.dtype == cache.v.dtype == torch.float8_e4m3fn
    assert cache.k_scale.dtype == torch.float32 and float(cache.k_scale) == 0.5 and float(cache.v_scale) == 2.0
    assert float(_full(torch.float8_e4m3fn).allocate(1, BLOCK, "cpu").k_scale) == 1.0  # vLLM's default


def test_mla_spec_is_one_latent_tensor():
    # DeepSeek-V3's shape: kv_lora_rank 512 + qk_rope_head_dim 64 per token, one tensor per layer.
    mla = MLAKVSpec(layer_idx=0, dtype=torch.bfloat16, kv_lora_rank=512, qk_rope_head_dim=64)
    assert mla.kind == "mla"
    assert mla.cache_shape(10, BLOCK) == (10, BLOCK, 576)
    assert mla.bytes_per_block(BLOCK) == BLOCK * 576 * 2
    cache = mla.allocate(10, BLOCK, "cpu")
    assert isinstance(cache, MLAKVCache) and cache.latent.shape == (10, BLOCK, 576) and cache.scale is None
    fp8 = MLAKVSpec(layer_idx=0, dtype=torch.float8_e4m3fn, kv_lora_rank=512, qk_rope_head_dim=64)
    assert fp8.bytes_per_block(BLOCK) * 2 == mla.bytes_per_block(BLOCK)
    assert float(fp8.allocate(1, BLOCK, "cpu").scale) == 1.0


@dataclass(frozen=True, kw_only=True)
class _ForeignSpec(KVCacheSpec):
    """A spec written outside atom-core: a state of fixed size per block, allocated as a dict."""

    kind: ClassVar[str] = "test_state"
    width: int

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, self.width)

    def allocate(self, num_blocks, block_size, device):
        return {"state": super().allocate(num_blocks, block_size, device)}


class _Layer(nn.Module):
    metadata_builder_cls = PagedAttentionMetadataBuilder

    def __init__(self, spec: KVCacheSpec):
        super().__init__()
        self.kv_cache_spec = spec
        self.kv_cache = None


def test_hosts_size_allocate_and_bind_any_mix_of_specs():
    specs = [MLAKVSpec(layer_idx=1, dtype=torch.bfloat16, kv_lora_rank=32, qk_rope_head_dim=8),
             FullAttentionKVSpec(layer_idx=0, dtype=torch.float32, num_kv_heads=2, head_dim=16),
             _ForeignSpec(layer_idx=2, dtype=torch.float16, width=5)]
    model = nn.Sequential(*(_Layer(s) for s in specs))
    found = kv_cache_specs(model)
    assert [s.layer_idx for s in found] == [0, 1, 2]
    assert bytes_per_block(found, 4) == 2 * 4 * 2 * 16 * 4 + 4 * 40 * 2 + 5 * 2
    caches = allocate_kv_caches(found, 3, 4, "cpu")
    bind_kv_caches(model, caches)
    by_layer = {m.kv_cache_spec.layer_idx: m.kv_cache for m in model}
    assert by_layer[0].k.shape == (3, 4, 2, 16)
    assert by_layer[1].latent.shape == (3, 4, 40)
    assert by_layer[2]["state"].shape == (3, 5) and by_layer[2]["state"].dtype == torch.float16
    with pytest.raises(ValueError, match="2 KV caches for 3"):
        bind_kv_caches(model, caches[:2])
    bind_kv_caches(model, None)
    assert all(m.kv_cache is None for m in model)


def test_paged_attention_owns_its_spec_and_builder():
    spec = AttentionSpec(layer_idx=4, num_heads=8, num_kv_heads=2, head_dim=64, scale=0.125)
    with torch.device("cpu"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            impl = PagedAttention(spec)
        finally:
            torch.set_default_dtype(torch.float32)
    assert impl.kv_cache_spec == FullAttentionKVSpec(layer_idx=4, dtype=torch.bfloat16, num_kv_heads=2, head_dim=64)
    windowed = PagedAttention(AttentionSpec(4, 8, 2, 64, 0.125, sliding_window=256), kv_cache_dtype=torch.float8_e4m3fn)
    assert windowed.kv_cache_spec.kind == "sliding_window" and windowed.kv_cache_spec.dtype == torch.float8_e4m3fn
    builder = metadata_builder(nn.Sequential(impl, windowed))
    assert isinstance(builder, PagedAttentionMetadataBuilder) and len(builder.specs) == 2

    class _OtherBuilder(PagedAttentionMetadataBuilder):
        pass

    class _OtherLayer(_Layer):
        metadata_builder_cls = _OtherBuilder

    with pytest.raises(ValueError, match="different metadata builders"):
        metadata_builder(nn.Sequential(impl, _OtherLayer(_full())))
    assert metadata_builder(nn.Linear(2, 2)) is None
