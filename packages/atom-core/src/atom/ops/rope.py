"""Rotary position embedding applied in place of q and k.

`cos_sin` is [num_positions, rot_dim] = cat(cos, sin) over rot_dim/2 frequencies, already multiplied
by the scaling type's attention factor (see atom.layers.rotary). Neox style rotates the two halves of
each head; GPT-J style rotates interleaved pairs. Only the first rot_dim channels of a head rotate.
"""

from __future__ import annotations

import torch

from atom.ops.registry import define_op, register


def rope_example(t, static: dict, num_tokens: int = 6, num_positions: int = 64):
    """(positions, cos_sin) for a self-check: a table of random angles (any angles test the rotation)."""
    head_dim = int(static.get("head_dim", 128))
    rot = int(static.get("rotary_dim", head_dim))
    theta = t.randn(num_positions, rot // 2, dtype=torch.float32, scale=3.0)
    cos_sin = torch.cat((theta.cos(), theta.sin()), dim=-1)
    positions = t.randperm(num_positions)[:num_tokens]
    return positions, cos_sin


def _example(t, static):
    head_dim = int(static.get("head_dim", 128))
    positions, cos_sin = rope_example(t, static)
    n = positions.shape[0]
    return (positions, t.randn(n, 4 * head_dim), t.randn(n, 2 * head_dim), head_dim, cos_sin,
            bool(static.get("is_neox", True)))


define_op("rotary_embedding", example=_example)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    # x: [T, H, rot_dim]; cos/sin: [T, 1, rot_dim/2]
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


@register("rotary_embedding", "torch")
def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    head_dim: int,
    cos_sin: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq*head_dim], k: [T, Hk*head_dim] -> rotated copies of the same shapes."""
    rot_dim = cos_sin.shape[-1]
    cos, sin = cos_sin[positions].float().unsqueeze(1).chunk(2, dim=-1)
    out = []
    for x in (q, k):
        shape = x.shape
        x = x.view(shape[0], -1, head_dim)
        rot = _rotate(x[..., :rot_dim].float(), cos, sin, is_neox).to(x.dtype)
        x = torch.cat((rot, x[..., rot_dim:]), dim=-1) if rot_dim < head_dim else rot
        out.append(x.reshape(shape))
    return out[0], out[1]
