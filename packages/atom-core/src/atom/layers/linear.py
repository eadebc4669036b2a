"""Tensor-parallel linear layers.

Column-parallel layers split the output features across TP ranks, row-parallel layers split the input
features and all-reduce the result. Merged layers (QKV, gate-up) hold several checkpoint tensors in one
parameter; each parameter carries a `weight_loader(param, tensor, shard_id=None)` that copies this
rank's slice of a checkpoint tensor into the right place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atom.distributed import get_tp_group


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={d}")
    return n // d


def _check_full_dim(loaded: torch.Tensor, dim: int, expected: int, name: str) -> None:
    # Before narrowing to this rank's slice: a too-large checkpoint tensor would otherwise be cut silently.
    if loaded.dim() <= dim or loaded.shape[dim] != expected:
        raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(loaded.shape)}, expected size {expected} "
                         f"in dim {dim}")


def _check_shape(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(loaded.shape)}, model {tuple(param.shape)}")


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _check_shape(param, loaded, type(self).__name__)
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """y = x A^T with A's rows (output features) split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, params_dtype=None):
        tp_size = get_tp_group().world_size
        self.out_features_total = out_features
        super().__init__(in_features, _divide(out_features, tp_size, "output features"), bias, params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        _check_full_dim(loaded, 0, size * self.tp_size, type(self).__name__)
        loaded = loaded.narrow(0, self.tp_rank * size, size)
        _check_shape(param, loaded, type(self).__name__)
        param.data.copy_(loaded)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked (e.g. gate_proj|up_proj); shard_id is the index."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, params_dtype=None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        sizes = [s // self.tp_size for s in self.output_sizes]
        offset, size = sum(sizes[:shard_id]), sizes[shard_id]
        _check_full_dim(loaded, 0, self.output_sizes[shard_id], f"{type(self).__name__}[{shard_id}]")
        loaded = loaded.narrow(0, self.tp_rank * size, size)
        target = param.data.narrow(0, offset, size)
        _check_shape(target, loaded, f"{type(self).__name__}[{shard_id}]")
        target.copy_(loaded)


class QKVParallelLinear(ColumnParallelLinear):
    """q|k|v projections in one matmul. KV heads are replicated when there are fewer than TP ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 params_dtype=None):
        tp_size = get_tp_group().world_size
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp_size, num_kv_heads, "tensor_parallel_size / num_key_value_heads")
        out_total = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out_total, bias, params_dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, rank = self.kv_size, self.tp_rank // self.kv_replicas
        ranks_with_distinct_shards = self.tp_size // (1 if shard_id == "q" else self.kv_replicas)
        _check_full_dim(loaded, 0, size * ranks_with_distinct_shards, f"QKVParallelLinear[{shard_id}]")
        loaded = loaded.narrow(0, rank * size, size)
        target = param.data.narrow(0, offset, size)
        _check_shape(target, loaded, f"QKVParallelLinear[{shard_id}]")
        target.copy_(loaded)


class RowParallelLinear(LinearBase):
    """y = x A^T with A's columns (input features) split across ranks; the partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce_results: bool = True,
                 params_dtype=None):
        tp_size = get_tp_group().world_size
        super().__init__(_divide(in_features, tp_size, "input features"), out_features, bias, params_dtype)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 2:
            size = param.shape[1]
            _check_full_dim(loaded, 1, size * self.tp_size, type(self).__name__)
            loaded = loaded.narrow(1, self.tp_rank * size, size)
        _check_shape(param, loaded, type(self).__name__)
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bias is added once, after the reduction.
        y = F.linear(x, self.weight)
        if self.tp_size > 1 and self.reduce_results:
            y = get_tp_group().all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
