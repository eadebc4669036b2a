"""FP8 activation producers: RMSNorm and SiLU-and-mul that emit FP8 codes + scales for the FP8 linear after
them, and `fp8_linear_quantized`, the FP8 linear on activations quantized elsewhere.

`silu_and_mul_rowmax` and `fp8_linear_rowmax` split the work the other way for per-token layouts at a few rows:
the producer returns its float output and the absolute maximum of each ROWMAX_CHUNK-column chunk of every row,
and the linear's GEMM quantizes the activations itself with the scale those maxima give (the quantization kernel
of a per-token row is one program walking the whole row; the producer's chunks run in parallel). The codes are
the ones `fp8_quant_token` writes, so `fp8_linear_rowmax(*silu_and_mul_rowmax(x))` equals
`fp8_linear_quantized(*silu_and_mul_quant_fp8(x, None))`.

Each producer op is its float op followed by the activation quantization, with the float result rounded to
its own dtype first, exactly as the unfused path (float op, then `fp8_quant_group` / `fp8_quant_token`)
computes it: the fused kernels are bit-identical to that pair, and `fp8_linear_quantized(*producer(...))`
to `fp8_linear(float op(...))`. group_size None quantizes per token (scales [..., 1]), otherwise per
1 x group_size slice (scales [..., ceil(K / group_size)]). These torch functions are the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atom.ops.activation import silu_and_mul
from atom.ops.norm import fused_add_rms_norm, rms_norm
from atom.ops.quant_fp8 import (
    _fp8_of,
    _linear_example,
    _scale_of,
    _to_fp8,
    quantize_activations,
    check_weight_scale,
    dequantize_activations,
    dequantize_weight,
    per_token_group_quant_fp8,
    per_token_quant_fp8,
)
from atom.ops.registry import define_op, register


def quantize_as_consumer(y: torch.Tensor, group_size: int | None,
                         fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantization an FP8 linear with this input layout applies (torch reference)."""
    if group_size is None:
        return per_token_quant_fp8(y, fp8_dtype)
    return per_token_group_quant_fp8(y, group_size, fp8_dtype)


