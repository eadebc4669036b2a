"""Qwen3-MoE: Qwen3 attention (qk-norm) + sparse MoE blocks (softmax top-k, optional renormalization)."""

from atom.models.decoder import DecoderForCausalLM, DecoderOptions


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    @classmethod
    def options(cls, config) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm=True, moe="qwen3_moe")
