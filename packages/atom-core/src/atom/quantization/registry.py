"""quant_method name -> QuantizationConfig class, and reading it from a checkpoint's config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from atom.quantization.base import QuantizationConfig

_SCHEMES: dict[str, type[QuantizationConfig]] = {}


def register_quantization(name: str) -> Callable[[type[QuantizationConfig]], type[QuantizationConfig]]:
    """Register a scheme under its quantization_config.quant_method name."""

    def wrap(cls: type[QuantizationConfig]) -> type[QuantizationConfig]:
        cls.name = name
        _SCHEMES[name] = cls
        return cls

    return wrap


def supported_quantizations() -> list[str]:
    return sorted(_SCHEMES)


def _as_dict(raw) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        return dict(raw)
    if hasattr(raw, "to_dict"):
        return dict(raw.to_dict())
    return dict(vars(raw))


def quantization_config(method: str | None = None, config: Mapping[str, Any] | None = None,
                        source: str = "config.json quantization_config") -> QuantizationConfig | None:
    """The scheme for quant_method `method` (default: config["quant_method"]) built from `config`.

    None when there is neither (an unquantized checkpoint). An unknown method is a ValueError naming the
    field and the supported methods."""
    config = dict(config or {})
    method = method or config.get("quant_method")
    if method is None:
        if config:
            raise ValueError(f"{source} has no quant_method field; ATOM supports: {_supported_text()}")
        return None
    method = str(method).lower()
    if method not in _SCHEMES and method.replace("_", "-") in _SCHEMES:  # SGLang says compressed_tensors
        method = method.replace("_", "-")
    if method not in _SCHEMES:
        raise ValueError(f"{source}.quant_method={method!r} is not supported by ATOM; supported: {_supported_text()}")
    return _SCHEMES[method].from_config(config)


def quantization_config_for(hf_config, method: str | None = None) -> QuantizationConfig | None:
    """The scheme of a transformers config (its quantization_config), or `method` forced by the user."""
    raw = getattr(hf_config, "quantization_config", None)
    return quantization_config(method, _as_dict(raw) if raw is not None else None)


def _supported_text() -> str:
    return ", ".join(supported_quantizations()) or "none yet (unquantized checkpoints only)"
