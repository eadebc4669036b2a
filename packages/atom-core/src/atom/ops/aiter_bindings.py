"""AITER (amd-aiter) implementations of ATOM's ops, for ROCm GPUs.

UNVERIFIED ON HARDWARE: these wrappers were written against amd-aiter 0.1.7's Python API and kernel
sources (and vLLM's ROCm backends, for how they are called) without an AMD GPU to run them on. So every
one is registered unverified: the registry uses it only after it passes a numerical self-check against
the torch reference on the machine that runs it (tiny inputs, at model build; atom.ops.self_check), and
otherwise falls back to the triton implementation with a WARNING. The aiter tests in tests/test_registry.py
and tests/test_aiter_fp8.py compare them with the torch references at more shapes and run only on ROCm.

The registry imports this module only when the aiter backend is selected, i.e. on ROCm where
`import aiter` works (aiter looks for hipconfig at import; it is never imported, or faked, elsewhere).
Each wrapper keeps the torch reference's signature and return convention (new tensors, inputs left
untouched) and adapts to aiter's out-parameter style inside. What a kernel is known not to handle is
declared at registration (dtypes, and `supports` guards on the layer's build-time properties, kept in
atom.ops.aiter_support so they are tested without aiter), so the registry picks another implementation
for that layer at build time; a few call-time cases (a KV cache of another dtype) still go to the torch
reference.

Mapped: rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul, gelu_tanh_and_mul,
moe_topk_softmax, fused_experts (silu, 16-bit, expert weights pre-shuffled once after loading),
reshape_and_cache (16-bit and FP8 caches), paged_attention (decode through paged_attention_v1 on the NHD
cache; prefill/varlen through flash_attn_varlen_func on gathered K/V; FP8 caches read with k_scale /
v_scale; layers with attention sinks are declared unsupported, so they get ATOM's Triton kernel, which has
them), moe_grouped_topk (biased_grouped_topk / grouped_topk), and FP8:
- fp8_linear: activations quantized by ATOM's Triton kernels (bit-exact with the reference's convention on
  e4m3fn and e4m3fnuz), then aiter.gemm_a8w8_blockscale (128 x 128 block scales) or aiter.gemm_a8w8
  (per-token x per-channel scales; per-tensor checkpoints are stored per channel);
- fp8_fused_experts: aiter.fused_moe with QuantType.per_128x128 or per_Token, experts shuffled in (16, 16)
  tiles once after loading; e4m3fn GPUs only (why: atom.ops.aiter_support);
- fused_experts_swigluoai with MXFP4 experts (GPT-OSS): aiter.fused_moe's a16w4 path (QuantType.per_1x32,
  ActivationType.Swiglu, bias1 / bias2), experts padded to multiples of 256 and shuffled once after loading;
  gfx950 only, as in the original ATOM (MI300 runs ATOM's Triton MXFP4 kernels).
Weights reach the FP8 bindings in the GPU's own FP8 type: the quantization seam (atom.quantization.fp8)
converts e4m3fn checkpoints to e4m3fnuz on MI300 at load (scale doubled, -0 remapped), whatever backend runs.
Not mapped (triton, else torch reference): sample, qk_norm_rope_cache, dense GPT-OSS experts, the mla_*
ops (aiter's MLA decode wants page-size-1 indptr metadata, not ATOM's block tables), fp8_quant_group and
fp8_quant_token (aiter's quantization kernels scale by amax * (1 / fp8_max), 240 on e4m3fnuz, and multiply
by the reciprocal scale: their q and scales are not ATOM's, which the self-check of those ops compares
exactly; ATOM's Triton kernels serve them, and the AITER GEMMs above consume those).
"""

from __future__ import annotations

import functools

import aiter
import torch

from atom import platform
from atom.ops import aiter_support
from atom.ops import attention as ref_attention
from atom.ops.aiter_support import HALF as _HALF
from atom.ops.quant_fp8 import FP8_DTYPES, check_experts_args, check_linear_args, default_fp8_dtype
from atom.ops.registry import implementation, register


@functools.cache
def _native_fp8() -> torch.dtype:
    """The FP8 type aiter's kernels read on this GPU (e4m3fnuz on gfx94x, e4m3fn on gfx950)."""
    return default_fp8_dtype()


def _rows(x: torch.Tensor) -> torch.Tensor:
    # aiter's norm kernels are 2-D ([M, N]); ATOM also norms [T, H, D] (qk-norm).
    return x.reshape(-1, x.shape[-1]).contiguous()


