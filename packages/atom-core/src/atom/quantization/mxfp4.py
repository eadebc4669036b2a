"""The "mxfp4" scheme (`quantization_config.quant_method: mxfp4`, the released gpt-oss checkpoints).

MXFP4 (atom.ops.mxfp4) quantizes the MoE experts only: attention, router, embeddings and LM head are
listed in the checkpoint's `modules_to_not_convert` and stay in the model dtype, so linear layers get no
method from this scheme. The experts' method is GPT-OSS's (atom.layers.gpt_oss_moe.Mxfp4SwigluOaiMethod:
packed E2M1 codes and E8M0 scales, dequantized inside the kernels). vLLM and SGLang ship MXFP4 for other
MoE layers too; ATOM has no such kernel, so those layers are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from atom.quantization.base import MoEMethod, QuantizationConfig
from atom.quantization.registry import register_quantization


@register_quantization("mxfp4")
class Mxfp4Config(QuantizationConfig):
    def __init__(self, modules_to_not_convert: list[str] | None = None):
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Mxfp4Config:
        return cls(config.get("modules_to_not_convert"))

    def moe_method(self, layer: nn.Module, prefix: str) -> MoEMethod | None:
        from atom.layers.gpt_oss_moe import Mxfp4SwigluOaiMethod, SwigluOaiExperts  # the layer imports this package

        if not isinstance(layer, SwigluOaiExperts):
            raise ValueError(f"MoE layer {prefix or type(layer).__name__}: ATOM's MXFP4 experts are GPT-OSS's "
                             f"(biased, clamped SwiGLU); {type(layer).__name__} has no MXFP4 kernel")
        return Mxfp4SwigluOaiMethod()
