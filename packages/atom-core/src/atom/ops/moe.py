"""Mixture-of-experts: routing and expert computation.

Expert weights are stacked: w13 [E, 2*I, H] (gate rows then up rows), w2 [E, H, I].

fused_experts takes (token, k) pairs of expert id -1 as routed elsewhere: they contribute nothing (expert
parallelism: another rank holds that expert). An implementation that cannot skip them refuses a layer built
with static {"expert_parallel": True} in its `supports`.
"""

from __future__ import annotations

import torch

from atom.ops.registry import define_op, register


def _router_logits(t, tokens: int, experts: int) -> torch.Tensor:
    # Distinct values k/4 (exact in bf16): no ties, so every implementation must pick the same experts.
    rows = [t.randperm(experts) for _ in range(tokens)]
    return torch.stack(rows).to(t.dtype) / 4


def _topk_example(t, static):
    experts = int(static.get("num_experts", 16))
    return (_router_logits(t, 5, experts), int(static.get("top_k", 4)), bool(static.get("renormalize", True)))


def _same_experts(ref, out) -> str | None:
    """Top-k sets compared per token in expert order (an implementation need not sort by weight)."""
    from atom.ops.self_check import compare_outputs

    (rw, ri), (ow, oi) = ref, out
    if ri.shape != oi.shape:
        return f"ids {list(oi.shape)}, the reference gives {list(ri.shape)}"
    ro, oo = ri.long().sort(-1), oi.long().sort(-1)
    return compare_outputs((rw.gather(-1, ro.indices), ro.values), (ow.float().gather(-1, oo.indices), oo.values))


def _experts_example(t, static):
    hidden = int(static.get("hidden_size", 256))
    inter = int(static.get("intermediate_size", 128))
    experts, tokens, top_k = 4, 5, 2
    ids = torch.stack([t.randperm(experts)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(t.randn(tokens, top_k, dtype=torch.float32), dim=-1)
    return (t.randn(tokens, hidden), t.randn(experts, 2 * inter, hidden, scale=hidden**-0.5),
            t.randn(experts, hidden, inter, scale=inter**-0.5), weights, ids, static.get("activation", "silu"))


define_op("moe_topk_softmax", example=_topk_example, compare=_same_experts)
define_op("fused_experts", example=_experts_example, weight_args=("w13", "w2"),
          fake=lambda x, w13, w2, topk_weights, topk_ids, activation="silu": x.new_empty(x.shape[0], w2.shape[1]))


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


# Reads per-expert token counts on the host: neither capturable nor traceable (a custom op under compile).
@register("fused_experts", "torch", cuda_graph=False, traceable=False)
def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """sum_k w_k * expert_{id_k}(x), looping over the experts that received tokens (id -1: none)."""
    from atom.ops.activation import gelu_tanh_and_mul, silu_and_mul

    act = silu_and_mul if activation == "silu" else gelu_tanh_and_mul
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    skipped = int((flat_ids < 0).sum())  # sorted first: start after them
    counts = torch.bincount(flat_ids[flat_ids >= 0], minlength=w13.shape[0]).tolist()
    token_of = order // topk_ids.shape[1]
    weight_of = topk_weights.reshape(-1)[order]
    start = skipped
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token_of[start : start + n]
        h = act(x[tok] @ w13[e].t())
        y = (h @ w2[e].t()).float() * weight_of[start : start + n, None]
        out.index_add_(0, tok, y)
        start += n
    return out.to(x.dtype)
