"""Llama 2/3/3.1/3.2, SmolLM2 and Mistral: plain GQA decoder, optional attention/MLP bias."""

from atom.models.decoder import DecoderForCausalLM, DecoderOptions


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def options(cls, config) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral = Llama + sliding-window attention (from config.sliding_window)."""
