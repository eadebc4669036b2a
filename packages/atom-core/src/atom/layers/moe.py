"""Fused mixture-of-experts layer: router -> top-k -> experts, TP-sharded over the intermediate size.

Parameters: w13 [E, 2*I/tp, H] (gate then up), w2 [E, H, I/tp]. Checkpoints name experts one by one;
`weight_loader(param, tensor, shard_id, expert_id)` places each ("w1" gate, "w3" up, "w2" down).
"""

from __future__ import annotations

import torch
from torch import nn

from atom.distributed import get_tp_group
from atom.ops.registry import resolve


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, activation: str = "silu", reduce_results: bool = True,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        if intermediate_size % self.tp_size:
            raise ValueError(f"moe intermediate size {intermediate_size} is not divisible by TP {self.tp_size}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.activation, self.reduce_results = activation, reduce_results
        self.inter = intermediate_size // self.tp_size
        dtype = params_dtype or torch.get_default_dtype()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden_size, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter, dtype=dtype), requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader
        self._topk = resolve("moe_topk_softmax")
        self._experts = resolve("fused_experts")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} out of range (num_experts={self.num_experts})")
        full_inter = self.inter * self.tp_size
        if shard_id in ("w1", "w3", "w2") and loaded.shape[0 if shard_id != "w2" else 1] != full_inter:
            raise ValueError(f"shape mismatch for expert {expert_id} {shard_id}: checkpoint {tuple(loaded.shape)}, "
                             f"expected intermediate size {full_inter}")
        if shard_id == "w13" and loaded.shape[0] != 2 * full_inter:
            raise ValueError(f"shape mismatch for expert {expert_id} w13: checkpoint {tuple(loaded.shape)}, "
                             f"expected {2 * full_inter} rows")
        if shard_id in ("w1", "w3"):
            loaded = loaded.narrow(0, self.tp_rank * self.inter, self.inter)
            target = param.data[expert_id].narrow(0, 0 if shard_id == "w1" else self.inter, self.inter)
        elif shard_id == "w13":  # already fused gate|up, [2*I, H]
            full = loaded.shape[0] // 2
            gate = loaded[:full].narrow(0, self.tp_rank * self.inter, self.inter)
            up = loaded[full:].narrow(0, self.tp_rank * self.inter, self.inter)
            loaded, target = torch.cat((gate, up)), param.data[expert_id]
        elif shard_id == "w2":
            loaded = loaded.narrow(1, self.tp_rank * self.inter, self.inter)
            target = param.data[expert_id]
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(f"shape mismatch for expert {expert_id} {shard_id}: checkpoint "
                             f"{tuple(loaded.shape)}, model {tuple(target.shape)}")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = self._topk(router_logits, self.top_k, self.renormalize)
        out = self._experts(x, self.w13, self.w2, weights, ids, self.activation)
        if self.tp_size > 1 and self.reduce_results:
            out = get_tp_group().all_reduce(out)
        return out

    def forward_routed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts with routing already decided (models with their own router, e.g. DeepSeek's grouped
        top-k): topk_weights float32 [T, k], topk_ids int64 [T, k]."""
        out = self._experts(x, self.w13, self.w2, topk_weights, topk_ids, self.activation)
        if self.tp_size > 1 and self.reduce_results:
            out = get_tp_group().all_reduce(out)
        return out
