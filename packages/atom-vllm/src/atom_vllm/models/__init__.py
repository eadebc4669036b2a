"""vLLM model classes over ATOM's decoders: one per architecture, named as the HF architecture.

Each class is ATOM's family class with vLLM's constructor and forward signature: linears, norms, rope and
MoE are atom-core's; attention is vLLM's `Attention` layer (built by VllmAttentionFactory), or for
DeepSeek-V2/V3's multi-head latent attention vLLM's `MLAAttention` layer (VllmMLAFactory), so vLLM owns
the KV cache. The backbone carries vLLM's `@support_torch_compile`: ATOM's kernels are `torch.library`
custom ops (atom.ops.custom_ops), so Dynamo traces the whole backbone and Inductor fuses around them.
Quantization goes through atom-core's seam: the method vLLM resolved (the checkpoint's quant_method, or
--quantization) is looked up in ATOM's registry (atom.quantization) with the checkpoint's own
quantization_config, which ATOM re-reads rather than mapping vLLM's config object: that dict is the contract
every host shares (so ATOM builds the same layers, scales and kernels in vLLM, SGLang and its own engine),
while vLLM's config classes change between releases (0.32 moved online FP8 to fp8_per_tensor /
fp8_per_channel) and their layer methods cannot run ATOM's layers anyway. vLLM's object still goes to vLLM's
own Attention layer, whose KV-cache method holds the checkpoint's k_scale / v_scale for --kv-cache-dtype fp8.
A method ATOM lacks is refused with the reason.

vLLM hashes every module of this package to validate its model-info cache, so keep the classes here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from atom.models.decoder import DecoderModel
from atom.models.deepseek_v2 import DeepseekV2ForCausalLM as _AtomDeepseekV2
from atom.models.deepseek_v2 import DeepseekV2Model
from atom.models.deepseek_v3 import DeepseekV3ForCausalLM as _AtomDeepseekV3
from atom.models.glm4_moe import Glm4MoeForCausalLM as _AtomGlm4Moe
from atom.models.glm4_moe import Glm4MoeModel
from atom.models.gpt_oss import GptOssForCausalLM as _AtomGptOss
from atom.models.llama import LlamaForCausalLM as _AtomLlama
from atom.models.llama import MistralForCausalLM as _AtomMistral
from atom.models.mixtral import MixtralForCausalLM as _AtomMixtral
from atom.models.qwen2 import Qwen2ForCausalLM as _AtomQwen2
from atom.models.qwen3 import Qwen3ForCausalLM as _AtomQwen3
from atom.models.qwen3_moe import Qwen3MoeForCausalLM as _AtomQwen3Moe
from atom.platform import kernel_backend
from atom.quantization import QuantizationConfig, quantization_config
from atom.quantization import process_weights_after_loading as atom_post_load
from atom.quantization.unquantized import attach_host_cpu_gemms
from vllm.compilation.decorators import support_torch_compile
from vllm.platforms import current_platform

from atom_vllm import cpu_gemm
from atom_vllm.attention import VllmAttentionFactory
from atom_vllm.distributed import install_tp_group
from atom_vllm.mla import VllmMLAFactory

logger = logging.getLogger("vllm.atom_vllm")


_DYNAMIC_DIMS = {"input_ids": 0, "positions": -1, "inputs_embeds": 0}


@support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)
class VllmDecoderModel(DecoderModel):
    """ATOM's backbone, compiled by vLLM (piecewise around vLLM's attention op) when compilation is on."""

    # Unannotated on purpose: the decorator isinstance-checks positional arguments against the
    # annotations of __init__ (offset by `self`), and string annotations would make that raise.
    def __init__(self, config, opts, attn_factory, prefix="model", max_positions=None, quant_config=None):
        super().__init__(config, opts, attn_factory, prefix=prefix, max_positions=max_positions,
                         quant_config=quant_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_ids, positions, inputs_embeds)


# vLLM quantization method names that are another name of one of ATOM's schemes: vLLM renames a GPT-OSS
# checkpoint's "mxfp4" (GptOssMxfp4Config, 0.24 and 0.32).
VLLM_QUANT_ALIASES = {"gpt_oss_mxfp4": "mxfp4"}


@support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)
class VllmDeepseekV2Model(DeepseekV2Model):
    """DeepSeek-V2/V3's backbone (MLA + DeepSeekMoE blocks), compiled by vLLM like VllmDecoderModel."""

    def __init__(self, config, opts, mla_factory, prefix="model", max_positions=None, quant_config=None):
        super().__init__(config, opts, mla_factory, prefix=prefix, max_positions=max_positions,
                         quant_config=quant_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_ids, positions, inputs_embeds)


@support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)
class VllmGlm4MoeModel(Glm4MoeModel):
    """GLM-4-MoE's backbone (grouped-query attention + DeepSeekMoE blocks), compiled by vLLM."""

    def __init__(self, config, opts, attn_factory, prefix="model", max_positions=None, quant_config=None):
        super().__init__(config, opts, attn_factory, prefix=prefix, max_positions=max_positions,
                         quant_config=quant_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_ids, positions, inputs_embeds)


# vLLM >= 0.32's online FP8 names (`--quantization fp8_per_channel` on a float checkpoint; 0.24 said `fp8`):
# ATOM's online FP8, which quantizes weights per output channel and activations per token.
ONLINE_FP8 = ("fp8_per_channel", "fp8_per_tensor")


