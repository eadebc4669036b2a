"""Gated activation modules."""

from __future__ import annotations

import torch
from torch import nn

from atom.layers.fp8_input import Fp8Activation, Fp8ConsumerLink, Fp8RowMaxActivation, link_fp8_consumer
from atom.ops.registry import resolve

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

    def forward(self, x: torch.Tensor):
        fmt = self._fp8.format_for(x) if self._fp8 is not None else None
        if fmt is not None:
            if self._fp8.takes_rowmax(x, fmt):
                return Fp8RowMaxActivation(*self._fp8.rowmax_op(x))
            return Fp8Activation(*self._fp8.ops[0](x, fmt.group_size, fmt.fp8_dtype), x.dtype)
        return self._op(x)
