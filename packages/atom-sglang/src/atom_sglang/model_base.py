"""The SGLang face of an ATOM model: SGLang's constructor, forward and logits, ATOM's everything else.

Each class in `atom_sglang.models` subclasses `SGLangModelMixin` and the ATOM family class, so the
parameter names, the weight loading and the numerics are atom-core's; only the attention (RadixAttention)
and the logits (SGLang's LogitsProcessor, which reads `lm_head.weight`) come from SGLang.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from atom.forward_context import set_forward_context
from atom.models.decoder import DecoderModel
from atom.models.deepseek_v2 import DeepseekV2Model
from atom.models.glm4_moe import Glm4MoeModel
from atom.quantization import QuantizationConfig, process_weights_after_loading, quantization_config
from atom_sglang.distributed import adopt_sglang_tp_group
from atom_sglang.mla import sglang_mla_factory
from atom_sglang.radix import radix_attention_factory
from atom_sglang.version import require_supported_sglang


class SGLangBackboneMixin:
    """The transformer body with SGLang's calling convention (put first in the bases of a backbone).

    SGLang's prefill CUDA-graph runner (breakable graphs) calls the body directly as
    `model.model.forward(input_ids, positions, forward_batch, input_embeds=...)`, bypassing the outer
    forward; so the body itself takes forward_batch and sets it as the attention's forward context.
    """

    def forward(self, input_ids, positions, forward_batch=None, input_embeds=None, inputs_embeds=None, **kwargs):
        embeds = input_embeds if input_embeds is not None else inputs_embeds
        if forward_batch is None:
            return super().forward(input_ids, positions, embeds)
        with set_forward_context(forward_batch):
            return super().forward(input_ids, positions, embeds)


class SGLangBackbone(SGLangBackboneMixin, DecoderModel):
    pass


class SGLangDeepseekV2Backbone(SGLangBackboneMixin, DeepseekV2Model):
    pass


class SGLangGlm4MoeBackbone(SGLangBackboneMixin, Glm4MoeModel):
    pass


def atom_quant_config(config, sglang_quant_config) -> QuantizationConfig | None:
    """ATOM's scheme for SGLang's quantization (None: unquantized); NotImplementedError when ATOM has none.

    SGLang's method name (the checkpoint's quant_method or --quantization) picks ATOM's scheme, which reads the
    checkpoint's own quantization_config (as in atom-vllm: the dict every host shares; SGLang's config objects
    and layer methods are its own). `--quantization fp8` on a float checkpoint is ATOM's online FP8."""
    if sglang_quant_config is None:
        return None
    name = (sglang_quant_config.get_name() if hasattr(sglang_quant_config, "get_name")
            else type(sglang_quant_config).__name__)
    raw = getattr(config, "quantization_config", None)
    raw = raw if raw is None or isinstance(raw, dict) else raw.to_dict()
    try:
        return quantization_config(name, raw, source="the checkpoint's quantization")
    except ValueError as e:
        raise NotImplementedError(
            f"atom-sglang cannot serve this quantized checkpoint ({e}); unset "
            "SGLANG_EXTERNAL_MODEL_PACKAGE to serve it with SGLang's own model") from e


class SGLangModelMixin:
    """Put first in the bases: `class LlamaForCausalLM(SGLangModelMixin, atom.models.llama.LlamaForCausalLM)`."""

    backbone_cls = SGLangBackbone
    uses_mla = False  # DeepSeek's multi-head latent attention over SGLang's MLA pool (atom_sglang.mla)
    # SGLang drafts with its own MTP model (speculative decoding): the target skips a checkpoint's MTP layers
    keep_mtp_layers = False

    def __init__(self, config, quant_config=None, prefix: str = "", **kwargs):
        require_supported_sglang()
        atom_quant = atom_quant_config(config, quant_config)
        adopt_sglang_tp_group()
        factory = {"mla_factory": sglang_mla_factory} if self.uses_mla else {"attn_factory": radix_attention_factory}
        super().__init__(config, prefix=prefix, max_positions=getattr(config, "max_position_embeddings", None),
                         quant_config=atom_quant, **factory)
        from sglang.srt.layers.logits_processor import LogitsProcessor

        self.quant_config = None
        self.logits_processor = LogitsProcessor(config)
        # SGLang registers `layers[i].self_attn.attn` as each layer's attention (`self_attn.attn_mqa` for MLA
        # models): put the RadixAttention itself there (it accepts atom's attn(q, k, v) call), not atom's
        # front-end that wraps it.
        for layer in self.model.layers:
            if self.uses_mla:
                layer.self_attn.attn_mqa = layer.self_attn.mla_attn.impl.attn_mqa
            else:
                layer.self_attn.attn = layer.self_attn.attn.impl

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch, input_embeds=None,
                get_embedding: bool = False, **kwargs):
        if get_embedding:
            raise NotImplementedError("atom-sglang models are generation models; embedding mode is not supported")
        hidden = self.model(input_ids, positions, forward_batch, input_embeds)
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_embed_and_head(self):
        return self.model.embed_tokens.weight, self.lm_head.weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # SGLang's loader also calls each layer's quant_method.process_weights_after_loading (dummy weights
        # included); ATOM's methods run once per load whoever calls first.
        loaded = super().load_weights(weights)
        process_weights_after_loading(self)
        return loaded
