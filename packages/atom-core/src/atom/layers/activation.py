"""Gated activation modules."""

from __future__ import annotations

import torch
from torch import nn

from atom.layers.fp8_input import (
    Fp8Activation,
    Fp8ConsumerLink,
    Fp8RowMaxActivation,
    SplitKPartials,
    link_fp8_consumer,
)
from atom.ops.registry import impl_of, resolve

_GATED = {"silu": "silu_and_mul", "swish": "silu_and_mul", "gelu_pytorch_tanh": "gelu_tanh_and_mul",
          "gelu_tanh": "gelu_tanh_and_mul"}
# gated op -> its form that emits FP8 codes + scales (atom.ops.fp8_producers)
_FP8_FORM = {"silu_and_mul": "silu_and_mul_quant_fp8"}
# ... and its form that returns the float output with partial row maxima (per-token layouts at a few rows)
_ROWMAX_FORM = {"silu_and_mul": "silu_and_mul_rowmax"}


def gated_op_name(hidden_act: str) -> str:
    if hidden_act not in _GATED:
        raise ValueError(f"unsupported hidden_act {hidden_act!r}; supported: {', '.join(sorted(_GATED))}")
    return _GATED[hidden_act]


class GatedActivation(nn.Module):
    def __init__(self, hidden_act: str):
        super().__init__()
        self._name = gated_op_name(hidden_act)
        self._op = resolve(self._name)
        self._fp8: Fp8ConsumerLink | None = None

    def feed_fp8_linear(self, linear: nn.Module) -> None:
        """This activation's output goes to `linear` alone: hand it FP8 activations when it is an FP8 linear
        that takes them (see atom.layers.fp8_input)."""
        if self._name in _FP8_FORM:
            self._fp8 = link_fp8_consumer(self._op, (_FP8_FORM[self._name],), linear, _ROWMAX_FORM.get(self._name))

    def takes_split_parts(self) -> bool:
        """Whether forward adds a SplitKPartials x itself: the op runs its Triton kernel, which has the partials
        form (activation.gated_from_split_parts)."""
        impl = impl_of(self._op)
        return impl is not None and impl.backend == "triton"

    def forward(self, x: torch.Tensor | SplitKPartials):
        """act(gate) * up of x = (gate | up); an Fp8Activation / Fp8RowMaxActivation where the linear this feeds
        takes one. x may be a SplitKPartials (the gate_up GEMM's split-K partials, DenseMLP): the float and rowmax
        forms add them in their kernel; the FP8 codes form has the sum kernel add them first."""
        parts = None
        if isinstance(x, SplitKPartials):
            parts, x = x, x.out
        fmt = self._fp8.format_for(x) if self._fp8 is not None else None
        if fmt is not None:
            if self._fp8.takes_rowmax(x, fmt):
                if parts is not None:
                    return Fp8RowMaxActivation(*self._from_parts(parts, rowmax=True))
                return Fp8RowMaxActivation(*self._fp8.rowmax_op(x))
            if parts is not None:
                x = parts.summed()
            return Fp8Activation(*self._fp8.ops[0](x, fmt.group_size, fmt.fp8_dtype), x.dtype)
        if parts is not None:
            return self._from_parts(parts)
        return self._op(x)

    def _from_parts(self, parts: SplitKPartials, rowmax: bool = False):
        from atom.ops.triton_kernels.activation import gated_from_split_parts

        return gated_from_split_parts(self._name, parts.parts, parts.out, rowmax=rowmax)
