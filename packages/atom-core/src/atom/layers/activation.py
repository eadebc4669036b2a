"""Gated activation modules."""

from __future__ import annotations

from torch import nn

from atom.ops.registry import resolve

_GATED = {"silu": "silu_and_mul", "swish": "silu_and_mul", "gelu_pytorch_tanh": "gelu_tanh_and_mul",
          "gelu_tanh": "gelu_tanh_and_mul"}


def gated_op_name(hidden_act: str) -> str:
    if hidden_act not in _GATED:
        raise ValueError(f"unsupported hidden_act {hidden_act!r}; supported: {', '.join(sorted(_GATED))}")
    return _GATED[hidden_act]


class GatedActivation(nn.Module):
    def __init__(self, hidden_act: str):
        super().__init__()
        self._op = resolve(gated_op_name(hidden_act))

    def forward(self, x):
        return self._op(x)
