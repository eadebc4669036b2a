"""Attention input prep in one op: per-head RMSNorm of q and k (Qwen3-style qk-norm, optional), rotary
embedding, and the KV-cache write of the rotated k and of v. The torch reference composes the existing ops."""

from __future__ import annotations

import torch

from atom.ops.attention import kv_cache_example, reshape_and_cache, slot_example
from atom.ops.norm import rms_norm
from atom.ops.registry import define_op, register
from atom.ops.rope import rope_example, rotary_embedding


def _example(t, static):
    h, kv, d = int(static.get("num_heads", 4)), int(static.get("num_kv_heads", 2)), int(static.get("head_dim", 128))
    positions, cos_sin = rope_example(t, {"head_dim": d, **static})
    n = positions.shape[0]
    norm = bool(static.get("qk_norm", True))
    weights = (1 + t.randn(d, scale=0.1), 1 + t.randn(d, scale=0.1)) if norm else (None, None)
    k_cache, v_cache, scales = kv_cache_example(t, static)
    return (positions, t.randn(n, h * d), t.randn(n, kv * d), t.randn(n, kv * d), *weights, 1e-6, d, cos_sin,
            bool(static.get("is_neox", True)), k_cache, v_cache, slot_example(t, n), *scales)


define_op("qk_norm_rope_cache", mutates_args=("k_cache", "v_cache"), example=_example,
          fake=lambda positions, q, k, *args: (q.new_empty(q.shape), k.new_empty(k.shape)))


@register("qk_norm_rope_cache", "torch", cuda_graph=False, traceable=False)
def qk_norm_rope_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    head_dim: int,
    cos_sin: torch.Tensor,
    is_neox: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq*D], k/v [T, Hk*D] -> (rotated q, rotated k); writes rotated k and v at slot_mapping (-1 skipped).
    q_weight/k_weight [D] are the qk-norm weights; None (both) means no qk-norm. FP8 caches store
    k / k_scale and v / v_scale (see atom.ops.attention)."""
    t = positions.shape[0]
    if q_weight is not None:
        q = rms_norm(q.reshape(t, -1, head_dim), q_weight, eps).reshape(t, -1)
        k = rms_norm(k.reshape(t, -1, head_dim), k_weight, eps).reshape(t, -1)
    q, k = rotary_embedding(positions, q, k, head_dim, cos_sin, is_neox)
    reshape_and_cache(k.view(t, -1, head_dim), v.reshape(t, -1, head_dim), k_cache, v_cache, slot_mapping,
                      k_scale=k_scale, v_scale=v_scale)
    return q, k
