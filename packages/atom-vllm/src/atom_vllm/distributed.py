"""atom.distributed TP group over vLLM's tensor-parallel group (DESIGN.md, seam 2)."""

from __future__ import annotations

import torch


class VllmTPGroup:
    """What atom-core asks of a TP group (rank, world_size, all_reduce, all_gather), served by vLLM."""

    def __init__(self):
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        self.rank = get_tensor_model_parallel_rank()
        self.world_size = get_tensor_model_parallel_world_size()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        from vllm.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce(t)

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        from vllm.distributed import tensor_model_parallel_all_gather

        return tensor_model_parallel_all_gather(t, dim)


def install_tp_group() -> VllmTPGroup:
    """Hand vLLM's TP group to atom-core; must run before the model's layers are built."""
    from atom.distributed import set_tp_group

    group = VllmTPGroup()
    set_tp_group(group)
    return group
