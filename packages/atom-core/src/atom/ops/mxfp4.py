"""MXFP4 (OCP Microscaling, FP4 E2M1 elements): the format, its dequantization (the oracle) and a quantizer.

A row of K values is stored as K/32 blocks; each block holds 32 4-bit E2M1 codes and one E8M0 scale:
  - codes are packed two per byte, element 2j in the low nibble of byte j, element 2j+1 in the high one;
  - an E2M1 code is sign (bit 3), exponent (bits 2-1, bias 1) and one mantissa bit (bit 0), so the 16 codes
    are +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} (`E2M1_VALUES`, indexed by code);
  - an E8M0 scale byte s stands for 2^(s - 127) (s = 255 is NaN in the OCP spec; here it decodes to inf).
Value = E2M1_VALUES[code] * 2^(s - 127). This is the layout of the released gpt-oss checkpoints
(`*_blocks` uint8 [..., K/32, 16], `*_scales` uint8 [..., K/32]) and of transformers' MXFP4 integration.
"""

from __future__ import annotations

import torch

BLOCK = 32  # elements per scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
E8M0_BIAS = 127


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 scales -> float32 2^(s - 127), exact (2^-127 is a float32 subnormal)."""
    exponent = scales.to(torch.int32) - E8M0_BIAS
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] (two codes per byte) -> float32 [..., K] E2M1 values, element 2j from the low nibble."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    low = table[(packed & 0x0F).long()]
    high = table[(packed >> 4).long()]
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MXFP4 -> dense [..., K]. blocks: uint8 [..., K/2] or the checkpoint's [..., K/32, 16];
    scales: uint8 [..., K/32]. Exact in float32 and bfloat16 (an E2M1 value times a power of two)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() == scales.dim() + 1:  # checkpoint layout [..., K/32, 16]
        if blocks.shape[-1] != BLOCK // 2:
            raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)}: the last dim must be {BLOCK // 2} bytes")
        blocks = blocks.flatten(-2)
    groups = scales.shape[-1]
    if blocks.shape[:-1] != scales.shape[:-1] or blocks.shape[-1] != groups * BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
                         f"({BLOCK // 2} bytes per scale)")
    values = unpack_e2m1(blocks).unflatten(-1, (groups, BLOCK))
    return (values * e8m0_to_float(scales)[..., None]).flatten(-2).to(dtype)


def _ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(x)) for positive finite float32 x (frexp: x = m * 2^e with m in [0.5, 1))."""
    mantissa, exponent = torch.frexp(x)
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [..., K] (K a multiple of 32) -> (blocks uint8 [..., K/2], scales uint8 [..., K/32]).

    Each block's scale is the smallest power of two that brings its largest magnitude within E2M1's
    range (2^ceil(log2(amax / 6)), as the round-up mode of OpenAI's triton_kernels): nothing saturates.
    Elements then round to the nearest E2M1 value, ties to the even code."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs rows of a multiple of {BLOCK} values, got {w.shape[-1]}")
    x = w.float().unflatten(-1, (w.shape[-1] // BLOCK, BLOCK))
    amax = x.abs().amax(dim=-1)
    exponent = torch.zeros_like(amax, dtype=torch.int32)
    nonzero = amax > 0
    exponent[nonzero] = _ceil_log2(amax[nonzero] / E2M1_MAX).to(torch.int32)
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = torch.ldexp(x, -exponent[..., None])  # |scaled| <= 6, exact (power-of-two scaling)
    grid = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=w.device)
    distance = (scaled.abs()[..., None] - grid).abs()
    code = distance.argmin(dim=-1)  # the lower code on a tie
    upper = (code + 1).clamp(max=7)
    tie_to_even = (code % 2 == 1) & (distance.gather(-1, upper[..., None])[..., 0] == distance.gather(
        -1, code[..., None])[..., 0])
    code = torch.where(tie_to_even, upper, code)
    code = code | ((scaled < 0).long() << 3)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed.flatten(-2), (exponent + E8M0_BIAS).to(torch.uint8)