@register("rms_norm", "aiter")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return aiter.rms_norm(_rows(x), weight, eps).view(x.shape)


@register("fused_add_rms_norm", "aiter")
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x2, res2 = _rows(x), _rows(residual)
    out, res_out = torch.empty_like(x2), torch.empty_like(x2)
    aiter.rmsnorm2d_fwd_with_add(out, x2, res2, res_out, weight, eps, 0)
    return out.view(x.shape), res_out.view(x.shape)


def _gated(kernel, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
    kernel(out, x.contiguous())  # act(x[..., :d]) * x[..., d:], as the reference
    return out


@register("silu_and_mul", "aiter", dtypes=_HALF)  # aiter's gate kernels dispatch on fp16/bf16 only
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gated(aiter.silu_and_mul, x)


@register("gelu_tanh_and_mul", "aiter", dtypes=_HALF)
def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gated(aiter.gelu_tanh_and_mul, x)


# The rope table is float32 [P, rot_dim] = cat(cos, sin); aiter wants separate contiguous cos and sin
# tables in q's dtype. Converted once per table (dynamic NTK builds new tables, hence a small cache).
_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _cos_sin(cos_sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (cos_sin.data_ptr(), cos_sin._version, tuple(cos_sin.shape), dtype)
    if key not in _ROPE_TABLES:
        if len(_ROPE_TABLES) >= 8:
            _ROPE_TABLES.pop(next(iter(_ROPE_TABLES)))
        cos, sin = cos_sin.to(dtype).chunk(2, dim=-1)
        _ROPE_TABLES[key] = (cos.contiguous(), sin.contiguous())
    return _ROPE_TABLES[key]


@register("rotary_embedding", "aiter")
def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    head_dim: int,
    cos_sin: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # The kernel rotates in place (first rot_dim = 2 * cos.shape[-1] channels of each head, rest kept);
    # rotate copies so callers keep the reference's "returns new tensors" contract.
    cos, sin = _cos_sin(cos_sin, q.dtype)
    q, k = q.contiguous().clone(), k.contiguous().clone()
    aiter.rotary_embedding_fwd(positions.long().contiguous(), q, k, head_dim, cos, sin, is_neox, False)
    return q, k


@register("moe_topk_softmax", "aiter")
def moe_topk_softmax(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = router_logits.shape[0]
    dev = router_logits.device
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=dev)
    token_expert = torch.empty(tokens, top_k, dtype=torch.int32, device=dev)
    aiter.topk_softmax(weights, ids, token_expert, router_logits.contiguous(), renormalize)
    return weights, ids.long()  # int64 like the reference, so any fused_experts can consume it


def shuffle_expert_weights(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """aiter's CK MoE reads expert weights in a (16, 16)-shuffled layout (as vLLM shuffles them once after
    loading). Applied once by the layer after loading (atom.quantization), in place of the checkpoint
    layout: no second copy of the experts is kept."""
    from aiter.ops.shuffle import shuffle_weight

    return shuffle_weight(w13.contiguous(), layout=(16, 16)), shuffle_weight(w2.contiguous(), layout=(16, 16))


@register("fused_experts", "aiter", dtypes=_HALF, supports=aiter_support.moe_supports,
          prepare_weights=shuffle_expert_weights)
def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """w13 and w2 in the shuffled layout of shuffle_expert_weights."""
    from aiter import ActivationType, QuantType
    from aiter.fused_moe import fused_moe

    return fused_moe(x.contiguous(), w13, w2, topk_weights.float().contiguous(),
                     topk_ids.to(torch.int32).contiguous(), None, ActivationType.Silu, QuantType.No)


_ONE = {}


def _unit_scale(device: torch.device) -> torch.Tensor:
    if device not in _ONE:
        _ONE[device] = torch.ones((), dtype=torch.float32, device=device)
    return _ONE[device]


def _kv_supports(static) -> str | None:
    return aiter_support.kv_cache_supports(static, _native_fp8())


def _scales(key: torch.Tensor, cache: torch.Tensor, k_scale, v_scale) -> tuple[str, torch.Tensor, torch.Tensor]:
    """aiter's kv_cache_dtype argument and the (k, v) scale tensors for a cache: "fp8" with the cache's
    per-tensor scales (1.0 when it has none) for an FP8 cache, "auto" (scales unused) otherwise."""
    one = _unit_scale(key.device)
    if cache.dtype in FP8_DTYPES:
        return "fp8", (one if k_scale is None else k_scale.float()), (one if v_scale is None else v_scale.float())
    return "auto", one, one


@register("reshape_and_cache", "aiter", dtypes=_HALF, supports=_kv_supports)
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    # "flash" layout = [num_blocks, block_size, num_kv_heads, head_dim], ATOM's; negative slots skipped.
    # An FP8 cache stores fp8(x * (1 / scale)) in the GPU's FP8 type; a cache of any other dtype (not one
    # the layer was resolved for) takes the torch reference.
    if k_cache.dtype != key.dtype and k_cache.dtype != _native_fp8():
        return ref_attention.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping,
                                               k_scale=k_scale, v_scale=v_scale)
    kind, ks, vs = _scales(key, k_cache, k_scale, v_scale)
    aiter.reshape_and_cache_flash(key.contiguous(), value.contiguous(), k_cache, v_cache, slot_mapping.long(),
                                  kind, ks, vs)


_PARTITION = 256  # paged_attention_v1 partition size, as vLLM's ROCm backend uses
_MIN_DECODE_HEAD_DIM = 64  # the ll4mi decode kernel needs head_dim >= 16 * NWARPS


def _decode(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window,
            logit_softcap, max_seq_len, k_scale, v_scale):
    num_seqs, (_, num_heads, head_dim) = seq_lens.shape[0], q.shape
    partitions = -(-max_seq_len // _PARTITION)
    elem = q.element_size()
    workspace = torch.empty(num_seqs * num_heads * partitions * head_dim * elem + 2 * num_seqs * num_heads
                            * partitions * 4, dtype=torch.uint8, device=q.device)
    out = torch.empty_like(q)
    kind, ks, vs = _scales(q, k_cache, k_scale, v_scale)
    aiter.paged_attention_v1(
        out, workspace, q.contiguous(), k_cache, v_cache, scale, block_tables.to(torch.int32),
        query_start_loc[:num_seqs].to(torch.int32), seq_lens.to(torch.int32), max_seq_len, None, kind, "NHD",
        float(logit_softcap or 0.0), ks, vs, None, _PARTITION, 1, int(sliding_window or 0))
    return out


def _varlen(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window,
            logit_softcap, max_query_len, max_seq_len, k_scale, v_scale):
    # Each sequence's context gathered from the paged cache into packed [total_k, Hkv, D] in q's dtype (FP8
    # caches dequantized), then one varlen flash-attention call, causal aligned to the end of each sequence
    # (ATOM's queries are the last tokens of their sequence).
    k, v, cu_k = aiter_support.gather_context(k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, q.dtype)
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
    return aiter.flash_attn_varlen_func(
        q.contiguous(), k, v, query_start_loc.to(torch.int32), cu_k, max_query_len, max_seq_len,
        softmax_scale=scale, logits_soft_cap=float(logit_softcap or 0.0), causal=True, window_size=window)


def _attention_supports(static) -> str | None:
    return aiter_support.attention_supports(static, _native_fp8())


@register("paged_attention", "aiter", dtypes=_HALF, supports=_attention_supports)
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    if sinks is not None:  # _attention_supports keeps sink layers away; a direct call is a caller's bug
        raise ValueError("the AITER paged_attention binding has no attention sinks (resolve with "
                         "static={'has_sinks': True} to get an implementation that has them)")
    args = (q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window, logit_softcap)
    if q.dtype not in _HALF or k_cache.dtype not in (q.dtype, _native_fp8()):
        return ref_attention.paged_attention(*args, max_query_len, max_seq_len, k_scale=k_scale, v_scale=v_scale)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if max_query_len == 1 and q.shape[-1] >= _MIN_DECODE_HEAD_DIM:
        return _decode(*args, max_seq_len, k_scale, v_scale)
    return _varlen(*args, max_query_len, max_seq_len, k_scale, v_scale)


# ---- DeepSeek's group-limited top-k routing (atom.ops.moe_routing), as vLLM's ROCm path calls aiter ----
def _grouped_topk_supports(static) -> str | None:
    bias, score = static.get("correction_bias"), static.get("group_score")
    if bias and (static.get("scoring") != "sigmoid" or score != "top2_sum"):
        return "a correction bias with other than sigmoid scores and top-2-sum group scores (aiter's " \
               "biased_grouped_topk is DeepSeek-V3's router)"
    if bias is False and score not in (None, "max"):
        return f"group score {score!r} without a correction bias (aiter's grouped_topk scores groups by their max)"
    return None


@register("moe_grouped_topk", "aiter", supports=_grouped_topk_supports)
def moe_grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    num_groups: int,
    topk_group: int,
    scoring: str,
    group_score: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    from atom.ops.moe_routing import append_shared

    tokens = router_logits.shape[0]
    dev = router_logits.device
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=dev)
    logits = router_logits.contiguous()
    if correction_bias is not None:
        aiter.biased_grouped_topk(logits, correction_bias.to(logits.dtype), weights, ids, num_groups, topk_group,
                                  renormalize, routed_scaling_factor)
    else:
        aiter.grouped_topk(logits, weights, ids, num_groups, topk_group, renormalize, scoring == "softmax",
                           routed_scaling_factor)
    return append_shared(weights, ids.long(), router_logits.shape[1], num_shared)


# ---- FP8 linear and MoE (atom.ops.quant_fp8's ops; the guards and why: atom.ops.aiter_support) ----
@functools.cache
def _triton_activation_quant():
    """ATOM's Triton activation quantization kernels (per 1 x group, per token): their q and scales are the
    reference's bit for bit, on e4m3fn and e4m3fnuz, so the AITER GEMMs below compute ATOM's FP8 linear.
    None when Triton cannot run here."""
    if not platform.backend_status("triton")[0]:
        return None
    group, token = implementation("fp8_quant_group", "triton"), implementation("fp8_quant_token", "triton")
    return None if group is None or token is None else (group.fn, token.fn)


def _fp8_linear_supports(static) -> str | None:
    why = aiter_support.fp8_linear_supports(static, _native_fp8())
    if why is None and _triton_activation_quant() is None:
        why = ("it quantizes activations with ATOM's Triton kernels, which cannot run here: "
               f"{platform.backend_status('triton')[1]}")
    return why


@register("fp8_linear", "aiter", dtypes=_HALF, supports=_fp8_linear_supports)
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: list[int] | None = None,
) -> torch.Tensor:
    check_linear_args(x, weight, weight_scale, bias, block_size)
    why = _fp8_linear_supports({"fp8_dtype": weight.dtype, "block_size": block_size})
    if why is not None:  # a layer never gets here (the registry checked it at build); a direct call may
        raise ValueError(f"the AITER fp8_linear binding cannot take {why}")
    quant_group, quant_token = _triton_activation_quant()
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    if block_size is not None:
        xq, xs = quant_group(x2, int(block_size[1]), weight.dtype)  # xs [M, K / 128], row-major as CK reads it
        y = aiter.gemm_a8w8_blockscale(xq, weight, xs, weight_scale, dtype=x.dtype)
        if bias is not None:
            y += bias.to(y.dtype)
    else:
        xq, xs = quant_token(x2, weight.dtype)  # xs [M, 1]
        # gemm_a8w8's epilogue: acc * w_scale[n] * x_scale[m] (+ bias[n], in the output dtype), in float32
        w_scale = weight_scale.reshape(1, -1)
        if w_scale.shape[1] != n:  # per-tensor
            w_scale = w_scale.expand(1, n)
        y = aiter.gemm_a8w8(xq, weight, xs, w_scale.contiguous(),
                            None if bias is None else bias.to(x.dtype).contiguous(), dtype=x.dtype)
    return y.view(*x.shape[:-1], n)


def _fp8_experts_supports(static) -> str | None:
    return aiter_support.fp8_experts_supports(static, _native_fp8())


@register("fp8_fused_experts", "aiter", dtypes=_HALF, supports=_fp8_experts_supports,
          prepare_weights=shuffle_expert_weights)
def fp8_fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    block_size: list[int] | None = None,
) -> torch.Tensor:
    """w13 [E, 2I, H] and w2 [E, H, I] in the shuffled layout of shuffle_expert_weights; scales as the
    reference takes them: blocks [E, 2I / 128, H / 128] and [E, H / 128, I / 128] (aiter's per_128x128
    layout once I is a multiple of 128, which the guard asks), or per channel [E, 2I, 1] and [E, H, 1]
    (aiter's per_Token). aiter quantizes x and the intermediate activation itself."""
    from aiter import ActivationType, QuantType
    from aiter.fused_moe import fused_moe

    check_experts_args(x, w13, w2, w13_scale, w2_scale, block_size)
    why = _fp8_experts_supports({"activation": activation, "fp8_dtype": w13.dtype, "block_size": block_size,
                                 "hidden_size": w13.shape[2], "intermediate_size": w2.shape[2]})
    if why is not None:
        raise ValueError(f"the AITER fp8_fused_experts binding cannot take {why}")
    quant = QuantType.per_128x128 if block_size is not None else QuantType.per_Token
    if block_size is None:
        w13_scale, w2_scale = w13_scale.reshape(*w13.shape[:2], 1), w2_scale.reshape(*w2.shape[:2], 1)
    return fused_moe(x.contiguous(), w13, w2, topk_weights.float().contiguous(),
                     topk_ids.to(torch.int32).contiguous(), None, ActivationType.Silu, quant,
                     w1_scale=w13_scale.contiguous(), w2_scale=w2_scale.contiguous())


