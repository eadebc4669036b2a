"""Hand SGLang's tensor-parallel group to atom-core (atom.distributed.set_tp_group)."""

from __future__ import annotations

import torch

from atom.distributed import SingleProcessGroup, set_tp_group


class SGLangTPGroup:
    """atom's group protocol (rank, world_size, all_reduce, all_gather) over SGLang's GroupCoordinator."""

    def __init__(self, coordinator):
        self._group = coordinator
        self.rank = coordinator.rank_in_group
        self.world_size = coordinator.world_size

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self._group.all_reduce(t)

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self._group.all_gather(t, dim=dim)


def _sglang_tp_coordinator():
    """SGLang's TP GroupCoordinator, or None when SGLang has not set up its parallel state (unit tests)."""
    try:
        from sglang.srt.distributed import parallel_state
    except ImportError:  # pragma: no cover - sglang missing
        return None
    if hasattr(parallel_state, "model_parallel_is_initialized") and not parallel_state.model_parallel_is_initialized():
        return None
    try:
        return parallel_state.get_tp_group()
    except (AssertionError, AttributeError, RuntimeError):
        return None


def adopt_sglang_tp_group() -> int:
    """Install SGLang's TP group as atom's; returns the TP world size."""
    coordinator = _sglang_tp_coordinator()
    if coordinator is None or coordinator.world_size == 1:
        set_tp_group(SingleProcessGroup())
        return 1
    set_tp_group(SGLangTPGroup(coordinator))
    return coordinator.world_size