def _quant_fake(x: torch.Tensor, k: int, group_size: int | None, fp8_dtype: torch.dtype):
    lead = x.shape[:-1]
    groups = 1 if group_size is None else -(-k // group_size)
    return x.new_empty(*lead, k, dtype=fp8_dtype), x.new_empty(*lead, groups, dtype=torch.float32)


def _norm_example(t, static, residual: bool):
    h = int(static.get("hidden_size", 320))
    x = (t.randn(7, h),) + ((t.randn(7, h),) if residual else ())
    return (*x, 1 + t.randn(h, scale=0.1), 1e-6, static.get("group_size", 128), _fp8_of(static))


define_op("rms_norm_quant_fp8", example=lambda t, static: _norm_example(t, static, False),
          fake=lambda x, weight, eps, group_size, fp8_dtype: _quant_fake(x, x.shape[-1], group_size, fp8_dtype))
define_op("fused_add_rms_norm_quant_fp8", example=lambda t, static: _norm_example(t, static, True),
          fake=lambda x, residual, weight, eps, group_size, fp8_dtype: (
              *_quant_fake(x, x.shape[-1], group_size, fp8_dtype), torch.empty_like(x)))
define_op("silu_and_mul_quant_fp8",
          example=lambda t, static: (t.randn(7, 2 * int(static.get("intermediate_size", 320))),
                                     static.get("group_size", 128), _fp8_of(static)),
          fake=lambda x, group_size, fp8_dtype: _quant_fake(x, x.shape[-1] // 2, group_size, fp8_dtype))
# Columns of a row whose absolute maximum silu_and_mul_rowmax reports as one value (its Triton kernel's block).
ROWMAX_CHUNK = 1024


def rowmax_parts(d: int) -> int:
    """How many partial maxima silu_and_mul_rowmax reports per row of d columns."""
    return max(1, -(-d // ROWMAX_CHUNK))


define_op("silu_and_mul_rowmax",
          example=lambda t, static: (t.randn(5, 2 * int(static.get("intermediate_size", 320))),),
          fake=lambda x: (x.new_empty(*x.shape[:-1], x.shape[-1] // 2),
                          x.new_empty(*x.shape[:-1], rowmax_parts(x.shape[-1] // 2), dtype=torch.float32)))


def _linear_rowmax_example(t, static):
    """fp8_linear's per-token example calls with their activations' chunk maxima."""
    layout = "tensor" if static.get("weight_layout") == "tensor" else "channel"  # per-token activations only
    static = {**static, "block_size": None, "weight_layout": layout}
    return [(x, _chunk_maxima(x), q, scale, bias, x.dtype) for x, q, scale, bias, _ in _linear_example(t, static)]


define_op("fp8_linear_rowmax", example=_linear_rowmax_example,
          fake=lambda x, parts, weight, *args: x.new_empty(*x.shape[:-1], weight.shape[0], dtype=args[-1]))


def _linear_quantized_example(t, static):
    """fp8_linear's example calls with their activations quantized in the weight's layout."""
    calls = []
    for x, q, scale, bias, block in _linear_example(t, static):
        calls.append((*quantize_activations(x, block, q.dtype), q, scale, bias, block, x.dtype))
    return calls


define_op("fp8_linear_quantized", example=_linear_quantized_example,
          fake=lambda q, scale, weight, *args: q.new_empty(*q.shape[:-1], weight.shape[0], dtype=args[-1]))


# The quantization references read their divisor from the host: not capturable (the Triton kernels are).
@register("rms_norm_quant_fp8", "torch", cuda_graph=False)
def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None,
                       fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(rms_norm(x)) -> (q fp8, scales float32)."""
    return quantize_as_consumer(rms_norm(x, weight, eps), group_size, fp8_dtype)


@register("fused_add_rms_norm_quant_fp8", "torch", cuda_graph=False)
def fused_add_rms_norm_quant_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None,
    fp8_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (q, scales) of rms_norm(residual), and residual."""
    y, residual = fused_add_rms_norm(x, residual, weight, eps)
    return (*quantize_as_consumer(y, group_size, fp8_dtype), residual)


@register("silu_and_mul_quant_fp8", "torch", cuda_graph=False)
def silu_and_mul_quant_fp8(x: torch.Tensor, group_size: int | None,
                           fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(silu(gate) * up) for x [..., 2d] = (gate | up) -> (q [..., d] fp8, scales float32)."""
    return quantize_as_consumer(silu_and_mul(x), group_size, fp8_dtype)


def _chunk_maxima(y: torch.Tensor) -> torch.Tensor:
    """max |y| over each ROWMAX_CHUNK columns of every row, float32 [..., rowmax_parts(d)]."""
    d = y.shape[-1]
    parts = rowmax_parts(d)
    padded = F.pad(y.float().abs(), (0, parts * ROWMAX_CHUNK - d))
    return padded.view(*y.shape[:-1], parts, ROWMAX_CHUNK).amax(-1)


@register("silu_and_mul_rowmax", "torch", cuda_graph=False)
def silu_and_mul_rowmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up for x [..., 2d] = (gate | up), and the absolute maximum of each ROWMAX_CHUNK columns of it
    (float32 [..., rowmax_parts(d)]; their max is the row's, the per-token scale's amax)."""
    y = silu_and_mul(x)
    return y, _chunk_maxima(y)


def check_rowmax_input(x: torch.Tensor, parts: torch.Tensor, weight: torch.Tensor) -> None:
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"fp8_linear_rowmax: input has {x.shape[-1]} features, the weight {tuple(weight.shape)} "
                         f"expects {weight.shape[-1]}")
    if parts.dim() != x.dim() or tuple(parts.shape[:-1]) != tuple(x.shape[:-1]) or parts.dtype != torch.float32 \
            or parts.shape[-1] < 1:
        raise ValueError(f"fp8_linear_rowmax: row maxima {tuple(parts.shape)} {parts.dtype}, expected "
                         f"{(*x.shape[:-1], 'parts')} float32")


@register("fp8_linear_rowmax", "torch", cuda_graph=False)
def fp8_linear_rowmax(x: torch.Tensor, parts: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_linear with per-token activation scales (per-channel / per-tensor weights) on float activations x whose
    rows' absolute maxima are max(parts, -1): the codes and scales fp8_quant_token would give x, then the GEMM."""
    check_rowmax_input(x, parts, weight)
    scale = _scale_of(parts.amax(-1, keepdim=True), weight.dtype)
    return fp8_linear_quantized(_to_fp8(x.float() / scale, weight.dtype), scale, weight, weight_scale, bias, None,
                                out_dtype)


def check_quantized_input(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, block_size) -> None:
    """Shape / dtype checks of pre-quantized activations against the FP8 weight they meet."""
    if q.dtype != weight.dtype:
        raise ValueError(f"fp8_linear_quantized: activations are {q.dtype}, the weight is {weight.dtype}")
    if q.shape[-1] != weight.shape[-1]:
        raise ValueError(f"fp8_linear_quantized: input has {q.shape[-1]} features, the weight "
                         f"{tuple(weight.shape)} expects {weight.shape[-1]}")
    groups = 1 if block_size is None else -(-q.shape[-1] // int(block_size[1]))
    if tuple(scale.shape) != (*q.shape[:-1], groups) or scale.dtype != torch.float32:
        raise ValueError(f"fp8_linear_quantized: activation scales {tuple(scale.shape)} {scale.dtype}, expected "
                         f"{(*q.shape[:-1], groups)} float32")


@register("fp8_linear_quantized", "torch", cuda_graph=False)
def fp8_linear_quantized(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: list[int] | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """fp8_linear on activations already quantized in its layout (1 x bk groups for block weights, per token
    otherwise): y = dequant(q) dequant(W)^T + b in out_dtype, the same arithmetic as fp8_linear."""
    check_quantized_input(q, scale, weight, block_size)
    check_weight_scale(weight_scale, *weight.shape, block_size, "fp8_linear_quantized weight")
    x_hat = dequantize_activations(q, scale, None if block_size is None else int(block_size[1]))
    y = F.linear(x_hat, dequantize_weight(weight, weight_scale, block_size))
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
