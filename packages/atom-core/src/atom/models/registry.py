"""HF `architectures` name -> ATOM model class."""

from __future__ import annotations

import importlib

# architecture -> "module:Class" (imported lazily)
_MODELS = {
    "LlamaForCausalLM": "atom.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "atom.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "atom.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "atom.models.qwen3:Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM": "atom.models.qwen3_moe:Qwen3MoeForCausalLM",
    "MixtralForCausalLM": "atom.models.mixtral:MixtralForCausalLM",
    "DeepseekV2ForCausalLM": "atom.models.deepseek_v2:DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": "atom.models.deepseek_v3:DeepseekV3ForCausalLM",
    "Glm4MoeForCausalLM": "atom.models.glm4_moe:Glm4MoeForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ValueError(
            f"architecture {architecture!r} is not supported by ATOM; supported: {', '.join(supported_architectures())}"
        )
    module, name = _MODELS[architecture].split(":")
    return getattr(importlib.import_module(module), name)


def model_class_for_config(config) -> type:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in _MODELS:
            return model_class(arch)
    raise ValueError(
        f"none of the checkpoint's architectures {archs} is supported by ATOM; "
        f"supported: {', '.join(supported_architectures())}"
    )
