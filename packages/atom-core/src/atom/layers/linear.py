"""Tensor-parallel linear layers.

Column-parallel layers split the output features across TP ranks, row-parallel layers split the input
features and all-reduce the result. Merged layers (QKV, gate-up) hold several checkpoint tensors
("shards") in one parameter.

What a layer stores and how it multiplies is its quantization method's (atom.quantization): the method
creates the parameters, `apply` is the forward, and `process_weights_after_loading` runs once after
loading. Every parameter carries `weight_loader(param, tensor, shard_id=None)`, which copies this rank's
slice of a checkpoint tensor into place, guided by attributes the method set on the parameter:
  output_dim    dim that runs along output features: split across column-parallel ranks, and where
                merged shards are stacked (None: not split by output)
  input_dim     dim that runs along input features: split across row-parallel ranks
  output_block / input_block
                features per element along that dim (1 for weights; 128 for 128x128 block scales);
                merged shards are stacked block by block (shard i at sum_{j<i} ceil(N_j / block))
  per_shard     dim 0 has one entry per merged shard (per-tensor scales): shard s loads into [s], whole
Unmarked parameters (a scalar input scale) are copied whole.
"""

from __future__ import annotations

import torch
from torch import nn

from atom.distributed import get_tp_group
from atom.layers.fp8_input import SplitKPartials
from atom.quantization import QuantizationConfig, linear_method_for, set_weight_attrs


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


