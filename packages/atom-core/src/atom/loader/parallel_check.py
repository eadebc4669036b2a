"""Check that a model can be split over N tensor-parallel ranks before any rank starts.

The layers already refuse what they cannot shard (heads, KV heads unless they can be replicated, MLP and
MoE intermediate sizes, or the expert count under expert parallelism), each naming the config field. Rather
than restate those rules per family, the model is built once on the meta device (no memory, no weights) as
rank 0 of N would build it: the same ValueError comes out of the same layer, before N processes load a
checkpoint to find it out. Every model family, DeepSeek's included, is covered by construction.
"""

from __future__ import annotations

import logging

import torch

from atom.distributed import SingleProcessGroup, expert_parallel_enabled, get_tp_group, set_expert_parallel, set_tp_group
from atom.loader.model_loader import default_dtype, resolve_dtype
from atom.models.registry import model_class_for_config
from atom.quantization import quantization_config_for

logger = logging.getLogger(__name__)


def check_tensor_parallel(config, tensor_parallel_size: int, expert_parallel: bool = False,
                          max_positions: int | None = None, quantization: str | None = None) -> None:
    """Raise ValueError naming what does not divide when the model cannot run at `tensor_parallel_size`.
    Logs (once) when expert parallelism is asked for a model without experts, as vLLM ignores it there."""
    cls = model_class_for_config(config)
    quant_config = quantization_config_for(config, quantization)  # `quantization`: --quantization
    extra = {"quant_config": quant_config} if quant_config is not None else {}
    previous, previous_ep = get_tp_group(), expert_parallel_enabled()
    set_tp_group(SingleProcessGroup(rank=0, world_size=tensor_parallel_size))
    set_expert_parallel(expert_parallel)
    registry_log = logging.getLogger("atom.ops.registry")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # kernel choices for a model that never runs are not news
    try:
        with default_dtype(resolve_dtype(config)), torch.device("meta"):
            try:
                model = cls(config, attn_factory=None, max_positions=max_positions, **extra)
            except ValueError as e:
                raise ValueError(f"{type(config).__name__} cannot run with tensor_parallel_size="
                                 f"{tensor_parallel_size}{' and expert parallelism' if expert_parallel else ''}: "
                                 f"{e}") from e
    finally:
        registry_log.setLevel(level)
        set_tp_group(previous)
        set_expert_parallel(previous_ep)
    from atom.layers.moe import FusedMoE  # here: atom.quantization's fp8 imports atom.loader, before the layers

    if expert_parallel and not any(isinstance(m, FusedMoE) for m in model.modules()):
        logger.warning("--enable-expert-parallel has no effect: %s has no mixture-of-experts layers", cls.__name__)
