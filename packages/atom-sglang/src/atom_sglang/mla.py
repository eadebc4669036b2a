"""ATOM's MLA seam (atom.layers.mla) filled with SGLang's RadixAttention over SGLang's MLA pool.

SGLang gives DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (by architecture name) an `MLATokenToKVPool`: one
[size, 1, L + R] latent buffer per layer (its key buffer; the value buffer is its first L columns). The layer
attends in the absorbed form, as SGLang's own DeepSeek model does with the backends that take a concatenated
query (triton, torch_native): `attn_mqa = RadixAttention(H, L + R, scale, num_kv_heads=1, layer_id,
v_head_dim=L)` called with
    q = [q_nope W_UK | q_pe]  [T, H, L + R],   k = [kv_c | k_pe]  [T, 1, L + R],   v = kv_c  [T, 1, L]
writes k into the pool (the backend's set_kv_buffer) and returns o_lat [T, H * L], which W_UV takes back to
[T, H, V]. W_UK / W_UV are views of kv_b_proj's dense weight (atom.layers.mla.kv_b_weight). Prefill runs the
same absorbed form (every backend reads the latent pool for it; SGLang's expanded MHA prefill over
kv_b_proj is a later speed lever). SGLang's model runner finds the layer as `self_attn.attn_mqa`
(model_base.SGLangModelMixin puts it there).

FP8 latent cache (`--kv-cache-dtype fp8_e4m3`): SGLang's MLA pool holds e4m3 rows; the backend writes and reads
them. A checkpoint's latent scale (the layer's k_scale, vLLM's and SGLang's reading for MLA) goes where SGLang's
backends look for it: `attn_mqa.k_scale` (a tensor: SGLang's triton backend divides the row by it before the
pool's write) and `k_scale_float` (the descale its kernels apply); v_scale is set to the same value, because
the values are the same latent row (SGLang's kernels descale only when both are set). Without checkpoint
scales both stay None: the pool stores fp8(row), as SGLang's own DeepSeek does. SGLang's torch_native backend
(the CPU path) applies no scales at all (neither on write nor on read), for its own models as for ATOM's.
"""

from __future__ import annotations

import torch
from torch import nn

from atom.forward_context import get_forward_context
from atom.layers.kv_cache import check_kv_scale
from atom.layers.mla import MLAAttentionSpec, kv_b_weight
from atom.ops.mla import split_kv_b


class SGLangMLAAttention(nn.Module):
    """impl(q_nope [T, H, P], q_pe [T, H, R], kv_c [T, L], k_pe [T, R]) -> [T, H * V] over SGLang's MLA pool."""

    def __init__(self, spec: MLAAttentionSpec, kv_b_proj: nn.Module):
        super().__init__()
        from sglang.srt.layers.radix_attention import RadixAttention

        self.spec = spec
        self.__dict__["kv_b_proj"] = kv_b_proj  # the model's layer; not a second copy of its weight
        self.attn_mqa = RadixAttention(spec.num_heads, spec.kv_lora_rank + spec.qk_rope_head_dim, spec.scale,
                                       num_kv_heads=1, layer_id=spec.layer_idx, v_head_dim=spec.kv_lora_rank,
                                       prefix=spec.prefix)

    def load_kv_scale(self, kind: str, value: float) -> None:
        """The checkpoint's per-tensor FP8 scale of this layer's latent cache: "k" (the latent row's scale) sets
        both of RadixAttention's scales; "v" has no tensor of its own in MLA and is ignored, as in vLLM."""
        value = check_kv_scale(self.spec.prefix, kind, value, torch.float8_e4m3fn)  # as checkpoints give it, like SGLang
        if kind == "k":
            for name in ("k", "v"):
                setattr(self.attn_mqa, f"{name}_scale", torch.tensor(value, dtype=torch.float32))
                setattr(self.attn_mqa, f"{name}_scale_float", value)

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        forward_batch = get_forward_context()
        if forward_batch is None:
            raise RuntimeError("SGLangMLAAttention needs SGLang's ForwardBatch in atom's forward context; call the "
                               "model through its SGLang forward(input_ids, positions, forward_batch)")
        s = self.spec
        num_tokens = q_nope.shape[0]
        w_uk, w_uv = split_kv_b(kv_b_weight(self.kv_b_proj), s.num_heads, s.qk_nope_head_dim)  # [H, P|V, L]
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk.to(q_nope.dtype))  # [H, T, L]
        q = torch.cat((q_lat.transpose(0, 1), q_pe), dim=-1)  # [T, H, L + R]
        k = torch.cat((kv_c, k_pe), dim=-1).unsqueeze(1)  # [T, 1, L + R]: the latent row the pool keeps
        o_lat = self.attn_mqa(q, k, kv_c.unsqueeze(1), forward_batch)
        o_lat = o_lat.view(num_tokens, s.num_heads, s.kv_lora_rank).transpose(0, 1)  # [H, T, L]
        out = torch.bmm(o_lat, w_uv.to(o_lat.dtype).transpose(1, 2))  # [H, T, V]
        return out.transpose(0, 1).reshape(num_tokens, s.num_heads * s.v_head_dim)


def sglang_mla_factory(spec: MLAAttentionSpec, kv_b_proj: nn.Module) -> nn.Module:
    return SGLangMLAAttention(spec, kv_b_proj)
