"""Quantization schemes on linear and MoE layers (see base.py for the seam)."""

from atom.quantization.base import (
    LinearMethod,
    MoEMethod,
    QuantizationConfig,
    QuantMethod,
    new_param,
    process_weights_after_loading,
    set_weight_attrs,
    weights_reloading,
)
from atom.quantization.registry import (
    quantization_config,
    quantization_config_for,
    register_quantization,
    supported_quantizations,
)
from atom.quantization.unquantized import UnquantizedLinearMethod, UnquantizedMoEMethod

from atom.quantization import fp8  # noqa: E402,F401  (registers the fp8 and compressed-tensors schemes)


def linear_method_for(quant_config: QuantizationConfig | None, layer, prefix: str) -> LinearMethod:
    method = quant_config.linear_method(layer, prefix) if quant_config is not None else None
    return method or UnquantizedLinearMethod()


def moe_method_for(quant_config: QuantizationConfig | None, layer, prefix: str) -> MoEMethod:
    method = quant_config.moe_method(layer, prefix) if quant_config is not None else None
    return method or UnquantizedMoEMethod()


__all__ = [
    "LinearMethod", "MoEMethod", "QuantMethod", "QuantizationConfig", "UnquantizedLinearMethod",
    "UnquantizedMoEMethod", "linear_method_for", "moe_method_for", "new_param", "process_weights_after_loading",
    "quantization_config", "quantization_config_for", "register_quantization", "set_weight_attrs",
    "supported_quantizations", "weights_reloading",
]
