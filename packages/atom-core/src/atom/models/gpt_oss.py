"""GPT-OSS (openai/gpt-oss-20b, -120b): ATOM's decoder with three GPT-OSS pieces switched on.

What differs from a Llama-style decoder (transformers' gpt_oss is the reference):
  - attention sinks: each head has a learned logit that joins its softmax denominator (`self_attn.sinks`,
    handed to the attention implementation; see atom.layers.attention);
  - alternating sliding-window (`sliding_window`, 128) and full-attention layers (`layer_types`);
  - biases on q, k, v and o (`attention_bias`);
  - YaRN rope (factor 32 over 4096 positions, `truncate: false`), neox style, frequencies from
    transformers' own YaRN function (atom.layers.rotary);
  - every MLP is an MoE block (atom.layers.gpt_oss_moe): a router with a bias, top-k by logit with a
    softmax over the chosen k, experts with biases and the clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`),
    in bf16 or MXFP4 (`quantization_config.quant_method: mxfp4`, the quantization scheme of
    atom.quantization.mxfp4: only the experts quantized).
Norms (RMSNorm), embeddings and the untied LM head are the decoder's own.
"""

from __future__ import annotations

import re

from atom.layers.gpt_oss_moe import CHECKPOINT_PARAMS
from atom.models.decoder import DecoderForCausalLM, DecoderOptions

_EXPERT_TENSOR = re.compile(r"^(.*\.mlp\.experts)\.(\w+)$")


class GptOssForCausalLM(DecoderForCausalLM):
    @classmethod
    def options(cls, config) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", True))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, moe="gpt_oss", attention_sinks=True)

    def _load_tensor(self, source, tensor, param) -> None:
        name = self.checkpoint_name(source)
        m = _EXPERT_TENSOR.match(name) if name is not None else None
        if m is None:
            super()._load_tensor(source, tensor, param)
            return
        base, suffix = m.groups()
        if suffix not in CHECKPOINT_PARAMS:
            raise ValueError(f"checkpoint tensor {source!r} is not a GPT-OSS expert tensor "
                             f"(expected one of {', '.join(sorted(CHECKPOINT_PARAMS))})")
        is_mxfp4 = suffix.endswith(("_blocks", "_scales"))
        try:
            want_mxfp4 = self.get_submodule(base).quant_method.mxfp4
        except AttributeError:  # no such layer: param() below names the missing parameter
            want_mxfp4 = is_mxfp4
        if not suffix.endswith("_bias") and is_mxfp4 != want_mxfp4:
            want = "MXFP4 (quantization_config mxfp4)" if want_mxfp4 else "dense (no quantization_config)"
            raise ValueError(f"checkpoint tensor {source!r} is {'MXFP4' if is_mxfp4 else 'dense'}, but the config "
                             f"declares the experts {want}")
        p = param(f"{base}.{CHECKPOINT_PARAMS[suffix]}", source)
        p.weight_loader(p, tensor)
