"""Mixture of experts with biased projections and GPT-OSS's clamped SwiGLU ("swigluoai"), bf16 or MXFP4.

Expert weights are stacked as in atom.ops.moe: w13 [E, 2*I, H] (gate rows, then up rows) and w2 [E, H, I],
plus biases w13_bias [E, 2*I] and w2_bias [E, H]. With w13_scale / w2_scale given, the weights are MXFP4
(atom.ops.mxfp4): w13 uint8 [E, 2*I, H/2] with E8M0 scales [E, 2*I, H/32], w2 uint8 [E, H, I/2] with
scales [E, H, I/32]; they stay packed in memory and are dequantized per use.

Per (token t, choice k) with expert e and routing weight w:
  gate | up = x_t W13_e^T + b13_e
  h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),  g = min(gate, limit)
  y_t += w * (h W2_e^T + b2_e)
(transformers' GptOssExperts; the checkpoint interleaves gate and up columns, which the layer
de-interleaves at load time.)
"""

from __future__ import annotations

import torch

from atom.ops.mxfp4 import BLOCK, dequantize_mxfp4, pack_fragments
from atom.ops.registry import define_op, register


def swigluoai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU: the gate clamped from above, up from both sides, and 1 added to up."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


def expert_weight(w: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """One expert's dense weight: the stored tensor, or its MXFP4 dequantization."""
    if scale is None:
        return w[expert]
    return dequantize_mxfp4(w[expert], scale[expert], dtype)


def _experts_example(t, static):
    """Five tokens, top-2 of 4 experts, biases, clamps that engage; MXFP4 weights (random codes, scales
    around 2^-4) when static["mxfp4"], in fragment order only when also static["frag"]. The layer's SwiGLU
    alpha / limit when static gives them (a binding may compute with fixed ones), the activations then scaled
    so that the clamp still engages; else 1.702 / 1.2."""
    hidden, inter, experts, tokens, top_k = 64, 64, 4, 5, 2
    alpha, limit = float(static.get("alpha", 1.702)), float(static.get("limit", 1.2))
    ids = torch.stack([t.randperm(experts)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(t.randn(tokens, top_k, dtype=torch.float32), dim=-1)
    x = t.randn(tokens, hidden, scale=max(1.0, limit / 1.2))
    b13, b2 = t.randn(experts, 2 * inter, scale=0.3), t.randn(experts, hidden, scale=0.3)
    if not static.get("mxfp4"):
        return (x, t.randn(experts, 2 * inter, hidden, scale=hidden**-0.5),
                t.randn(experts, hidden, inter, scale=inter**-0.5), b13, b2, weights, ids, alpha, limit)

    def packed(rows, k):
        codes = (t.rand(experts, rows, k // 2) * 256).to(torch.uint8)
        scales = (t.rand(experts, rows, k // BLOCK) * 3 + 122).to(torch.uint8)
        return codes, scales

    (w13, s13), (w2, s2) = packed(2 * inter, hidden), packed(hidden, inter)
    if static.get("frag"):  # the fragment order alone, as ATOM_MX_FRAG leaves the layer (Triton only)
        empty = w13.new_empty(0)
        return (x, empty, empty, b13, b2, weights, ids, alpha, limit, empty, empty,
                pack_fragments(w13, s13, halves=2), pack_fragments(w2, s2))
    return (x, w13, w2, b13, b2, weights, ids, alpha, limit, s13, s2)


# weight_args: what a binding may hold in its own layout (aiter pads and shuffles them); the output has x's shape
# whatever that layout is
define_op("fused_experts_swigluoai", example=_experts_example,
          weight_args=("w13", "w2", "w13_bias", "w2_bias", "w13_scale", "w2_scale"),
          fake=lambda x, *args, **kwargs: x.new_empty(x.shape))


# Reads per-expert token counts on the host: neither capturable nor traceable (a custom op under compile).
@register("fused_experts_swigluoai", "torch", cuda_graph=False, traceable=False)
def fused_experts_swigluoai(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_bias: torch.Tensor,
    w2_bias: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    alpha: float,
    limit: float,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_frag: torch.Tensor | None = None,
    w2_frag: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k w_k * expert_{id_k}(x), looping over the experts that received tokens. w13_frag / w2_frag (a
    fragment-order copy of the MXFP4 weights for the Triton kernels, atom.ops.mxfp4.pack_fragments) are not read:
    the reference dequantizes the checkpoint layout, so it refuses a call where only the fragments are left.

    Rounding as the kernels: each projection (plus its bias) in the activation dtype, the activation
    from those rounded values, the weighted sum over k in float32."""
    if w13.numel() == 0 and w13_frag is not None:
        raise ValueError("fused_experts_swigluoai (torch reference): the experts are in fragment order only "
                         "(ATOM_MX_FRAG dropped the checkpoint layout), which only the Triton kernels read")
    num_experts = w13.shape[0]
    dtype = x.dtype
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of = order // topk_ids.shape[1]
    weight_of = topk_weights.reshape(-1)[order].float()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token_of[start : start + n]
        gate_up = ((x[tok] @ expert_weight(w13, w13_scale, e, dtype).t()).float() + w13_bias[e].float()).to(dtype)
        gate, up = gate_up.float().chunk(2, dim=-1)
        h = swigluoai(gate, up, alpha, limit).to(dtype)
        y = ((h @ expert_weight(w2, w2_scale, e, dtype).t()).float() + w2_bias[e].float()).to(dtype)
        out.index_add_(0, tok, y.float() * weight_of[start : start + n, None])
        start += n
    return out.to(dtype)
