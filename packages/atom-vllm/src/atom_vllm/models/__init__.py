"""vLLM model classes over ATOM's decoders: one per architecture, named as the HF architecture.

Each class is ATOM's family class with vLLM's constructor and forward signature: linears, norms, rope and
MoE are atom-core's; attention is vLLM's `Attention` layer (built by VllmAttentionFactory), so vLLM owns
the KV cache. The backbone carries vLLM's `@support_torch_compile`.

vLLM hashes every module of this package to validate its model-info cache, so keep the classes here.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable

import torch
from atom.models.decoder import DecoderModel
from atom.models.llama import LlamaForCausalLM as _AtomLlama
from atom.models.llama import MistralForCausalLM as _AtomMistral
from atom.models.mixtral import MixtralForCausalLM as _AtomMixtral
from atom.models.qwen2 import Qwen2ForCausalLM as _AtomQwen2
from atom.models.qwen3 import Qwen3ForCausalLM as _AtomQwen3
from atom.models.qwen3_moe import Qwen3MoeForCausalLM as _AtomQwen3Moe
from atom.ops.moe import fused_experts as reference_fused_experts
from atom.ops.registry import resolve
from atom.platform import kernel_backend
from vllm.compilation.decorators import support_torch_compile

from atom_vllm.attention import VllmAttentionFactory
from atom_vllm.distributed import install_tp_group

logger = logging.getLogger("vllm.atom_vllm")


def compilable(vllm_config) -> bool:
    """Whether vLLM may torch.compile the backbone of this model.

    Not an MoE model on ATOM's torch-reference `fused_experts`: its per-expert loop reads token counts on
    the host (`.tolist()`), which a graph cannot hold. Dense models trace (checked on CPU with Dynamo); the
    Triton/AITER MoE kernels read nothing on the host and are left to vLLM's compiler (not checked on a GPU).
    """
    if getattr(getattr(vllm_config.compilation_config, "mode", None), "name", None) == "NONE":
        return False  # eager run: nothing to decide, nothing to warn about
    config = vllm_config.model_config.hf_config
    is_moe = any(getattr(config, a, None) for a in ("num_experts", "num_local_experts"))
    if is_moe and resolve("fused_experts") is reference_fused_experts:
        logger.warning("ATOM: running the MoE backbone without torch.compile: the torch reference fused_experts "
                       "(kernel backend %s) cannot be traced", kernel_backend())
        return False
    return True


_DYNAMIC_DIMS = {"input_ids": 0, "positions": -1, "inputs_embeds": 0}
if "enable_if" in inspect.signature(support_torch_compile).parameters:
    _compile = support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS, enable_if=compilable)
else:  # older vLLM without enable_if: always eligible
    _compile = support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)


@_compile
class VllmDecoderModel(DecoderModel):
    """ATOM's backbone, compiled by vLLM (piecewise around vLLM's attention op) when compilation is on."""

    # Unannotated on purpose: the decorator isinstance-checks positional arguments against the
    # annotations of __init__ (offset by `self`), and string annotations would make that raise.
    def __init__(self, config, opts, attn_factory, prefix="model", max_positions=None):
        super().__init__(config, opts, attn_factory, prefix=prefix, max_positions=max_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_ids, positions, inputs_embeds)


def check_supported(vllm_config) -> None:
    """Refuse, with the reason, what ATOM's models do not do inside vLLM."""
    if vllm_config.quant_config is not None:
        method = getattr(vllm_config.model_config, "quantization", None) or type(vllm_config.quant_config).__name__
        raise ValueError(f"atom-vllm runs unquantized checkpoints only; this one is quantized ({method}). "
                         "Set ATOM_DISABLE_VLLM_PLUGIN=1 to serve it with vLLM's own model.")
    pp = vllm_config.parallel_config.pipeline_parallel_size
    if pp > 1:
        raise ValueError(f"atom-vllm does not support pipeline parallelism (pipeline_parallel_size={pp}); "
                         "use tensor parallelism or set ATOM_DISABLE_VLLM_PLUGIN=1")


class VllmCausalLM:
    """Mixin turning an ATOM DecoderForCausalLM subclass into a vLLM model class."""

    backbone_cls = VllmDecoderModel

    def __init__(self, *, vllm_config, prefix: str = ""):
        check_supported(vllm_config)
        tp = install_tp_group()
        model_config = vllm_config.model_config
        factory = VllmAttentionFactory(vllm_config.cache_config, vllm_config.quant_config)
        super().__init__(model_config.hf_config, attn_factory=factory, prefix=prefix,
                         max_positions=model_config.max_model_len)
        logger.info("ATOM built %s.%s (TP %d/%d, kernel backend %s, attention: vLLM's Attention layer)",
                    type(self).__module__, type(self).__qualname__, tp.rank, tp.world_size, kernel_backend())

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights)


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


__all__ = ["LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
           "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "VllmDecoderModel"]