def _in_blocks(offset: int, size: int, ranks: int, block: int, name: str,
               preceding: list[int] | None = None) -> tuple[int, int, int]:
    """(offset, size, full checkpoint size) in elements of a dim holding `block` features per element.

    preceding: the sizes of the merged shards stored before this one. Each checkpoint shard is its own
    tensor with its own (possibly partial) edge block, so shard i starts at sum_{j<i} ceil(N_j / block)
    and the shards need not be multiples of the block; a rank's slice of a shard must be whole blocks."""
    if block == 1:
        return offset, size, size * ranks
    if (preceding is None and offset % block) or (ranks > 1 and size % block):
        raise ValueError(f"{name}: a slice of {size} features at offset {offset} (over {ranks} ranks) does not "
                         f"fall on the quantization block of {block}")
    start = offset // block if preceding is None else sum(-(-s // block) for s in preceding)
    return start, -(-size // block), -(-size * ranks // block)


def load_sharded(param: nn.Parameter, loaded: torch.Tensor, name: str, index: int, axis: str, offset: int,
                 size: int, rank: int, ranks: int, preceding: list[int] | None = None) -> None:
    """Copy this rank's slice of `loaded` into `param`. The slice runs along the param's `axis`_dim
    ("output" or "input"): rank `rank` of `ranks` takes `size` features, placed at `offset` (for
    block-scale params, after the blocks of the `preceding` merged shards' sizes). A per-shard param takes
    `loaded` whole at entry `index`."""
    target = param.data
    if getattr(param, "per_shard", False):
        target = target[index]
    elif (dim := getattr(param, f"{axis}_dim", None)) is not None:
        off, n, full = _in_blocks(offset, size, ranks, getattr(param, f"{axis}_block", 1), name, preceding)
        _check_full_dim(loaded, dim, full, name)
        loaded = loaded.narrow(dim, rank * n, n)
        target = target.narrow(dim, off, n)
    _check_shape(target, loaded, name)
    target.copy_(loaded)


class LinearBase(nn.Module):
    """in_features / out_features are this rank's (subclasses divide the full sizes)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None, *, quant_config: QuantizationConfig | None = None,
                 prefix: str = ""):
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        self.input_size, self.output_size = in_features, out_features
        self.prefix = prefix
        dtype = params_dtype or torch.get_default_dtype()
        self.params_dtype = dtype
        self.quant_method = linear_method_for(quant_config, self, prefix)
        self.quant_method.create_weights(self, in_features, self.output_partition_sizes(), dtype)
        self._leaves_splits = False  # leave_splits
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            set_weight_attrs(self.bias, weight_loader=self.weight_loader, output_dim=0)
        else:
            self.register_parameter("bias", None)

    def output_partition_sizes(self) -> list[int]:
        """This rank's output features of each merged shard."""
        return [self.output_size]

    def shard(self, shard_id) -> tuple[int, int, int, int, int]:
        """Where checkpoint shard `shard_id` goes: (index, offset, size) of this rank's output features,
        and (rank, ranks): which of the checkpoint's equal slices this rank takes."""
        return 0, 0, self.output_size, 0, 1

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        name = type(self).__name__ + (f"[{shard_id}]" if shard_id is not None else "")
        index, offset, size, rank, ranks = self.shard(shard_id)
        load_sharded(param, loaded, name, index, "output", offset, size, rank, ranks,
                     self.output_partition_sizes()[:index])

    def leave_splits(self, consumer: str) -> bool:
        """Hand this linear's split-K partials to its consumer from now on (SplitKPartials; atom.layers.fp8_input),
        where the quantization method can for that consumer ("norm" or "attention": the Triton FP8 GEMM with the
        consumer's switch on) and there is no bias. Returns whether it will."""
        can = getattr(self.quant_method, "defers_split", None)
        self._leaves_splits = self.bias is None and can is not None and can(consumer)
        return self._leaves_splits

    def _apply_leaving_splits(self, x):
        parts: list[torch.Tensor] = []
        y = self.quant_method.apply(self, x, None, split_parts=parts)
        return SplitKPartials(parts[0], y) if parts else y

    def forward(self, x: torch.Tensor) -> torch.Tensor | SplitKPartials:
        if self._leaves_splits and not torch.compiler.is_compiling():  # no bias: leave_splits
            return self._apply_leaving_splits(x)
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    pass


class MergedReplicatedLinear(LinearBase):
    """Several replicated outputs stacked in one parameter (DeepSeek's q_a_proj | kv_a_proj_with_mqa: one GEMM
    instead of two); shard_id is the index. Every rank holds them whole."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, params_dtype=None, *,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, params_dtype, quant_config=quant_config,
                         prefix=prefix)

    def output_partition_sizes(self) -> list[int]:
        return list(self.output_sizes)

    def shard(self, shard_id) -> tuple[int, int, int, int, int]:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"MergedReplicatedLinear: unknown shard {shard_id!r} (expected 0..{len(self.output_sizes) - 1})")
        return shard_id, sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id], 0, 1


class ColumnParallelLinear(LinearBase):
    """y = x A^T with A's rows (output features) split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, params_dtype=None, *,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        tp_size = get_tp_group().world_size
        self.out_features_total = out_features
        super().__init__(in_features, _divide(out_features, tp_size, "output features"), bias, params_dtype,
                         quant_config=quant_config, prefix=prefix)

    def shard(self, shard_id) -> tuple[int, int, int, int, int]:
        return 0, 0, self.output_size, self.tp_rank, self.tp_size


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked (e.g. gate_proj|up_proj); shard_id is the index."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, params_dtype=None, *,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, params_dtype, quant_config=quant_config,
                         prefix=prefix)

    def output_partition_sizes(self) -> list[int]:
        return [s // self.tp_size for s in self.output_sizes]

    def shard(self, shard_id) -> tuple[int, int, int, int, int]:
        sizes = self.output_partition_sizes()
        return shard_id, sum(sizes[:shard_id]), sizes[shard_id], self.tp_rank, self.tp_size


class QKVParallelLinear(ColumnParallelLinear):
    """q|k|v projections in one matmul. KV heads are replicated when there are fewer than TP ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 params_dtype=None, *, quant_config: QuantizationConfig | None = None, prefix: str = ""):
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
        super().__init__(hidden_size, out_total, bias, params_dtype, quant_config=quant_config, prefix=prefix)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def output_partition_sizes(self) -> list[int]:
        return [self.q_size, self.kv_size, self.kv_size]

    def shard(self, shard_id) -> tuple[int, int, int, int, int]:
        if shard_id == "q":
            return 0, 0, self.q_size, self.tp_rank, self.tp_size
        if shard_id not in ("k", "v"):
            raise ValueError(f"QKVParallelLinear: unknown shard {shard_id!r} (expected q, k or v)")
        index = 1 if shard_id == "k" else 2
        return (index, self.q_size + (index - 1) * self.kv_size, self.kv_size, self.tp_rank // self.kv_replicas,
                self.tp_size // self.kv_replicas)


class RowParallelLinear(LinearBase):
    """y = x A^T with A's columns (input features) split across ranks; the partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce_results: bool = True,
                 params_dtype=None, *, quant_config: QuantizationConfig | None = None, prefix: str = ""):
        tp_size = get_tp_group().world_size
        super().__init__(_divide(in_features, tp_size, "input features"), out_features, bias, params_dtype,
                         quant_config=quant_config, prefix=prefix)
        self.reduce_results = reduce_results

    def sum_splits_in(self, norm: nn.Module) -> None:
        """This linear's output goes to `norm` alone, as the x of norm(x, residual) (decoder.py): where its GEMM
        splits over K, hand the float32 partials over (SplitKPartials) for the norm's kernel to add
        (atom.layers.fp8_input). Only where leave_splits("norm") can, on one rank (no all-reduce), and the norm
        adds them (`norm.takes_split_parts`)."""
        if self.tp_size == 1 and norm.takes_split_parts():
            self.leave_splits("norm")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        # Split along input features only: the bias (output_dim only) is whole on every rank.
        load_sharded(param, loaded, type(self).__name__, 0, "input", 0, self.input_size, self.tp_rank, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor | SplitKPartials:
        if self._leaves_splits and not torch.compiler.is_compiling():  # one rank, no bias (sum_splits_in)
            return self._apply_leaving_splits(x)
        # Bias is added once, after the reduction.
        y = self.quant_method.apply(self, x, None)
        if self.tp_size > 1 and self.reduce_results:
            y = get_tp_group().all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
