"""Tensor/expert-parallel group handles.

atom-core asks this module for the TP group; atom-server installs its own, plugins hand over the host's
(any object with `rank`, `world_size`, `all_reduce(t)` and `all_gather(t, dim)`). The default is a
single-process group, so models run unchanged with TP=1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SingleProcessGroup:
    rank: int = 0
    world_size: int = 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return t


class TorchDistGroup:
    """A TP group over torch.distributed (used by atom-server for TP > 1)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


_tp_group = SingleProcessGroup()


def set_tp_group(group) -> None:
    global _tp_group
    _tp_group = group


def get_tp_group():
    return _tp_group
