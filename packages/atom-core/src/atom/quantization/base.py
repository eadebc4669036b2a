"""The quantization seam: per-scheme method objects on linear and MoE layers, chosen from the checkpoint.

A scheme is a `QuantizationConfig` subclass registered under the checkpoint's
`quantization_config.quant_method` name. For each layer it hands out a method object that
  - creates the layer's parameters (whatever the scheme stores: weight, weight_scale, ...), each with the
    layer's weight_loader and the attributes that tell it how to shard the tensor (see atom.layers.linear
    and atom.layers.moe: output_dim, input_dim, output_block/input_block, per_shard);
  - applies the layer (its forward);
  - processes the weights once after loading (merge per-shard scales, repack for a kernel, ...).
A layer without a scheme (or that a scheme leaves alone) gets the unquantized methods
(atom.quantization.unquantized), which are the first implementation of this seam.

Hosts may call `process_weights_after_loading` more than once (SGLang's loader calls every module's
`quant_method.process_weights_after_loading(module)` itself, sometimes twice); the base class runs a
method's hook at most once per load, whatever the subclass does, so a repack is never applied twice.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

_PROCESSED = "_atom_weights_processed"
_DENSE_WEIGHT_READ = "_atom_dense_weight_read"


def mark_dense_weight_read(layer: nn.Module) -> None:
    """Another op reads this layer's weight directly through `dequantized_weight` (MLA's kv_b_proj): a
    scheme that stores something else makes its dense copy once, after loading. Call before loading."""
    layer.__dict__[_DENSE_WEIGHT_READ] = True


def dense_weight_read(layer: nn.Module) -> bool:
    return bool(layer.__dict__.get(_DENSE_WEIGHT_READ))


class QuantMethod:
    """Base of per-layer method objects. Subclasses override create_weights / apply /
    process_weights_after_loading; the last is wrapped so it runs once per load of a layer."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        hook = cls.__dict__.get("process_weights_after_loading")
        if hook is not None and not getattr(hook, "_runs_once", False):
            @functools.wraps(hook)
            def once(self, layer: nn.Module) -> None:
                if layer.__dict__.get(_PROCESSED):
                    return
                hook(self, layer)
                layer.__dict__[_PROCESSED] = True

            once._runs_once = True
            cls.process_weights_after_loading = once

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.__dict__[_PROCESSED] = True


class LinearMethod(QuantMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        """Register the layer's parameters for `input_size` input features and the per-rank output
        features of each merged shard (`output_sizes`, one entry for an unmerged layer)."""
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight as a dense [out, in] tensor in the compute dtype, for ops that read a layer's
        weight directly instead of calling it (MLA's absorbed attention reads kv_b_proj's W_UK / W_UV). Called
        every forward: a scheme that stores something else keeps the dense copy it makes after loading (for
        the layers marked with `mark_dense_weight_read`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot hand out a dense weight (layer "
                                  f"{getattr(layer, 'prefix', '') or type(layer).__name__}); this layer's weight "
                                  "is read directly by another op (e.g. MLA's kv_b_proj)")


class MoEMethod(QuantMethod):
    # Expert parallelism hands apply() topk_ids of -1 for the pairs routed to another rank's experts, which
    # must contribute nothing; a method whose kernels do that says so (FusedMoE refuses EP otherwise).
    supports_expert_parallel: ClassVar[bool] = False

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       params_dtype: torch.dtype) -> None:
        """Register the experts' parameters (num_experts and intermediate_size are this rank's share)."""
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class QuantizationConfig:
    """One scheme, parsed from the checkpoint's quantization_config; hands out per-layer methods."""

    name: ClassVar[str] = ""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QuantizationConfig:
        return cls()

    def linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """The method of a linear layer; None leaves it unquantized."""
        return None

    def moe_method(self, layer: nn.Module, prefix: str) -> MoEMethod | None:
        """The method of an MoE layer's experts; None leaves them unquantized."""
        return None


def set_weight_attrs(param: torch.Tensor, **attrs) -> torch.Tensor:
    for key, value in attrs.items():
        if hasattr(param, key) and key != "weight_loader":
            raise KeyError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)
    return param


def new_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, **attrs) -> nn.Parameter:
    """Register an uninitialised parameter on `layer`, with the layer's weight_loader and `attrs`."""
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(param, weight_loader=layer.weight_loader, **attrs)
    layer.register_parameter(name, param)
    return param


def process_weights_after_loading(model: nn.Module) -> None:
    """The post-load hook: every layer's method processes its freshly loaded weights, once."""
    from atom.ops import cpu_linear

    cpu_linear.forget(model)  # layers without a method too (the LM head)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, QuantMethod):
            method.process_weights_after_loading(module)


def weights_reloading(model: nn.Module) -> None:
    """Mark every layer as holding unprocessed weights (a new load is starting)."""
    from atom.ops import cpu_linear

    cpu_linear.forget(model)
    for module in model.modules():
        module.__dict__.pop(_PROCESSED, None)
