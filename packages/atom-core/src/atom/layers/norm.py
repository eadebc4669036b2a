"""RMSNorm module over the rms_norm / fused_add_rms_norm ops (and their FP8-emitting forms, atom.layers.fp8_input)."""

from __future__ import annotations

import torch
from torch import nn

from atom.layers.fp8_input import Fp8Activation, Fp8ConsumerLink, SplitKPartials, link_fp8_consumer
from atom.ops.norm import norm_out_dtype
from atom.ops.registry import impl_of, resolve


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)
        self._norm = resolve("rms_norm")
        self._add_norm = resolve("fused_add_rms_norm")
        self._fp8: Fp8ConsumerLink | None = None

    def feed_fp8_linear(self, linear: nn.Module) -> None:
        """This norm's output goes to `linear` alone: hand it FP8 activations when it is an FP8 linear that
        takes them (see atom.layers.fp8_input)."""
        self._fp8 = link_fp8_consumer(self._norm, ("rms_norm_quant_fp8", "fused_add_rms_norm_quant_fp8"), linear)

    def takes_split_parts(self) -> bool:
        """Whether forward adds a SplitKPartials x itself: its fused add runs the Triton kernel (which has the
        partials form; atom.layers.fp8_input)."""
        impl = impl_of(self._add_norm)
        return impl is not None and impl.backend == "triton"

    def forward(self, x: torch.Tensor | SplitKPartials, residual: torch.Tensor | None = None):
        """norm(x), or (norm(x + residual), x + residual) when a residual is given; norm(...) is an
        Fp8Activation when the linear this norm feeds takes one. x may be a SplitKPartials (with a residual):
        the split-K GEMM's partials, added by the norm's kernel."""
        if isinstance(x, SplitKPartials):
            return self._forward_parts(x.parts, residual)
        fmt = self._fp8.format_for(x) if self._fp8 is not None else None
        if fmt is not None:
            w, dtype = self.weight, self._out_dtype(x.dtype)
            if residual is None:
                q, s = self._fp8.ops[0](x, w, self.eps, fmt.group_size, fmt.fp8_dtype)
                return Fp8Activation(q, s, dtype)
            q, s, residual = self._fp8.ops[1](x, residual, w, self.eps, fmt.group_size, fmt.fp8_dtype)
            return Fp8Activation(q, s, dtype), residual
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._add_norm(x, residual, self.weight, self.eps)

    def _forward_parts(self, parts: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            raise ValueError("RMSNorm: split-K partials come with a residual (norm(x + residual))")
        from atom.ops.triton_kernels.fp8_producers import fused_add_rms_norm_quant_fp8_parts
        from atom.ops.triton_kernels.norm import fused_add_rms_norm_parts

        fmt = self._fp8.format_for(residual) if self._fp8 is not None else None
        if fmt is None:
            return fused_add_rms_norm_parts(parts, residual, self.weight, self.eps)
        q, s, residual = fused_add_rms_norm_quant_fp8_parts(parts, residual, self.weight, self.eps, fmt.group_size,
                                                            fmt.fp8_dtype)
        return Fp8Activation(q, s, self._out_dtype(residual.dtype)), residual

    def _out_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        """The float norm's output dtype for x_dtype input (atom.ops.norm.norm_out_dtype)."""
        return norm_out_dtype(x_dtype, self.weight.dtype)