def atom_quant_config(vllm_config) -> QuantizationConfig | None:
    """ATOM's scheme for vLLM's quantization method (None: unquantized); ValueError when ATOM has none."""
    if vllm_config.quant_config is None:
        return None
    model_config = vllm_config.model_config
    method = getattr(model_config, "quantization", None) or vllm_config.quant_config.get_name()
    method = VLLM_QUANT_ALIASES.get(str(method), method)
    raw = getattr(getattr(model_config, "hf_config", None), "quantization_config", None)
    raw = raw if raw is None or isinstance(raw, dict) else raw.to_dict()
    if method in ONLINE_FP8 and raw is None:
        logger.info("atom-vllm: --quantization %s runs as ATOM's online FP8 (weights per output channel, "
                    "activations per token)", method)
        method = "fp8"
    try:
        return quantization_config(method, raw, source="the checkpoint's quantization")
    except ValueError as e:
        raise ValueError(f"atom-vllm cannot serve this quantized checkpoint: {e}. "
                         "Set ATOM_DISABLE_VLLM_PLUGIN=1 to serve it with vLLM's own model.") from e


def check_supported(vllm_config) -> QuantizationConfig | None:
    """Refuse, with the reason, what ATOM's models do not do inside vLLM; returns ATOM's quantization."""
    quant_config = atom_quant_config(vllm_config)
    pp = vllm_config.parallel_config.pipeline_parallel_size
    if pp > 1:
        raise ValueError(f"atom-vllm does not support pipeline parallelism (pipeline_parallel_size={pp}); "
                         "use tensor parallelism or set ATOM_DISABLE_VLLM_PLUGIN=1")
    return quant_config


class VllmCausalLM:
    """Mixin turning an ATOM DecoderForCausalLM subclass into a vLLM model class."""

    backbone_cls = VllmDecoderModel
    uses_mla = False  # DeepSeek's multi-head latent attention: vLLM's MLAAttention layer instead of Attention
    # vLLM drafts with its own MTP model (speculative_config): the target skips a checkpoint's MTP layers
    keep_mtp_layers = False

    def __init__(self, *, vllm_config, prefix: str = ""):
        quant_config = check_supported(vllm_config)
        tp = install_tp_group()
        if current_platform.is_cpu():
            cpu_gemm.install()
        model_config = vllm_config.model_config
        if self.uses_mla:
            factories = {"mla_factory": VllmMLAFactory(vllm_config.cache_config, vllm_config.quant_config)}
        else:
            factories = {"attn_factory": VllmAttentionFactory(vllm_config.cache_config, vllm_config.quant_config)}
        super().__init__(model_config.hf_config, prefix=prefix, max_positions=model_config.max_model_len,
                         quant_config=quant_config, **factories)
        if self.uses_mla:
            attention = "vLLM's MLAAttention layer"
        elif factories["attn_factory"].backend_cls is not None:
            attention = "vLLM's Attention layer running ATOM's kernels"
            if any(getattr(getattr(m, "impl", None), "_fused_attend", None) is not None for m in self.modules()):
                attention += ", decode prep inside the attention kernel where ATOM_ATTN_FUSED_DECODE_PREP's rule says"
        else:
            attention = "vLLM's Attention layer on vLLM's backend"
        logger.info("ATOM built %s.%s (TP %d/%d, kernel backend %s, attention: %s)", type(self).__module__,
                    type(self).__qualname__, tp.rank, tp.world_size, kernel_backend(), attention)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        self._post_load()  # for vLLMs without the model-level hook below (it runs once either way)
        return loaded

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level post-load hook (it also runs after dummy weights): ATOM's layers process their
        weights once (vLLM's own loop skips them: their methods are not vLLM's QuantizeMethodBase)."""
        self._post_load()

    def _post_load(self) -> None:
        atom_post_load(self)
        if cpu_gemm.active():  # vLLM's CPU GEMMs packed now, before vLLM compiles the backbone
            attach_host_cpu_gemms(self)


class LlamaForCausalLM(VllmCausalLM, _AtomLlama):
    pass


class MistralForCausalLM(VllmCausalLM, _AtomMistral):
    pass


class Qwen2ForCausalLM(VllmCausalLM, _AtomQwen2):
    pass


class Qwen3ForCausalLM(VllmCausalLM, _AtomQwen3):
    pass


class Qwen3MoeForCausalLM(VllmCausalLM, _AtomQwen3Moe):
    pass


class MixtralForCausalLM(VllmCausalLM, _AtomMixtral):
    pass


class DeepseekV2ForCausalLM(VllmCausalLM, _AtomDeepseekV2):
    backbone_cls = VllmDeepseekV2Model
    uses_mla = True


class DeepseekV3ForCausalLM(VllmCausalLM, _AtomDeepseekV3):
    backbone_cls = VllmDeepseekV2Model
    uses_mla = True


class Glm4MoeForCausalLM(VllmCausalLM, _AtomGlm4Moe):
    backbone_cls = VllmGlm4MoeModel


class GptOssForCausalLM(VllmCausalLM, _AtomGptOss):
    pass


__all__ = ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "GptOssForCausalLM",
           "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
           "Qwen3MoeForCausalLM", "VllmDecoderModel", "VllmDeepseekV2Model", "VllmGlm4MoeModel"]
