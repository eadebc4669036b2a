"""GLM-4-MoE (GLM-4.5 / 4.6): grouped-query attention with partial rotary (neox halves of the first
partial_rotary_factor of each head), optional qk-norm and q/k/v bias (none on o_proj), then DeepSeek-V3's
MoE (sigmoid router with e_score_correction_bias, grouped top-k, shared experts) after
first_k_dense_replace dense layers. MTP layers are kept as in DeepSeek-V3."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from atom.layers.attention import AttentionFactory
from atom.models.decoder import DecoderOptions, SelfAttention
from atom.models.deepseek_v2 import (
    BlockStack,
    DecoderBlock,
    MoERouting,
    MTPKeepingCausalLM,
    _kept_factory,
    moe_or_dense_mlp,
    v3_routing,
)
from atom.quantization import QuantizationConfig


@dataclass(frozen=True)
class Glm4MoeOptions:
    attention: DecoderOptions
    routing: MoERouting


def glm4_moe_block(config, layer_idx: int, opts: Glm4MoeOptions, attn_factory, prefix: str,
                   max_positions: int | None, *, quant_config: QuantizationConfig | None = None) -> DecoderBlock:
    attn = SelfAttention(config, layer_idx, opts.attention, attn_factory, f"{prefix}.self_attn", max_positions,
                         quant_config=quant_config)
    mlp = moe_or_dense_mlp(config, layer_idx, opts.routing, quant_config=quant_config, prefix=f"{prefix}.mlp")
    return DecoderBlock(attn, mlp, config.hidden_size, config.rms_norm_eps)


class Glm4MoeModel(BlockStack):
    def __init__(self, config, opts: Glm4MoeOptions, attn_factory: AttentionFactory | None, prefix: str = "model",
                 max_positions: int | None = None, *, quant_config: QuantizationConfig | None = None):
        super().__init__(config, (glm4_moe_block(config, i, opts, attn_factory, f"{prefix}.layers.{i}",
                                                 max_positions, quant_config=quant_config)
                                  for i in range(config.num_hidden_layers)))


class Glm4MoeForCausalLM(MTPKeepingCausalLM):
    backbone_cls = Glm4MoeModel

    @classmethod
    def options(cls, config) -> Glm4MoeOptions:
        return Glm4MoeOptions(attention=DecoderOptions(qkv_bias=bool(config.attention_bias),
                                                       qk_norm=bool(getattr(config, "use_qk_norm", False))),
                              routing=v3_routing(config))

    def make_block(self, layer_idx: int, prefix: str) -> nn.Module:
        return glm4_moe_block(self.config, layer_idx, self.options(self.config), _kept_factory, prefix,
                              self._max_positions, quant_config=self._mtp_quant_config)
