"""Qwen2 / Qwen2.5: bias on the q, k and v projections (not on o)."""

from atom.models.decoder import DecoderForCausalLM, DecoderOptions


class Qwen2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def options(cls, config) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True)
