"""Tensor/expert-parallel group handles.

atom-core asks this module for the TP group; hosts install theirs before building a model (any object with
`rank`, `world_size`, `all_reduce(t)` and `all_gather(t, dim)`): atom-vllm and atom-sglang hand over the
host's group, a process running its own torch.distributed installs `TorchDistGroup`. The default is a
single-process group, so models run unchanged with TP=1 (atom-server today).
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
    """A TP group over a torch.distributed process group (default: the world), for processes that set up
    torch.distributed themselves. Used by tests/test_tensor_parallel.py (TP=2 on gloo, checked against TP=1);
    atom-server's tensor-parallel workers are to install it (it runs one process today)."""

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
