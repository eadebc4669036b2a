"""The unquantized methods: the checkpoint's weights in the model dtype, F.linear and fused_experts."""

from __future__ import annotations

import torch
from torch import nn

from atom.ops import cpu_linear
from atom.ops.dense import dense_linear_for
from atom.ops.registry import impl_of, resolve
from atom.quantization.base import LinearMethod, MoEMethod, new_param


class UnquantizedLinearMethod(LinearMethod):
    """F.linear (atom.ops.cpu_linear's packed weights on CPU), or on a GPU the dense_linear op where it is on
    (atom.ops.dense: the swap-AB kernel at decode), which can also leave its split-K partials to the consumer."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        n = sum(output_sizes)
        new_param(layer, "weight", (n, input_size), params_dtype, output_dim=0, input_dim=1)
        self.linear = dense_linear_for(params_dtype, n, input_size)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        cpu_linear.forget(layer)  # new weights: the CPU packed copy is made again on the next forward

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None,
              split_parts: list | None = None) -> torch.Tensor:
        """split_parts (a list; only where defers_split): as Fp8LinearMethod.apply's."""
        if self.linear is not None:
            return self.linear(x, layer.weight, bias, **({} if split_parts is None else {"parts": split_parts}))
        return cpu_linear.linear(x, layer.weight, bias, layer)

    def defers_split(self, consumer: str) -> bool:
        """Whether apply can leave a split-K GEMM's partials to a consumer of this kind: the dense_linear op, with
        the consumer's switch on (the FP8 linears' ATOM_FP8_NORM_SUMS_SPLITS / ATOM_FP8_ATTN_SUMS_SPLITS /
        ATOM_FP8_ACT_SUMS_SPLITS)."""
        if self.linear is None:
            return False
        from atom.ops.triton_kernels import quant_fp8

        return quant_fp8.consumer_sums_splits(consumer)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight


def attach_host_cpu_gemms(model: nn.Module) -> int:
    """Pack the model's unquantized linears with the host's CPU GEMMs now (cpu_linear.attach), after its weights
    are loaded and before it is compiled; returns how many."""
    return sum(cpu_linear.attach(m, m.weight) for m in model.modules()
               if isinstance(getattr(m, "quant_method", None), UnquantizedLinearMethod))


class UnquantizedMoEMethod(MoEMethod):
    """w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I], through the fused_experts op. An
    implementation that wants its own weight layout (AITER's shuffled tiles) gets it once, after loading.
    Under expert parallelism the chosen fused_experts implementation must skip pairs of id -1."""

    supports_expert_parallel = True

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       params_dtype: torch.dtype) -> None:
        new_param(layer, "w13", (num_experts, 2 * intermediate_size, hidden_size), params_dtype, output_dim=0)
        new_param(layer, "w2", (num_experts, hidden_size, intermediate_size), params_dtype, input_dim=1)
        static = {"activation": layer.activation, "hidden_size": hidden_size, "intermediate_size": intermediate_size}
        if getattr(layer, "ep_size", 1) > 1:
            static["expert_parallel"] = True
        self.experts = resolve("fused_experts", static=static)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        prepare = impl_of(self.experts).prepare_weights
        if prepare is not None:  # replaces the storage: the checkpoint layout is not kept alongside
            layer.w13.data, layer.w2.data = prepare(layer.w13.data, layer.w2.data)

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        return self.experts(x, layer.w13, layer.w2, topk_weights, topk_ids, layer.activation)
