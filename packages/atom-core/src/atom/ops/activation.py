"""Gated activations: input [..., 2*d] = (gate | up), output [..., d]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atom.ops.registry import define_op, register

for _name in ("silu_and_mul", "gelu_tanh_and_mul"):
    define_op(_name, example=lambda t, static: (t.randn(7, 2 * int(static.get("intermediate_size", 256))),))


@register("silu_and_mul", "torch")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@register("gelu_tanh_and_mul", "torch")
def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
