"""Group-limited top-k routing of DeepSeek-V2/V3 and GLM-4-MoE.

    scores  = softmax(logits) | sigmoid(logits)                 (per token, float32)
    choice  = scores + correction_bias                          (V3/GLM's e_score_correction_bias; else scores)
    groups  : the experts split into num_groups equal groups, each scored by the max of its choices (V2's
              group_limited_greedy) or the sum of its top-2 choices (V3/GLM); only the best topk_group
              groups stay selectable (num_groups = 1: plain top-k, V2's greedy)
    ids     = top_k of choice among the selectable experts
    weights = scores[ids] (without the bias), divided by their sum + 1e-20 when renormalize,
              times routed_scaling_factor
    num_shared > 0 appends that many always-on columns: ids E, E + 1, ... (the shared experts held as extra
              expert slots after the E routed ones, atom.models.deepseek_v2) with weight 1.0, so one
              fused_experts call runs routed and shared experts together
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atom.ops.registry import define_op, register

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


def check_routing(num_experts: int, top_k: int, num_groups: int, topk_group: int, scoring: str,
                  group_score: str) -> None:
    """A clear error for a routing configuration the op cannot run (raised when the model is built)."""
    if scoring not in SCORINGS:
        raise ValueError(f"unsupported MoE scoring function {scoring!r}; supported: {', '.join(SCORINGS)}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"unsupported group score {group_score!r}; supported: {', '.join(GROUP_SCORES)}")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"n_group={num_groups} does not divide the {num_experts} routed experts")
    if not 1 <= topk_group <= num_groups:
        raise ValueError(f"topk_group={topk_group} must be between 1 and n_group={num_groups}")
    if not 1 <= top_k <= topk_group * (num_experts // num_groups):
        raise ValueError(f"num_experts_per_tok={top_k} exceeds the {topk_group * (num_experts // num_groups)} "
                         f"experts of the topk_group={topk_group} selectable groups")
    if group_score == "top2_sum" and num_groups > 1 and num_experts // num_groups < 2:
        raise ValueError("group score top2_sum needs at least 2 experts per group")


def _grouped_example(t, static):
    from atom.ops.moe import _router_logits  # distinct logits: every implementation must pick the same experts

    experts = int(static.get("num_experts", 16))
    groups, topk_group = int(static.get("num_groups", 4)), int(static.get("topk_group", 2))
    scoring, group_score = static.get("scoring", "sigmoid"), static.get("group_score", "top2_sum")
    bias = t.randn(experts, dtype=torch.float32, scale=0.01) if static.get("correction_bias", True) else None
    return (_router_logits(t, 5, experts), bias, int(static.get("top_k", 4)), groups, topk_group, scoring,
            group_score, bool(static.get("renormalize", True)), float(static.get("routed_scaling_factor", 2.5)))


def _grouped_compare(ref, out) -> str | None:
    from atom.ops.moe import _same_experts

    return _same_experts(ref, out)


def _grouped_fake(router_logits, correction_bias, top_k, num_groups, topk_group, scoring, group_score, renormalize,
                  routed_scaling_factor, num_shared=0):
    num_tokens = router_logits.shape[0]
    return (router_logits.new_empty(num_tokens, top_k + num_shared, dtype=torch.float32),
            router_logits.new_empty(num_tokens, top_k + num_shared, dtype=torch.int64))


def append_shared(weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                  num_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The always-on shared-expert columns (ids num_experts .. num_experts + num_shared - 1, weight 1.0)."""
    if not num_shared:
        return weights, ids
    tokens = ids.shape[0]
    shared = torch.arange(num_experts, num_experts + num_shared, dtype=ids.dtype, device=ids.device)
    return (torch.cat([weights, weights.new_ones(tokens, num_shared)], dim=1),
            torch.cat([ids, shared.expand(tokens, num_shared)], dim=1))


define_op("moe_grouped_topk", example=_grouped_example, compare=_grouped_compare, fake=_grouped_fake)


@register("moe_grouped_topk", "torch")
def moe_grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    num_groups: int,
    topk_group: int,
    scoring: str,
    group_score: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights float32 [T, top_k + num_shared], expert ids int64 [T, top_k + num_shared])."""
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores + correction_bias.float() if correction_bias is not None else scores
    if num_groups > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, num_groups, num_experts // num_groups)
        if group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(num_tokens, num_experts)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return append_shared(weights * routed_scaling_factor, ids, router_logits.shape[1], num_shared)


def _router_example(t, static):
    experts, hidden = int(static.get("num_experts", 16)), int(static.get("hidden_size", 64))
    return (t.randn(5, hidden), t.randn(experts, hidden, dtype=torch.float32, scale=hidden ** -0.5))


define_op("moe_router_logits", example=_router_example)


@register("moe_router_logits", "torch")
def moe_router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DeepSeek's router: x [T, H] (the model dtype) against the float32 weight [E, H] -> float32 logits [T, E],
    computed in float32 as transformers does (x upcast first)."""
    return F.linear(x.float(), weight.float())


def _gate_example(t, static):
    experts, hidden = int(static.get("num_experts", 16)), int(static.get("hidden_size", 64))
    w = t.randn(experts, hidden, scale=hidden ** -0.5)
    return [(t.randn(m, hidden), w) for m in (1, 5)]


define_op("moe_gate_logits", example=_gate_example)


@register("moe_gate_logits", "torch")
def moe_gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An unquantized router in the model dtype (Qwen3-MoE's and Mixtral's gate, a bias-free nn.Linear): x [T, H]
    against weight [E, H] -> logits [T, E] in x's dtype, as transformers computes them (float32 sums, rounded)."""
    return F.linear(x, weight)
