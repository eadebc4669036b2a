"""Group-limited top-k routing (atom.ops.moe_routing) in one program per token.

The token's expert scores are held as a [groups, experts per group] tile, so the group scores are row
reductions; the topk_group best groups and then the top_k experts are picked by repeated max (lowest index
among ties, as torch.topk on distinct values). No host sync: the launch captures in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait


@triton.jit
def _router_logits_kernel(x_ptr, w_ptr, out_ptr, num_tokens, num_experts, hidden, x_stride, w_stride, out_stride,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """logits[t, e] = sum_h float(x[t, h]) * w[e, h] in float32 FMAs. A program owns a [BLOCK_T, BLOCK_E] tile of
    the logits and walks the hidden size in BLOCK_H steps, accumulating the products element-wise in a
    [BLOCK_T, BLOCK_E, BLOCK_H] register tile (no reduction inside the loop, so its loads pipeline); one sum at
    the end. On the H200 a float32 tl.dot in IEEE precision took 45 us a call, and a loop over tokens one at a
    time 11 us at 32-128 tokens (its per-token reductions serialize)."""
    pdl_wait(PDL)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    h = tl.arange(0, BLOCK_H)
    t_ok, e_ok = t < num_tokens, e < num_experts
    x_ptrs = x_ptr + t[:, None].to(tl.int64) * x_stride + h[None, :]
    w_ptrs = w_ptr + e[:, None].to(tl.int64) * w_stride + h[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_E, BLOCK_H], tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        h_ok = (h0 + h) < hidden
        xv = tl.load(x_ptrs, mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        wv = tl.load(w_ptrs, mask=e_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        acc += xv[:, None, :] * wv[None, :, :]
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    logits = tl.sum(acc, axis=2)
    tl.store(out_ptr + t[:, None].to(tl.int64) * out_stride + e[None, :], logits, mask=t_ok[:, None] & e_ok[None, :])


def _router_tile(num_tokens: int, num_experts: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_H): up to 8 tokens a program; experts split so that small batches still spread
    over a few dozen programs (each reads its BLOCK_E router rows once); 8K products in registers."""
    block_t = min(8, triton.next_power_of_2(max(num_tokens, 1)))
    block_e = min(triton.next_power_of_2(num_experts), 4 if num_tokens <= 8 else 8 if num_tokens <= 64 else 16)
    return block_t, block_e, max(16, min(256, 8192 // (block_t * block_e)))


@register("moe_router_logits", "triton")
def moe_router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] against the float32 router weight [E, H] -> float32 logits [T, E] in one kernel (no float32 copy
    of x, no cuBLAS GEMV + reduction pair)."""
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    out = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    if num_tokens:
        x = x if x.stride(-1) == 1 else x.contiguous()
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        block_t, block_e, block_h = ROUTER_TILE_OVERRIDE or _router_tile(num_tokens, num_experts)
        grid = (triton.cdiv(num_experts, block_e), triton.cdiv(num_tokens, block_t))
        _router_logits_kernel[grid](x, w, out, num_tokens, num_experts, hidden, x.stride(0), w.stride(0), out.stride(0),
                                    BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=block_h, num_warps=4,
                                    **pdl_args(x.device))
    return out


# (BLOCK_T, BLOCK_E, BLOCK_H) for sweeps (tools/device/mla_decode_sweep.py)
ROUTER_TILE_OVERRIDE: tuple[int, int, int] | None = None


@triton.jit
def _grouped_topk_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, stride, num_groups, per_group, scaling,
                         TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr,
                         HAS_BIAS: tl.constexpr, GROUP_TOP2: tl.constexpr, GROUPED: tl.constexpr,
                         RENORM: tl.constexpr, NUM_SHARED: tl.constexpr, S_PAD: tl.constexpr, G_PAD: tl.constexpr,
                         E_PAD: tl.constexpr, K_PAD: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_PAD)
    j = tl.arange(0, E_PAD)
    valid = (g[:, None] < num_groups) & (j[None, :] < per_group)
    e = g[:, None] * per_group + j[None, :]
    neg = float("-inf")
    x = tl.load(logits_ptr + t * stride + e, mask=valid, other=neg).to(tl.float32)
    if SIGMOID:
        s = tl.sigmoid(x)
    else:
        p = tl.exp(x - tl.max(tl.max(x, axis=1), axis=0))
        s = p / tl.sum(tl.sum(p, axis=1), axis=0)
    choice = s
    if HAS_BIAS:
        choice = s + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, neg)

    if GROUPED:
        best1 = tl.max(choice, axis=1)
        if GROUP_TOP2:
            first = tl.min(tl.where(choice == best1[:, None], j[None, :], E_PAD), axis=1)
            best2 = tl.max(tl.where(j[None, :] == first[:, None], neg, choice), axis=1)
            group_score = best1 + best2
        else:
            group_score = best1
        group_score = tl.where(g < num_groups, group_score, neg)
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(group_score, axis=0)
            gi = tl.min(tl.where(group_score == top, g, G_PAD), axis=0)
            keep = keep | (g == gi)
            group_score = tl.where(g == gi, neg, group_score)
        choice = tl.where(keep[:, None], choice, neg)

    # the picks stay in registers and are stored once
    slot = tl.arange(0, K_PAD)
    weights = tl.zeros([K_PAD], tl.float32)
    ids = tl.zeros([K_PAD], tl.int64)
    for k in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        idx = tl.min(tl.min(tl.where(choice == top, e, G_PAD * E_PAD), axis=1), axis=0)
        w = tl.sum(tl.sum(tl.where(e == idx, s, 0.0), axis=1), axis=0)
        weights = tl.where(slot == k, w, weights)
        ids = tl.where(slot == k, idx.to(tl.int64), ids)
        choice = tl.where(e == idx, neg, choice)
    if RENORM:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    row = TOP_K + NUM_SHARED
    tl.store(w_ptr + t * row + slot, weights * scaling, mask=slot < TOP_K)
    tl.store(ids_ptr + t * row + slot, ids, mask=slot < TOP_K)
    if NUM_SHARED > 0:  # the shared experts' always-on columns: ids after the routed experts, weight 1.0
        s_slot = tl.arange(0, S_PAD)
        s_ok = s_slot < NUM_SHARED
        tl.store(w_ptr + t * row + TOP_K + s_slot, tl.full([S_PAD], 1.0, tl.float32), mask=s_ok)
        tl.store(ids_ptr + t * row + TOP_K + s_slot, (num_groups * per_group + s_slot).to(tl.int64), mask=s_ok)


@register("moe_grouped_topk", "triton")
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
    """router_logits [T, E] -> (weights float32 [T, top_k + num_shared], expert ids int64 [T, top_k + num_shared]);
    the shared columns are written by the same program."""
    num_tokens, num_experts = router_logits.shape
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k + num_shared, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k + num_shared, dtype=torch.int64, device=logits.device)
    if num_tokens:
        per_group = num_experts // num_groups
        _grouped_topk_kernel[(num_tokens,)](
            logits, correction_bias if correction_bias is not None else logits, weights, ids, logits.stride(0),
            num_groups, per_group, float(routed_scaling_factor), TOP_K=top_k, TOPK_GROUP=topk_group,
            SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None, GROUP_TOP2=group_score == "top2_sum",
            GROUPED=num_groups > 1, RENORM=renormalize, NUM_SHARED=num_shared,
            S_PAD=triton.next_power_of_2(max(num_shared, 1)), G_PAD=triton.next_power_of_2(num_groups),
            E_PAD=triton.next_power_of_2(per_group), K_PAD=triton.next_power_of_2(top_k),
            num_warps=1 if num_experts <= 64 else 4, **pdl_args(logits.device))
    return weights, ids
