"""Fused mixture-of-experts layer: router -> top-k -> experts, sharded over the TP ranks.

Two ways to shard (chosen when the layer is built, from atom.distributed):
  tensor parallel (default)  every rank holds every expert, sliced along the intermediate size I; each rank's
                             partial sums are all-reduced.
  expert parallel            (get_ep_group() is not None: vLLM's --enable-expert-parallel) each rank holds
                             E / ranks whole experts, a contiguous range. Every rank already holds every
                             token (attention is tensor parallel), so no dispatch is needed: a rank runs the
                             (token, k) pairs routed to its own experts, the others get id -1 (skipped by the
                             expert kernels), and the same all-reduce sums the ranks' partial outputs. Static
                             shapes, no token counts exchanged: CUDA graphs capture it as they capture TP.
                             An all-to-all dispatch would only pay with data-parallel attention (tokens not
                             replicated), which atom-server does not have.

The experts' parameters are the quantization method's (atom.quantization): unquantized, w13 [E, 2*I/tp, H]
(gate then up) and w2 [E, H, I/tp] (E: this rank's experts; tp is 1 under expert parallelism); a scheme adds
its own (named w13_<suffix> / w2_<suffix> after the checkpoint suffix, e.g. w13_weight_scale). Checkpoints
name experts one by one; `weight_loader(param, tensor, shard_id, expert_id)` places each ("w1" gate, "w3" up,
"w2" down, or "w13" gate|up already fused; another rank's expert is skipped), guided by the parameter's
attributes, read within one expert's slice:
  output_dim    (w13 params) dim running along the 2*I gate|up rows; input_dim (w2 params) along I
  output_block / input_block, per_shard
                as for linear layers (atom.layers.linear); a per-shard w13 param has [E, 2] entries
"""

from __future__ import annotations

import torch
from torch import nn

from atom.distributed import get_ep_group, get_tp_group
from atom.layers.linear import _check_full_dim, _check_shape, _in_blocks
from atom.ops.registry import resolve
from atom.quantization import QuantizationConfig, moe_method_for

_SHARDS = ("w1", "w3", "w2", "w13")


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, activation: str = "silu", reduce_results: bool = True,
                 params_dtype: torch.dtype | None = None, *, quant_config: QuantizationConfig | None = None,
                 prefix: str = ""):
        super().__init__()
        tp, ep = get_tp_group(), get_ep_group()
        # tp_rank / tp_size: how each expert's intermediate size is sliced (not at all under expert parallelism)
        if ep is not None:
            self.ep_rank, self.ep_size = ep.rank, ep.world_size
            self.tp_rank, self.tp_size = 0, 1
            if num_experts % self.ep_size:
                raise ValueError(f"{prefix or 'MoE layer'}: num_experts={num_experts} is not divisible by "
                                 f"tensor_parallel_size={self.ep_size} (expert parallelism gives every rank "
                                 "the same number of whole experts)")
        else:
            self.ep_rank, self.ep_size = 0, 1
            self.tp_rank, self.tp_size = tp.rank, tp.world_size
            if intermediate_size % self.tp_size:
                raise ValueError(f"moe intermediate size {intermediate_size} is not divisible by "
                                 f"tensor_parallel_size={self.tp_size}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.num_local_experts = num_experts // self.ep_size
        self.expert_start = self.ep_rank * self.num_local_experts  # this rank's experts: a contiguous range
        self.hidden_size = hidden_size
        self.activation, self.reduce_results = activation, reduce_results
        self.inter = intermediate_size // self.tp_size
        self.prefix = prefix
        dtype = params_dtype or torch.get_default_dtype()
        self.quant_method = moe_method_for(quant_config, self, prefix)
        if self.ep_size > 1 and not self.quant_method.supports_expert_parallel:
            raise ValueError(f"{prefix or 'MoE layer'}: expert parallelism is not supported by the "
                             f"{type(self.quant_method).__name__} experts yet (their kernels do not skip other "
                             "ranks' experts); run without --enable-expert-parallel")
        self.quant_method.create_weights(self, self.num_local_experts, hidden_size, self.inter, dtype)
        self._topk = resolve("moe_topk_softmax")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} out of range (num_experts={self.num_experts})")
        if shard_id not in _SHARDS:
            raise ValueError(f"unknown expert shard {shard_id!r}")
        local_id = expert_id - self.expert_start
        if not 0 <= local_id < self.num_local_experts:
            return  # another rank's expert (expert parallelism)
        name = f"expert {expert_id} {shard_id}"
        if shard_id == "w13":  # already fused gate|up: load each half as its own shard
            dim = getattr(param, "output_dim", 0)
            rows = 2 * _in_blocks(0, self.inter, self.tp_size, getattr(param, "output_block", 1), name)[2]
            if getattr(param, "per_shard", False) or loaded.dim() <= dim or loaded.shape[dim] != rows:
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(loaded.shape)}, expected {rows} "
                                 f"rows in dim {dim}")
            for i, half in enumerate(("w1", "w3")):
                self.weight_loader(param, loaded.narrow(dim, i * rows // 2, rows // 2), half, expert_id)
            return
        target = param.data[local_id]
        axis = "input" if shard_id == "w2" else "output"
        dim = getattr(param, f"{axis}_dim", None)
        if getattr(param, "per_shard", False):
            target = target[1 if shard_id == "w3" else 0]
        elif dim is not None:
            _, n, full = _in_blocks(0, self.inter, self.tp_size, getattr(param, f"{axis}_block", 1), name)
            _check_full_dim(loaded, dim, full, name)
            loaded = loaded.narrow(dim, self.tp_rank * n, n)
            target = target.narrow(dim, n if shard_id == "w3" else 0, n)
        _check_shape(target, loaded, name)
        target.copy_(loaded)

    def select_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32 [T, k], expert ids [T, k]) for each token."""
        return self._topk(router_logits, self.top_k, self.renormalize)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(x, *self.select_experts(router_logits))

    def forward_routed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts with routing already decided (models with their own router, e.g. DeepSeek's grouped
        top-k): topk_weights float32 [T, k], topk_ids int64 [T, k] (global expert ids)."""
        if self.ep_size > 1:
            topk_ids = self.local_expert_ids(topk_ids)
        out = self.quant_method.apply(self, x, topk_weights, topk_ids)
        if self.reduce_results and (self.tp_size > 1 or self.ep_size > 1):
            out = get_tp_group().all_reduce(out)
        return out

    def local_expert_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> this rank's (0 .. num_local_experts - 1), -1 for another rank's expert."""
        local = topk_ids - self.expert_start
        return torch.where((local >= 0) & (local < self.num_local_experts), local, -1)
