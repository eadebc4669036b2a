"""Mixture-of-experts: routing and expert computation.

Expert weights are stacked: w13 [E, 2*I, H] (gate rows then up rows), w2 [E, H, I].
"""

from __future__ import annotations

import torch

from atom.ops.registry import register


@register("moe_topk_softmax", "torch")
def moe_topk_softmax(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over experts, keep the top_k; returns (weights float32 [T, k], expert ids int64 [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@register("fused_experts", "torch")
def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """sum_k w_k * expert_{id_k}(x), looping over the experts that received tokens."""
    from atom.ops.activation import gelu_tanh_and_mul, silu_and_mul

    act = silu_and_mul if activation == "silu" else gelu_tanh_and_mul
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    token_of = order // topk_ids.shape[1]
    weight_of = topk_weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token_of[start : start + n]
        h = act(x[tok] @ w13[e].t())
        y = (h @ w2[e].t()).float() * weight_of[start : start + n, None]
        out.index_add_(0, tok, y)
        start += n
    return out.to(x.dtype)
