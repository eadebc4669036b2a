"""RMSNorm, alone and fused with the residual add. Computed in float32, returned in the input dtype."""

from __future__ import annotations

import torch

from atom.ops.registry import define_op, register


def norm_out_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The dtype ATOM's norm kernels return for x_dtype input and a w_dtype weight: x's, or the weight's where that
    is wider (the layers that hand a norm's output on in another form, FP8 codes or split partials, report it).
    Plain dtype logic, not torch.result_type: torch.compile (vLLM's Dynamo) cannot trace an op that returns a
    dtype."""
    return w_dtype if w_dtype.itemsize > x_dtype.itemsize else x_dtype


def _hidden(static) -> int:
    return int(static.get("hidden_size", 256))


define_op("rms_norm", example=lambda t, static: (
    t.randn(7, _hidden(static)), 1 + t.randn(_hidden(static), scale=0.1), 1e-6))
define_op("fused_add_rms_norm", example=lambda t, static: (
    t.randn(7, _hidden(static)), t.randn(7, _hidden(static)), 1 + t.randn(_hidden(static), scale=0.1), 1e-6))


@register("rms_norm", "torch")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@register("fused_add_rms_norm", "torch")
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rms_norm(residual), residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual
