"""FP8 e4m3 helpers shared by the FP8 kernels: the rounding to e4m3 and the dynamic scale, written once.

Triton 3.9's CPU interpreter loads, stores and multiplies (tl.dot) FP8 correctly, but its float32 -> FP8
cast is not round-to-nearest-even (it rounds half up on the mantissa without carrying into the exponent:
31.07 becomes 16 instead of 32, and subnormals come out wrong). Under the interpreter (EMULATE) the value
is first rounded to the e4m3 grid in float32 arithmetic, after which the cast is exact; on a GPU the
hardware conversion (cvt.rn.satfinite) does it. The tests check the emulation against torch's cast; only
the GPU run checks the hardware path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.quant_fp8 import fp8_max, fp8_min_scale
from atom.ops.triton_kernels.common import interpreting

# exponent of the smallest normal: e4m3fn 2^-6 (bias 7), e4m3fnuz 2^-7 (bias 8)
_MIN_EXP = {torch.float8_e4m3fn: -6, torch.float8_e4m3fnuz: -7}


def fp8_consts(dtype: torch.dtype) -> dict:
    """Kernel arguments describing an FP8 dtype: clamp bound, scale floor, smallest normal exponent,
    and whether to emulate the rounding (interpreter)."""
    if dtype == torch.float8_e4m3fnuz and torch.cuda.is_available() and not torch.version.hip and not interpreting():
        raise ValueError("float8_e4m3fnuz is AMD MI300's FP8 format; Triton has no such type on NVIDIA GPUs "
                         "(use float8_e4m3fn)")
    return dict(FP8_MAX=fp8_max(dtype), MIN_SCALE=fp8_min_scale(dtype), MIN_EXP=_MIN_EXP[dtype],
                EMULATE=interpreting())


@triton.jit
def _round_to_e4m3_grid(y, MIN_EXP: tl.constexpr):
    """y (float32, |y| <= fp8 max) rounded to nearest-even on the e4m3 grid, in float32 arithmetic."""
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXP)  # subnormals share the smallest normal's step
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    r = y / step  # exact: a power of two
    r = (r + 12582912.0) - 12582912.0  # 1.5 * 2^23: float32 addition rounds r to the nearest even integer
    r = tl.where(bits < 0, -tl.abs(r), r)  # the sign bit survives rounding to zero (-0), as in the cast
    return r * step


@triton.jit
def to_fp8(y, dtype: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr, EMULATE: tl.constexpr):
    """fp8(clamp(y, -max, max)) with round to nearest even, y float32."""
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    if EMULATE:
        y = _round_to_e4m3_grid(y, MIN_EXP)
    return y.to(dtype, fp_downcast_rounding="rtne")


@triton.jit
def dynamic_scale(amax, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """max(amax / fp8_max, floor) with IEEE division, as the torch reference computes it."""
    return tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32)), MIN_SCALE)


@triton.jit
def quantize(x, scale, dtype: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr, EMULATE: tl.constexpr):
    """fp8(x / scale): x float32, scale broadcastable to x."""
    return to_fp8(tl.math.div_rn(x, tl.broadcast_to(scale, x.shape)), dtype, FP8_MAX, MIN_EXP, EMULATE)


@triton.jit
def reciprocal(scale):
    """1 / scale rounded to nearest (IEEE division): quantize_by_reciprocal's second operand."""
    return tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def quantize_by_reciprocal(x, scale, rcp, dtype: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr,
                           EMULATE: tl.constexpr):
    """The codes of quantize(x, scale) up to the sign of zero, without a division per element: rcp =
    reciprocal(scale) (both broadcastable to x); the quotient from x * rcp and one FMA correction (Markstein: with
    rcp the correctly rounded reciprocal, q + (x - q * scale) * rcp is the correctly rounded x / scale while the
    residual does not underflow; where it does, |x / scale| < ~1e-29 and both give a zero code, possibly of the
    other sign: the same products in a dot). Checked against the division on every finite bfloat16 value under 600
    scales (KERNEL_NOTES.md, stop 48; test_triton_fp8_producers runs nine of them). On a GPU the conversion
    saturates (cvt.rn.satfinite) as the clamp does: no clamp there."""
    q0 = x * rcp
    q = tl.fma(tl.fma(-q0, scale, x), rcp, q0)
    if EMULATE:
        return to_fp8(q, dtype, FP8_MAX, MIN_EXP, EMULATE)
    return q.to(dtype, fp_downcast_rounding="rtne")


def tl_fp8(dtype: torch.dtype):
    return {torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e4m3fnuz: tl.float8e4b8}[dtype]


def pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(n))


@triton.jit
def to_cache(x, scale, dtype: tl.constexpr, KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr,
             EMULATE: tl.constexpr):
    """A KV-cache entry: fp8(clamp(x / scale)) for FP8 caches (scale [1, 1] float32), a cast otherwise."""
    if KV_FP8:
        return quantize(x.to(tl.float32), scale, dtype, FP8_MAX, MIN_EXP, EMULATE)
    return x.to(dtype)


@triton.jit
def load_kv_scale(ptr, HAS_SCALE: tl.constexpr):
    """A per-tensor KV scale as a [1, 1] float32 tensor (1.0 without one)."""
    if HAS_SCALE:
        return tl.load(ptr + tl.zeros([1, 1], tl.int32)).to(tl.float32)
    return tl.full([1, 1], 1.0, tl.float32)


def kv_cache_consts(k_cache: torch.Tensor, k_scale, v_scale) -> dict:
    """Kernel arguments for writing/reading a KV cache that may be FP8 (scales apply to FP8 caches only)."""
    from atom.ops.quant_fp8 import FP8_DTYPES

    fp8 = k_cache.dtype in FP8_DTYPES
    consts = fp8_consts(k_cache.dtype) if fp8 else dict(FP8_MAX=448.0, MIN_EXP=-6, EMULATE=False)
    consts.pop("MIN_SCALE", None)
    return dict(KV_FP8=fp8, HAS_K_SCALE=fp8 and k_scale is not None, HAS_V_SCALE=fp8 and v_scale is not None,
                **consts)