@functools.cache
def _gfx() -> str:
    """The GPU's gfx name (gfx942 on MI300, gfx950 on MI350), as ROCm's torch reports it."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).gcnArchName.split(":")[0]


def _mxfp4_experts_supports(static) -> str | None:
    return aiter_support.mxfp4_experts_supports(static, _gfx())


def prepare_mxfp4_experts(w13, w2, w13_bias, w2_bias, w13_scale, w2_scale) -> tuple[torch.Tensor, ...]:
    """GPT-OSS's MXFP4 experts in aiter's a16w4 layout, once after loading (in place of ATOM's): H and I padded to
    multiples of 256 (aiter_support.pad_mxfp4_experts), the codes as fp4x2 and the scales as E8M0 in aiter's
    shuffled tiles (gate half, then up half, as its kernels read w13), the biases float32."""
    from aiter import dtypes
    from aiter.ops.shuffle import shuffle_scale_a16w4, shuffle_weight_a16w4

    w13, w2, b13, b2, s13, s2 = aiter_support.pad_mxfp4_experts(w13, w2, w13_bias, w2_bias, w13_scale, w2_scale)
    experts = w13.shape[0]

    def scales(s: torch.Tensor, gate_up: bool) -> torch.Tensor:
        flat = shuffle_scale_a16w4(s.reshape(-1, s.shape[-1]).contiguous(), experts, gate_up)
        return flat.view(dtypes.fp8_e8m0).view(s.shape)

    return (shuffle_weight_a16w4(w13.view(dtypes.fp4x2), 16, True),
            shuffle_weight_a16w4(w2.view(dtypes.fp4x2), 16, False), b13, b2, scales(s13, True), scales(s2, False))


@register("fused_experts_swigluoai", "aiter", dtypes=_HALF, supports=_mxfp4_experts_supports,
          prepare_weights=prepare_mxfp4_experts)
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
    """The experts' weights, scales and biases in the layout of prepare_mxfp4_experts (H_pad = w2.shape[1]): x is
    zero-padded to H_pad for aiter and its output cut back to H. The fragment-order copies are Triton's (unused)."""
    from aiter import ActivationType, QuantType
    from aiter.fused_moe import fused_moe

    if w13_scale is None or w2_scale is None:
        raise ValueError("the AITER fused_experts_swigluoai binding runs MXFP4 experts only (no scales given)")
    if (float(alpha), float(limit)) != aiter_support.AITER_SWIGLU:
        raise ValueError(f"the AITER fused_experts_swigluoai binding computes SwiGLU with alpha / limit "
                         f"{aiter_support.AITER_SWIGLU}, not ({alpha}, {limit})")
    hidden = x.shape[1]
    pad = w2.shape[1] - hidden
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x.contiguous()
    # intermediate_pad 0: aiter then also computes the padded I columns, zeros that SwiGLU keeps zero (the real I
    # is not in the padded tensors' shapes); hidden_pad lets it skip the padded K of stage 1
    out = fused_moe(xp, w13, w2, topk_weights.float().contiguous(), topk_ids.to(torch.int32).contiguous(), None,
                    ActivationType.Swiglu, QuantType.per_1x32, w1_scale=w13_scale, w2_scale=w2_scale,
                    hidden_pad=pad, intermediate_pad=0, bias1=w13_bias, bias2=w2_bias)
    return out[:, :hidden].contiguous() if pad else out
