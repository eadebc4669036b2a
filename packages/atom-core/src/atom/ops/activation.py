"""Gated activations: input [..., 2*d] = (gate | up), output [..., d]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atom.ops.registry import register


@register("silu_and_mul", "torch")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@register("gelu_tanh_and_mul", "torch")
def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
