"""Quantization schemes on linear and MoE layers (see base.py for the seam)."""

from atom.quantization.base import (
    LinearMethod,
    MoEMethod,
    QuantizationConfig,
    QuantMethod,
    dense_weight_read,
    mark_dense_weight_read,
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
from atom.quantization import mxfp4  # noqa: E402,F401  registers the "mxfp4" scheme


def linear_method_for(quant_config: QuantizationConfig | None, layer, prefix: str) -> LinearMethod:
    method = quant_config.linear_method(layer, prefix) if quant_config is not None else None
    return method or UnquantizedLinearMethod()


def moe_method_for(quant_config: QuantizationConfig | None, layer, prefix: str) -> MoEMethod:
    method = quant_config.moe_method(layer, prefix) if quant_config is not None else None
    return method or UnquantizedMoEMethod()


__all__ = [
    "LinearMethod", "MoEMethod", "QuantMethod", "QuantizationConfig", "UnquantizedLinearMethod",
    "UnquantizedMoEMethod", "dense_weight_read", "linear_method_for", "mark_dense_weight_read", "moe_method_for",
    "new_param", "process_weights_after_loading",
    "quantization_config", "quantization_config_for", "register_quantization", "set_weight_attrs",
    "supported_quantizations", "weights_reloading",
]

# Last: fp8 imports atom.loader, whose package imports the layers, which import this package's names above.
from atom.quantization import fp8  # noqa: E402,F401  (registers the fp8 and compressed-tensors schemes)
