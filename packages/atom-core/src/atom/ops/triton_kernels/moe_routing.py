"""Group-limited top-k routing (atom.ops.moe_routing) in one program per token.

The token's expert scores are held as a [groups, experts per group] tile, so the group scores are row
reductions; the topk_group best groups and then the top_k experts are picked by repeated max (lowest index
among ties, as torch.topk on distinct values). No host sync: the launch captures in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from atom.envs import env_int
from atom.ops.registry import register
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait


@triton.jit
def _router_logits_kernel(x_ptr, w_ptr, out_ptr, num_tokens, num_experts, hidden, x_stride, w_stride, out_stride,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """logits[t, e] = sum_h float(x[t, h]) * float(w[e, h]) in float32 FMAs, stored in out's dtype. One program
    holds BLOCK_E whole weight rows in registers (read once) and walks BLOCK_T tokens: at decode the weight is
    spread over E / BLOCK_E programs (a float32 tl.dot in IEEE precision measured 45 us a call on the H200)."""
    pdl_wait(PDL)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    t0 = tl.program_id(1) * BLOCK_T
    h = tl.arange(0, BLOCK_H)
    e_ok, h_ok = e < num_experts, h < hidden
    w = tl.load(w_ptr + e[:, None].to(tl.int64) * w_stride + h[None, :], mask=e_ok[:, None] & h_ok[None, :],
                other=0.0).to(tl.float32)
    for i in range(BLOCK_T):
        t = (t0 + i).to(tl.int64)
        xv = tl.load(x_ptr + t * x_stride + h, mask=h_ok & ((t + 0 * h) < num_tokens), other=0.0).to(tl.float32)
        tl.store(out_ptr + t * out_stride + e, tl.sum(w * xv[None, :], axis=1),
                 mask=e_ok & ((t + 0 * e) < num_tokens))


# (BLOCK_T, BLOCK_E) for sweeps (tools/device/mla_decode_sweep.py). H200, 2026-12-04 (that script, graph replays
# less a ~5 us floor): 16 tokens a program took ~13-14 us at 32 and 128 tokens, the tiles above ~2.5 and ~6 us; a
# [T, E, H] register-tile variant (no reduction in the H loop) measured 1.5-3x slower than 16 a program.
ROUTER_TILE_OVERRIDE: tuple[int, int] | None = None
# From this many tokens (prefill) the router is a float32 cuBLAS GEMM on an upcast copy of x, as the torch
# reference computes it (module-level for sweeps and the tests).
ROUTER_GEMM_MIN_TOKENS = 512


@register("moe_router_logits", "triton")
def moe_router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] against the float32 router weight [E, H] -> float32 logits [T, E]: below ROUTER_GEMM_MIN_TOKENS in
    one kernel (no float32 copy of x, no cuBLAS GEMV + reduction pair), from there a float32 GEMM."""
    if x.shape[0] >= ROUTER_GEMM_MIN_TOKENS:
        # prefill: the walk is serial over a program's tokens, a float32 GEMM is not (H200, V2-Lite's router:
        # ~600 us a layer at 16K tokens on the kernel)
        return F.linear(x.float(), weight.float())
    return _router_logits(x, weight, torch.float32)


# Tokens up to which an unquantized router in the model dtype (moe_gate_logits: Qwen3-MoE's and Mixtral's gate) runs
# _router_logits_kernel (float32 sums of the weight rows, rounded to the logits' dtype as a cuBLAS GEMM rounds them)
# instead of the cuBLAS GEMM. On the H100 (2026-12-06, decode_profile.py, qwen3-30b-a3b FP8 at batch 1, PDL off)
# that GEMM took 4.9 us a layer for 0.5 MB of weights (7.5% of the step), and a cuBLAS kernel between two Triton
# kernels also breaks their programmatic dependent launch chain. The engine A/B (H100, 2026-12-06, stop 55, 3
# interleaved rounds, qwen3-30b-a3b FP8 + FP8 KV, materialized weights): batch 1 3.10 -> 2.93 ms a step in every
# round (1.06x), batch 32 12.56 -> 12.48, batch 128 unchanged (its decode steps have 128 tokens: past the bound).
# ATOM_MOE_GATE_KERNEL_MAX_TOKENS=N sets it per process (read when a model is built: SparseMoE calls the op only
# with N > 0; 0 turns it off).
GATE_KERNEL_MAX_TOKENS = env_int("ATOM_MOE_GATE_KERNEL_MAX_TOKENS", 64, ROUTER_GEMM_MIN_TOKENS - 1, "tokens")


@register("moe_gate_logits", "triton")
def moe_gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] against the router weight [E, H] (the model dtype) -> logits [T, E] in x's dtype: up to
    GATE_KERNEL_MAX_TOKENS tokens in one Triton kernel, else the GEMM."""
    if not 0 < x.shape[0] <= GATE_KERNEL_MAX_TOKENS:
        return F.linear(x, weight)
    return _router_logits(x, weight, x.dtype)


def _router_logits(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    out = torch.empty(num_tokens, num_experts, dtype=out_dtype, device=x.device)
    if num_tokens:
        x = x if x.stride(-1) == 1 else x.contiguous()
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        block_h = triton.next_power_of_2(hidden)
        # 8K float32 weights a program (32 a thread at 8 warps)
        block_e = max(1, min(16, 8192 // block_h, triton.next_power_of_2(num_experts)))
        # few tokens a program: their walk is serial (H200: 16 a program took ~13 us at 32-128 tokens, 2 a program
        # ~2.5 us at 32, 4 a program ~6 us at 128; DeepSeek-V2-Lite's router, 64 x 2048)
        block_t = min(num_tokens, 2 if num_tokens <= 64 else 4)
        if ROUTER_TILE_OVERRIDE is not None:
            block_t, block_e = ROUTER_TILE_OVERRIDE
        grid = (triton.cdiv(num_experts, block_e), triton.cdiv(num_tokens, block_t))
        _router_logits_kernel[grid](x, w, out, num_tokens, num_experts, hidden, x.stride(0), w.stride(0), out.stride(0),
                                    BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=block_h, num_warps=8,
                                    **pdl_args(x.device))
    return out


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
