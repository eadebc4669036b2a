"""qk-norm + rope + KV-cache write in one pass: one program per token; q, k, v are read once, the rotated
k goes to the output and to the cache from the same registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.triton_kernels.common import unit_rows
from atom.ops.triton_kernels.fp8_common import kv_cache_consts, load_kv_scale, to_cache
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait


@triton.jit
def _norm_rope_heads(src, src_stride_t, dst, t, num_heads, w_ptr, eps, cos, sin, head_dim, rot_half,
                     cache, cache_base, cache_stride_h, write_cache, cache_scale, HAS_CACHE: tl.constexpr,
                     NORM: tl.constexpr, IS_NEOX: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                     KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr, EMULATE: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    h_ok = heads < num_heads
    base_s = src + t * src_stride_t + heads * head_dim
    base_d = dst + t * num_heads * head_dim + heads * head_dim
    base_c = cache + cache_base + heads * cache_stride_h
    rstd = tl.zeros([BLOCK_H, 1], tl.float32)
    if NORM:
        d = tl.arange(0, BLOCK_D)[None, :]
        full = tl.load(base_s + d, mask=h_ok & (d < head_dim), other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(full * full, axis=1, keep_dims=True) / head_dim + eps)
    i = tl.arange(0, BLOCK_R)[None, :]
    m = h_ok & (i < rot_half)
    if IS_NEOX:
        i1, i2 = i, i + rot_half
    else:
        i1, i2 = 2 * i, 2 * i + 1
    x1 = tl.load(base_s + i1, mask=m, other=0.0)
    x2 = tl.load(base_s + i2, mask=m, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:
        # rounded like the reference: normalized value to the input dtype, times the weight, to the dtype
        w1 = tl.load(w_ptr + i1, mask=i < rot_half, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + i2, mask=i < rot_half, other=0.0).to(tl.float32)
        x1f = ((x1f * rstd).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
        x2f = ((x2f * rstd).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    o1 = (x1f * cos - x2f * sin).to(x1.dtype)
    o2 = (x2f * cos + x1f * sin).to(x1.dtype)
    tl.store(base_d + i1, o1, mask=m)
    tl.store(base_d + i2, o2, mask=m)
    if HAS_CACHE:
        cdt = cache.dtype.element_ty
        tl.store(base_c + i1, to_cache(o1, cache_scale, cdt, KV_FP8, FP8_MAX, MIN_EXP, EMULATE), mask=m & write_cache)
        tl.store(base_c + i2, to_cache(o2, cache_scale, cdt, KV_FP8, FP8_MAX, MIN_EXP, EMULATE), mask=m & write_cache)
    if BLOCK_P > 0:  # channels past rot_dim: normalized, not rotated
        p = 2 * rot_half + tl.arange(0, BLOCK_P)[None, :]
        mp = h_ok & (p < head_dim)
        xp = tl.load(base_s + p, mask=mp, other=0.0)
        if NORM:
            wp = tl.load(w_ptr + p, mask=p < head_dim, other=0.0).to(tl.float32)
            xp = ((xp.to(tl.float32) * rstd).to(xp.dtype).to(tl.float32) * wp).to(xp.dtype)
        tl.store(base_d + p, xp, mask=mp)
        if HAS_CACHE:
            tl.store(base_c + p, to_cache(xp, cache_scale, cache.dtype.element_ty, KV_FP8, FP8_MAX, MIN_EXP, EMULATE),
                     mask=mp & write_cache)


@triton.jit
def _qk_norm_rope_cache_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cs_ptr, q_out, k_out, kc_ptr, vc_ptr, slot_ptr,
    k_scale_ptr, v_scale_ptr, eps, q_stride, k_stride, v_stride, cs_stride, num_q_heads, num_k_heads, head_dim, rot_half, block_size,
    kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
    NORM: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, KV_FP8: tl.constexpr,
    HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr,
    EMULATE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_R)[None, :]
    cos = tl.load(cs_ptr + pos * cs_stride + i, mask=i < rot_half, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * cs_stride + rot_half + i, mask=i < rot_half, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    write = (tl.zeros([1, 1], tl.int64) + slot) >= 0  # a [1, 1] tensor mask: padding tokens (-1) skip the cache
    slot = tl.maximum(slot, 0)
    kc_base = (slot // block_size) * kc_stride_b + (slot % block_size) * kc_stride_s
    vc_base = (slot // block_size) * vc_stride_b + (slot % block_size) * vc_stride_s
    k_scale = load_kv_scale(k_scale_ptr, HAS_K_SCALE)
    _norm_rope_heads(q_ptr, q_stride, q_out, t, num_q_heads, qw_ptr, eps, cos, sin, head_dim, rot_half,
                     kc_ptr, 0, 0, write, k_scale, False, NORM, IS_NEOX, BLOCK_HQ, BLOCK_R, BLOCK_D, BLOCK_P, KV_FP8,
                     FP8_MAX, MIN_EXP, EMULATE)
    _norm_rope_heads(k_ptr, k_stride, k_out, t, num_k_heads, kw_ptr, eps, cos, sin, head_dim, rot_half,
                     kc_ptr, kc_base, kc_stride_h, write, k_scale, True, NORM, IS_NEOX, BLOCK_HK, BLOCK_R, BLOCK_D,
                     BLOCK_P, KV_FP8, FP8_MAX, MIN_EXP, EMULATE)
    h = tl.arange(0, BLOCK_HK)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mv = (h < num_k_heads) & (d < head_dim)
    val = tl.load(v_ptr + t * v_stride + h * head_dim + d, mask=mv)
    val = to_cache(val, load_kv_scale(v_scale_ptr, HAS_V_SCALE), vc_ptr.dtype.element_ty, KV_FP8, FP8_MAX, MIN_EXP,
                   EMULATE)
    tl.store(vc_ptr + vc_base + h * vc_stride_h + d, val, mask=mv & write)


@register("qk_norm_rope_cache", "triton")
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
    """q [T, Hq*D], k/v [T, Hk*D] -> (rotated q, rotated k); writes rotated k and v at slot_mapping (-1 skipped);
    FP8 caches store k / k_scale and v / v_scale."""
    num_tokens = positions.shape[0]
    q2, k2, v2 = (unit_rows(x.reshape(num_tokens, -1)) for x in (q, k, v))
    cs = unit_rows(cos_sin)
    rot_half = cs.shape[-1] // 2
    hq, hk = q2.shape[1] // head_dim, k2.shape[1] // head_dim
    q_out = torch.empty(num_tokens, hq * head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(num_tokens, hk * head_dim, dtype=k.dtype, device=k.device)
    passthrough = head_dim - 2 * rot_half
    norm = q_weight is not None
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if num_tokens:
        _qk_norm_rope_cache_kernel[(num_tokens,)](
            positions, q2, k2, v2, q_weight if norm else q2, k_weight if norm else k2, cs, q_out, k_out,
            k_cache, v_cache, slot_mapping, q2 if k_scale is None else k_scale, q2 if v_scale is None else v_scale,
            float(eps), q2.stride(0), k2.stride(0), v2.stride(0), cs.stride(0),
            hq, hk, head_dim, rot_half, k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            NORM=norm, IS_NEOX=is_neox, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            BLOCK_R=triton.next_power_of_2(rot_half), BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_P=triton.next_power_of_2(passthrough) if passthrough else 0,
            **kv_cache_consts(k_cache, k_scale, v_scale), num_warps=4, **pdl_args(q.device))
    return q_out.view(q.shape), k_out.view(k.shape)
