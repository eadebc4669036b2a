"""Mixtral: Mistral attention + sparse MoE in every layer (top-k weights renormalized)."""

from atom.models.decoder import DecoderForCausalLM, DecoderOptions


class MixtralForCausalLM(DecoderForCausalLM):
    @classmethod
    def options(cls, config) -> DecoderOptions:
        return DecoderOptions(moe="mixtral")
