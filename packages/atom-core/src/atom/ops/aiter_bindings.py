"""AITER (amd-aiter) implementations of ATOM's ops, for ROCm GPUs.

UNVERIFIED ON HARDWARE: these wrappers were written against amd-aiter 0.1.7's Python API and kernel
sources (and vLLM's ROCm backends, for how they are called) without an AMD GPU to run them on. So every
one is registered unverified: the registry uses it only after it passes a numerical self-check against
the torch reference on the machine that runs it (tiny inputs, at model build; atom.ops.self_check), and
otherwise falls back to the triton implementation with a WARNING. The aiter tests in tests/test_registry.py
compare them with the torch references at more shapes and run only on ROCm.

The registry imports this module only when the aiter backend is selected, i.e. on ROCm where
`import aiter` works (aiter looks for hipconfig at import; it is never imported, or faked, elsewhere).
Each wrapper keeps the torch reference's signature and return convention (new tensors, inputs left
untouched) and adapts to aiter's out-parameter style inside. What a kernel is known not to handle is
declared at registration (dtypes; for fused_experts the activation and shapes), so the registry picks
another implementation for that layer at build time; a few call-time cases (a KV cache of another dtype)
still go to the torch reference.

Mapped: rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul, gelu_tanh_and_mul,
moe_topk_softmax, fused_experts (silu, 16-bit, expert weights pre-shuffled once after loading),
reshape_and_cache, paged_attention (decode through paged_attention_v1 on the NHD cache; prefill/varlen
through flash_attn_varlen_func on gathered K/V; layers with attention sinks are declared unsupported, so
they get ATOM's Triton kernel, which has them), moe_grouped_topk (biased_grouped_topk / grouped_topk).
Not mapped (triton, else torch reference): sample, qk_norm_rope_cache, fused_experts_swigluoai, the mla_*
ops (aiter's MLA decode wants page-size-1 indptr metadata, not ATOM's block tables).
"""

from __future__ import annotations

import aiter
import torch

from atom.ops import attention as ref_attention
from atom.ops.registry import register

_HALF = (torch.float16, torch.bfloat16)


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


def _moe_supports(static) -> str | None:
    # aiter's ActivationType.Gelu is not documented as the tanh approximation, so gelu_tanh stays elsewhere
    # rather than risking a silent numerics change; the (16, 16) shuffle tiles need these divisibilities.
    if static.get("activation", "silu") != "silu":
        return f"activation {static['activation']!r} (the aiter MoE kernel is wired for silu only)"
    if static.get("expert_parallel"):
        return "expert parallelism (the binding does not pass aiter an expert mask for other ranks' experts)"
    hidden, inter = static.get("hidden_size"), static.get("intermediate_size")
    if hidden is not None and inter is not None and (hidden % 32 or inter % 32):
        return f"hidden {hidden} / intermediate {inter} are not multiples of 32 (aiter's shuffled layout)"
    return None


def shuffle_expert_weights(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """aiter's CK MoE reads expert weights in a (16, 16)-shuffled layout (as vLLM shuffles them once after
    loading). Applied once by the layer after loading (atom.quantization), in place of the checkpoint
    layout: no second copy of the experts is kept."""
    from aiter.ops.shuffle import shuffle_weight

    return shuffle_weight(w13.contiguous(), layout=(16, 16)), shuffle_weight(w2.contiguous(), layout=(16, 16))


@register("fused_experts", "aiter", dtypes=_HALF, supports=_moe_supports, prepare_weights=shuffle_expert_weights)
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
    # AITER's FP8 cache paths (kv_cache_dtype "fp8" with scale tensors) are not bound yet: an FP8 cache
    # falls back to the Triton kernels, which write and read it (and are capturable).
    dtype = static.get("kv_cache_dtype")
    if dtype is not None and dtype not in _HALF:
        return f"a {dtype} KV cache is not bound to AITER's cache kernels yet"
    return None


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
    # FP8 caches (dtype differs) take the torch reference until an AITER FP8 path passes its self-check.
    if key.dtype != k_cache.dtype:
        return ref_attention.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping,
                                               k_scale=k_scale, v_scale=v_scale)
    one = _unit_scale(key.device)
    aiter.reshape_and_cache_flash(key.contiguous(), value.contiguous(), k_cache, v_cache, slot_mapping.long(),
                                  "auto", one, one)


_PARTITION = 256  # paged_attention_v1 partition size, as vLLM's ROCm backend uses
_MIN_DECODE_HEAD_DIM = 64  # the ll4mi decode kernel needs head_dim >= 16 * NWARPS


def _decode(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window,
            logit_softcap, max_seq_len):
    num_seqs, (_, num_heads, head_dim) = seq_lens.shape[0], q.shape
    partitions = -(-max_seq_len // _PARTITION)
    elem = q.element_size()
    workspace = torch.empty(num_seqs * num_heads * partitions * head_dim * elem + 2 * num_seqs * num_heads
                            * partitions * 4, dtype=torch.uint8, device=q.device)
    out = torch.empty_like(q)
    one = _unit_scale(q.device)
    aiter.paged_attention_v1(
        out, workspace, q.contiguous(), k_cache, v_cache, scale, block_tables.to(torch.int32),
        query_start_loc[:num_seqs].to(torch.int32), seq_lens.to(torch.int32), max_seq_len, None, "auto", "NHD",
        float(logit_softcap or 0.0), one, one, None, _PARTITION, 1, int(sliding_window or 0))
    return out


def _varlen(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window,
            logit_softcap, max_query_len, max_seq_len):
    # Gather each sequence's context from the paged cache into packed [total_k, Hkv, D] (what vLLM's
    # ROCm backend does for chunked prefill), then one varlen flash-attention call, causal aligned to
    # the end of each sequence (ATOM's queries are the last tokens of their sequence).
    block_size = k_cache.shape[1]
    lens = seq_lens.long()
    cu_k = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = lens.cumsum(0)
    seq_of = torch.repeat_interleave(torch.arange(lens.shape[0], device=q.device), lens)
    pos = torch.arange(seq_of.shape[0], device=q.device) - cu_k[:-1].long()[seq_of]
    slots = block_tables.long()[seq_of, pos // block_size] * block_size + pos % block_size
    k = k_cache.flatten(0, 1)[slots]
    v = v_cache.flatten(0, 1)[slots]
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
    return aiter.flash_attn_varlen_func(
        q.contiguous(), k, v, query_start_loc.to(torch.int32), cu_k, max_query_len, max_seq_len,
        softmax_scale=scale, logits_soft_cap=float(logit_softcap or 0.0), causal=True, window_size=window)


def _attention_supports(static) -> str | None:
    if static.get("has_sinks"):
        return "the mapped AITER attention kernels have no attention sinks"
    return _kv_supports(static)


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
    if q.dtype not in _HALF or k_cache.dtype != q.dtype:
        return ref_attention.paged_attention(*args, max_query_len, max_seq_len, k_scale=k_scale, v_scale=v_scale)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if max_query_len == 1 and q.shape[-1] >= _MIN_DECODE_HEAD_DIM:
        return _decode(*args, max_seq_len)
    return _varlen(*args, max_query_len, max_seq_len)


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
) -> tuple[torch.Tensor, torch.Tensor]:
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
    return weights, ids.long()
