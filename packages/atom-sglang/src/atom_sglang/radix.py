"""ATOM's attention seam filled with SGLang's RadixAttention (model side).

Each ATOM attention layer gets a `RadixAttention`; SGLang's selected attention backend (ATOM's own "atom"
backend or any built-in one) then owns the KV pool and the metadata. The model wrapper publishes the
step's ForwardBatch through atom.forward_context, which is where the layer finds it. A layer with attention
sinks (GPT-OSS) keeps a reference to the model's sink tensor and passes it on every call (`sinks=`), as
SGLang's own GPT-OSS does: the backend (triton, fa3, trtllm_mha, atom, ...) takes it per call.
"""

from __future__ import annotations

import torch
from torch import nn

from atom.forward_context import get_forward_context
from atom.layers.attention import AttentionSpec


def sglang_sliding_window(window: int | None) -> int:
    """HF window (a query sees `window` keys, itself included) -> SGLang's (keys back from the query, -1 = off).

    SGLang's kernels let position i see keys j with i - j <= sliding_window_size (Gemma-2 passes
    config.sliding_window - 1 for the same reason).
    """
    return window - 1 if window else -1


def _radix_class():
    """RadixAttention that also takes atom's seam call `attn(q, k, v)` (ForwardBatch from the context).

    It is the layer SGLang sees: SGLang's model runner registers `layers[i].self_attn.attn` as the
    attention layer of each decoder layer (its prefill CUDA-graph path calls the backend with it), so the
    SGLang model puts this module at that path (see model_base.SGLangModelMixin).
    """
    from sglang.srt.layers.radix_attention import RadixAttention

    class AtomRadixAttention(RadixAttention):
        def __init__(self, spec: AttentionSpec, sinks: torch.Tensor | None = None):
            super().__init__(
                num_heads=spec.num_heads,
                head_dim=spec.head_dim,
                scaling=spec.scale,
                num_kv_heads=spec.num_kv_heads,
                layer_id=spec.layer_idx,
                logit_cap=float(spec.logit_softcap or 0.0),
                sliding_window_size=sglang_sliding_window(spec.sliding_window),
                prefix=spec.prefix,
            )
            self.spec = spec
            # The model's parameter (it owns and loads it); not registered here, or it would be listed twice.
            object.__setattr__(self, "sinks", sinks)

        def load_kv_scale(self, kind: str, value: float) -> None:
            """A checkpoint's per-tensor FP8 KV-cache scale, where SGLang's backends look for it: `k_scale`
            (a tensor; the pool divides by it when writing an FP8 cache) and `k_scale_float` (the kernels)."""
            if kind not in ("k", "v"):
                raise ValueError(f"KV-cache scale kind must be 'k' or 'v', got {kind!r}")
            setattr(self, f"{kind}_scale", torch.tensor(float(value), dtype=torch.float32))
            setattr(self, f"{kind}_scale_float", float(value))

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch=None, **kwargs):
            forward_batch = forward_batch if forward_batch is not None else get_forward_context()
            if forward_batch is None:
                raise RuntimeError("AtomRadixAttention needs SGLang's ForwardBatch in atom's forward context; "
                                   "call the model through its SGLang forward(input_ids, positions, forward_batch)")
            if self.sinks is not None:
                kwargs["sinks"] = self.sinks
            out = super().forward(q, k, v, forward_batch, **kwargs)
            return out.reshape(q.shape[0], self.spec.num_heads * self.spec.head_dim)

    return AtomRadixAttention


_cls = None


def radix_attention_factory(spec: AttentionSpec, sinks: torch.Tensor | None = None) -> nn.Module:
    global _cls
    _cls = _cls or _radix_class()
    return _cls(spec, sinks)
