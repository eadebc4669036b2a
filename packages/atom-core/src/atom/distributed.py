"""Tensor/expert-parallel group handles.

atom-core asks this module for the TP group; hosts install theirs before building a model (any object with
`rank`, `world_size`, `all_reduce(t)` and `all_gather(t, dim)`): atom-vllm and atom-sglang hand over the
host's group, atom-server's tensor-parallel ranks install `TorchDistGroup`. The default is a single-process
group, so models run unchanged with TP=1.

Expert parallelism (`set_expert_parallel(True)`, vLLM's --enable-expert-parallel) shards MoE layers by
whole experts over the TP group instead of slicing every expert's intermediate size; FusedMoE reads it
when it is built (`get_ep_group()`), so every MoE model inherits it.
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
    torch.distributed themselves: atom-server's tensor-parallel ranks (gloo on CPU, NCCL on GPUs) and
    tests/test_tensor_parallel.py. Both collectives write into one tensor, so CUDA graphs capture them."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # torch >= 2.13 renames all_gather_into_tensor (the GPU image's torch 2.11 has only the old name)
        self._gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        t = t.contiguous()
        out = torch.empty((self.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        self._gather_into(out, t, group=self.group)  # the ranks' tensors stacked along dim 0
        dim = dim % t.dim()
        if dim == 0:
            return out
        # [ranks, ..., d, ...] -> [..., ranks * d, ...]
        out = out.view(self.world_size, *t.shape)
        return out.movedim(0, dim).reshape(*t.shape[:dim], -1, *t.shape[dim + 1:])

    def all_reduce_min(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. the KV blocks each rank's memory allows)."""
        backend = self._dist.get_backend(self.group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.int64, device=device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


_tp_group = SingleProcessGroup()
_expert_parallel = False


def set_tp_group(group) -> None:
    global _tp_group
    _tp_group = group


def get_tp_group():
    return _tp_group


def set_expert_parallel(enabled: bool) -> None:
    """Shard MoE layers built from now on by whole experts over the TP group (no effect at TP=1)."""
    global _expert_parallel
    _expert_parallel = bool(enabled)


def expert_parallel_enabled() -> bool:
    return _expert_parallel


def get_ep_group():
    """The group MoE experts are sharded over: the TP group when expert parallelism is on and TP > 1,
    else None (experts are sliced along their intermediate size over the TP ranks)."""
    if _expert_parallel and _tp_group.world_size > 1:
        return _tp_group
    return None
