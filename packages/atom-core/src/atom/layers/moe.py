"""Fused mixture-of-experts layer: router -> top-k -> experts, TP-sharded over the intermediate size.

The experts' parameters are the quantization method's (atom.quantization): unquantized, w13 [E, 2*I/tp, H]
(gate then up) and w2 [E, H, I/tp]; a scheme adds its own (named w13_<suffix> / w2_<suffix> after the
checkpoint suffix, e.g. w13_weight_scale). Checkpoints name experts one by one;
`weight_loader(param, tensor, shard_id, expert_id)` places each ("w1" gate, "w3" up, "w2" down, or "w13"
gate|up already fused), guided by the parameter's attributes, read within one expert's slice:
  output_dim    (w13 params) dim running along the 2*I gate|up rows; input_dim (w2 params) along I
  output_block / input_block, per_shard
                as for linear layers (atom.layers.linear); a per-shard w13 param has [E, 2] entries
"""

from __future__ import annotations

import torch
from torch import nn

from atom.distributed import get_tp_group
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
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        if intermediate_size % self.tp_size:
            raise ValueError(f"moe intermediate size {intermediate_size} is not divisible by TP {self.tp_size}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size = hidden_size
        self.activation, self.reduce_results = activation, reduce_results
        self.inter = intermediate_size // self.tp_size
        self.prefix = prefix
        dtype = params_dtype or torch.get_default_dtype()
        self.quant_method = moe_method_for(quant_config, self, prefix)
        self.quant_method.create_weights(self, num_experts, hidden_size, self.inter, dtype)
        self._topk = resolve("moe_topk_softmax")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} out of range (num_experts={self.num_experts})")
        if shard_id not in _SHARDS:
            raise ValueError(f"unknown expert shard {shard_id!r}")
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
        target = param.data[expert_id]
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
        top-k): topk_weights float32 [T, k], topk_ids int64 [T, k]."""
        out = self.quant_method.apply(self, x, topk_weights, topk_ids)
        if self.tp_size > 1 and self.reduce_results:
            out = get_tp_group().all_reduce(out)
        return out
