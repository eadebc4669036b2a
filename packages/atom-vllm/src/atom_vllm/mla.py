"""ATOM's MLA seam (atom.layers.mla) filled with vLLM's `MLAAttention` layer.

vLLM's layer (vllm.model_executor.layers.attention.mla_attention, the same path in 0.24 and 0.32) owns the
latent cache (it writes kv_c | k_pe itself), its metadata, prefix caching and CUDA graphs, and picks the
formulation: absorbed decode through the backend's forward_mqa (W_UK_T / W_UV, which it derives from
kv_b_proj after loading), expanded prefill through forward_mha (it calls kv_b_proj on the latent). Its call:
    out = MLAAttention(q [T, H, P + R] (rope applied), kv_c_normed [T, L], k_pe [T, 1, R],
                       output_shape=(T, H * V))
The layer name (the spec's prefix) must hold exactly one integer, the layer index (vLLM keys the cache by it).

vLLM reads kv_b_proj the way its own linear layers behave: `kv_b_proj(x)` returns (y, bias) and
`get_and_maybe_dequant_weights(kv_b_proj)` reads `.quant_method` and `.weight`. ATOM's linear returns a
tensor and its quantization methods are ATOM's, so vLLM gets `KVBProjForVllm`: a call that returns
(ATOM's output, None) and a dense `.weight` from ATOM's quantization method (atom.layers.mla.kv_b_weight),
with `quant_method = None` so vLLM takes that weight as it is (a quantized kv_b_proj is dequantized by ATOM).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from atom.layers.mla import MLAAttentionSpec, kv_b_weight


def vllm_mla_cls() -> type[nn.Module]:
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    return MLAAttention


class KVBProjForVllm(nn.Module):
    """ATOM's kv_b_proj as vLLM's MLA layer reads it. Holds the layer without making it a child, so the
    weight stays one parameter of the model (under the model's own name)."""

    quant_method = None  # vLLM: "unquantized", the dense weight below is used as it is

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.__dict__["layer"] = layer
        self.params_dtype = layer.params_dtype
        self.input_size_per_partition = layer.input_size
        self.output_size_per_partition = layer.output_size

    @property
    def weight(self) -> torch.Tensor:
        return kv_b_weight(self.layer)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.layer(x), None


class VllmMLAAttention(nn.Module):
    """impl(q_nope [T, H, P], q_pe [T, H, R], kv_c [T, L], k_pe [T, R]) -> [T, H * V] on vLLM's MLA layer."""

    def __init__(self, spec: MLAAttentionSpec, kv_b_proj: nn.Module, cache_config, quant_config):
        super().__init__()
        numbers = re.findall(r"\d+", spec.prefix)
        if len(numbers) != 1 or int(numbers[0]) != spec.layer_idx:
            raise ValueError(f"MLA layer name {spec.prefix!r} must contain exactly one integer, the layer index "
                             f"{spec.layer_idx} (vLLM keys its KV cache by it)")
        self.spec = spec
        self.attn = vllm_mla_cls()(
            num_heads=spec.num_heads,
            scale=spec.scale,
            qk_nope_head_dim=spec.qk_nope_head_dim,
            qk_rope_head_dim=spec.qk_rope_head_dim,
            v_head_dim=spec.v_head_dim,
            q_lora_rank=spec.q_lora_rank,
            kv_lora_rank=spec.kv_lora_rank,
            kv_b_proj=KVBProjForVllm(kv_b_proj),
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=spec.prefix,
        )

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        s = self.spec
        num_tokens = q_nope.shape[0]
        q = torch.cat((q_nope, q_pe), dim=-1)
        return self.attn(q, kv_c, k_pe.view(num_tokens, 1, s.qk_rope_head_dim),
                         output_shape=(num_tokens, s.num_heads * s.v_head_dim))


class VllmMLAFactory:
    def __init__(self, cache_config, quant_config=None):
        self.cache_config = cache_config
        self.quant_config = quant_config

    def __call__(self, spec: MLAAttentionSpec, kv_b_proj: nn.Module) -> nn.Module:
        return VllmMLAAttention(spec, kv_b_proj, self.cache_config, self.quant_config)
