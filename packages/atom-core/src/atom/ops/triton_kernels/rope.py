"""Rotary embedding: one program per token rotates all q and k heads, cos/sin loaded once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton_kernels.common import unit_rows
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait


@triton.jit
def _rope_heads(src, dst, src_stride_t, t, num_heads, cos, sin, head_dim, rot_half, IS_NEOX: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_R)[None, :]
    m = (heads < num_heads) & (i < rot_half)
    if IS_NEOX:
        i1, i2 = i, i + rot_half
    else:
        i1, i2 = 2 * i, 2 * i + 1
    base_s = src + t * src_stride_t + heads * head_dim
    base_d = dst + t * num_heads * head_dim + heads * head_dim
    x1 = tl.load(base_s + i1, mask=m, other=0.0)
    x2 = tl.load(base_s + i2, mask=m, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base_d + i1, (x1f * cos - x2f * sin).to(x1.dtype), mask=m)
    tl.store(base_d + i2, (x2f * cos + x1f * sin).to(x1.dtype), mask=m)
    if BLOCK_P > 0:  # channels past rot_dim pass through
        p = 2 * rot_half + tl.arange(0, BLOCK_P)[None, :]
        mp = (heads < num_heads) & (p < head_dim)
        tl.store(base_d + p, tl.load(base_s + p, mask=mp), mask=mp)


@triton.jit
def _rope_kernel(pos_ptr, q_ptr, k_ptr, cs_ptr, q_out, k_out, q_stride, k_stride, cs_stride, num_q_heads,
                 num_k_heads, head_dim, rot_half, IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr,
                 BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_R)[None, :]
    cos = tl.load(cs_ptr + pos * cs_stride + i, mask=i < rot_half, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * cs_stride + rot_half + i, mask=i < rot_half, other=0.0).to(tl.float32)
    _rope_heads(q_ptr, q_out, q_stride, t, num_q_heads, cos, sin, head_dim, rot_half, IS_NEOX, BLOCK_HQ, BLOCK_R,
                BLOCK_P)
    _rope_heads(k_ptr, k_out, k_stride, t, num_k_heads, cos, sin, head_dim, rot_half, IS_NEOX, BLOCK_HK, BLOCK_R,
                BLOCK_P)


@register("rotary_embedding", "triton")
def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    head_dim: int,
    cos_sin: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq*head_dim], k: [T, Hk*head_dim] -> rotated copies of the same shapes."""
    num_tokens = positions.shape[0]
    q2, k2 = unit_rows(q.reshape(num_tokens, -1)), unit_rows(k.reshape(num_tokens, -1))
    cs = unit_rows(cos_sin)
    rot_half = cs.shape[-1] // 2
    hq, hk = q2.shape[1] // head_dim, k2.shape[1] // head_dim
    q_out = torch.empty(num_tokens, hq * head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(num_tokens, hk * head_dim, dtype=k.dtype, device=k.device)
    passthrough = head_dim - 2 * rot_half
    if num_tokens:
        _rope_kernel[(num_tokens,)](
            positions, q2, k2, cs, q_out, k_out, q2.stride(0), k2.stride(0), cs.stride(0), hq, hk, head_dim,
            rot_half, IS_NEOX=is_neox, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            BLOCK_R=triton.next_power_of_2(rot_half),
            BLOCK_P=triton.next_power_of_2(passthrough) if passthrough else 0, num_warps=4,
            **pdl_args(positions.device))
    return q_out.view(q.shape), k_out.view(k.shape)
