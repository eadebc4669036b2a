"""The parts of the AITER bindings that do not need `aiter`: what its kernels can take, and pure-torch helpers.

atom.ops.aiter_bindings imports `aiter`, which only imports on ROCm. The build-time guards (`supports` of
each binding: None, or the reason the registry logs when it picks another implementation for a layer) and
the layout helpers live here instead, so they are tested on every machine. Each guard takes the GPU's own
FP8 type (`native`: float8_e4m3fnuz on MI300 / gfx94x, float8_e4m3fn on MI350 / gfx950; what aiter's
kernels read FP8 bytes as, whatever torch dtype the tensor carries).

What the guards encode (read in amd-aiter 0.1.7's sources, see docs/ARCHITECTURE.md):
- FP8 linear: aiter.gemm_a8w8_blockscale reads weight scales per 128 x 128 block only (its CK kernels are
  instantiated for Scale_Block_N = Scale_Block_K = 128); aiter.gemm_a8w8 takes per-row x per-column scales.
  The binding quantizes activations with ATOM's own kernels, so it has ATOM's convention on every GPU.
- FP8 fused MoE: aiter.fused_moe quantizes the activations itself, as scale = amax * (1 / fp8_max) with
  fp8_max = 240 on e4m3fnuz. ATOM's convention (atom.ops.quant_fp8, vLLM's) is amax / 224 there: the two
  quantizations round independently, and the outputs differ by 4-7% (relative norm, measured on the
  self-check's inputs), more than the self-check's bound. On e4m3fn (448 for both) they differ by output
  rounding only. So the binding serves e4m3fn GPUs; MI300 keeps ATOM's Triton MoE kernel.
- MXFP4 experts (GPT-OSS): aiter.fused_moe's a16w4 path (QuantType.per_1x32, ActivationType.Swiglu, bf16
  activations, fp4x2 weights and E8M0 scales shuffled by shuffle_weight_a16w4 / shuffle_scale_a16w4, float32 biases
  as bias1 / bias2) runs cktile kernels built for gfx950, with Swiglu's alpha 1.702 and limit 7.0 fixed and the
  gate rows before the up rows (ATOM's layout); its shuffles want H and I padded to 256.
- FP8 KV cache: reshape_and_cache_flash / paged_attention_v1 with kv_cache_dtype "fp8" store and read the
  GPU's native FP8 type with per-tensor k_scale / v_scale (vLLM's convention, ATOM's too).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from atom.ops.attention import from_cache
from atom.ops.quant_fp8 import FP8_DTYPES

HALF = (torch.float16, torch.bfloat16)
AITER_SCALE_BLOCK = (128, 128)  # the one weight-scale block aiter's blockscale GEMM and FP8 MoE read


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- MoE


def moe_supports(static: Mapping) -> str | None:
    """The 16-bit fused_experts binding (aiter.fused_moe, QuantType.No, weights shuffled in (16, 16) tiles)."""
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


def fp8_experts_supports(static: Mapping, native: torch.dtype) -> str | None:
    """The fp8_fused_experts binding (aiter.fused_moe with QuantType.per_128x128 or per_Token)."""
    why = moe_supports(static)
    if why:
        return why
    fp8 = static.get("fp8_dtype", torch.float8_e4m3fn)
    if fp8 != native:
        return f"experts in {_name(fp8)} (aiter's FP8 MoE kernels on this GPU read {_name(native)})"
    if fp8 == torch.float8_e4m3fnuz:
        return ("e4m3fnuz experts: aiter's fused MoE quantizes activations as amax / 240, ATOM's reference as "
                "amax / 224 (vLLM's convention), and the two differ by more than the self-check allows")
    block = static.get("block_size")
    if block is not None:
        if tuple(block) != AITER_SCALE_BLOCK:
            return f"block size {list(block)} (aiter's FP8 MoE reads 128 x 128 weight-scale blocks)"
        hidden, inter = static.get("hidden_size"), static.get("intermediate_size")
        if hidden is not None and inter is not None and (hidden % 128 or inter % 128):
            return (f"hidden {hidden} / intermediate {inter} are not multiples of 128 (aiter quantizes the "
                    "activations of block-scaled experts in whole 1 x 128 groups)")
    return None


# ---------------------------------------------------------------- MXFP4 experts (GPT-OSS)

# aiter's a16w4 MoE (fused_moe with QuantType.per_1x32 and ActivationType.Swiglu: bf16 activations, MXFP4 weights,
# the cktile two-stage kernels) shuffles weights in [16 rows, 128 K] tiles and scales in [32 rows, 256 K] tiles
# (aiter.ops.shuffle.shuffle_weight_a16w4 / shuffle_scale_a16w4), so both dimensions are padded to multiples of
# 256, as the original ATOM pads GPT-OSS's 2,880 to 3,072.
MXFP4_PAD = 256
# The alpha and limit aiter's Swiglu computes with: fixed in its kernels (aiter.fused_moe.swiglu, its torch
# reference, has them as defaults), GPT-OSS's own values.
AITER_SWIGLU = (1.702, 7.0)


def mxfp4_experts_supports(static: Mapping, arch: str) -> str | None:
    """The fused_experts_swigluoai binding (aiter's a16w4 MoE). `arch`: the GPU's gfx name."""
    if not static.get("mxfp4"):
        return "dense GPT-OSS experts (the binding runs aiter's MXFP4 a16w4 MoE only)"
    if not arch.startswith("gfx95"):
        return (f"a {arch} GPU (aiter's a16w4 MoE kernels are built for gfx950; elsewhere ATOM's Triton MXFP4 "
                "kernels run, as the original ATOM runs Triton MoE on MI300)")
    if static.get("expert_parallel"):
        return "expert parallelism (the binding does not pass aiter an expert mask for other ranks' experts)"
    swiglu = (static.get("alpha"), static.get("limit"))
    if swiglu != AITER_SWIGLU:
        return (f"SwiGLU alpha {swiglu[0]} / limit {swiglu[1]} (aiter's Swiglu computes with alpha "
                f"{AITER_SWIGLU[0]}, limit {AITER_SWIGLU[1]})")
    return None


def pad_mxfp4_experts(w13: torch.Tensor, w2: torch.Tensor, w13_bias: torch.Tensor, w2_bias: torch.Tensor,
                      w13_scale: torch.Tensor, w2_scale: torch.Tensor, multiple: int = MXFP4_PAD
                      ) -> tuple[torch.Tensor, ...]:
    """GPT-OSS's MXFP4 experts in ATOM's layout (w13 uint8 [E, 2I, H/2], gate rows then up rows; w2 uint8 [E, H, I/2];
    E8M0 scales [E, 2I, H/32] / [E, H, I/32]; biases [E, 2I] / [E, H]) with H and I zero-padded to multiples of
    `multiple`: the gate and the up half each grow to I_pad rows, every K to the padded size. Padded codes are 0
    (+0.0) with scale byte 127 (1.0), biases float32 and 0 there, so the padded experts dequantize to the original
    ones in each half's top-left corner and zeros elsewhere: the padded gate / up columns give SwiGLU(0, 0) = 0, the
    padded hidden rows 0. Same argument order as the op (fused_experts_swigluoai's weight arguments)."""
    _, two_i, half_h = w13.shape
    hidden, inter = 2 * half_h, two_i // 2
    hp, ip = -(-hidden // multiple) * multiple, -(-inter // multiple) * multiple

    def grow(t: torch.Tensor, rows: int, cols: int, fill: int | float = 0) -> torch.Tensor:
        out = t.new_full((t.shape[0], rows, cols), fill)
        out[:, : t.shape[1], : t.shape[2]] = t
        return out

    def halves(t: torch.Tensor, cols: int, fill: int | float = 0) -> torch.Tensor:  # gate and up, each padded
        return torch.cat([grow(h, ip, cols, fill) for h in t.chunk(2, dim=1)], dim=1)

    b13 = halves(w13_bias.float().unsqueeze(-1), 1).squeeze(-1)
    b2 = grow(w2_bias.float().unsqueeze(-1), hp, 1).squeeze(-1)
    return (halves(w13, hp // 2), grow(w2, hp, ip // 2), b13, b2,
            halves(w13_scale, hp // 32, 127), grow(w2_scale, hp, ip // 32, 127))


# ---------------------------------------------------------------- linear


def fp8_linear_supports(static: Mapping, native: torch.dtype) -> str | None:
    """The fp8_linear binding (aiter.gemm_a8w8_blockscale for block scales, aiter.gemm_a8w8 per channel)."""
    fp8 = static.get("fp8_dtype", torch.float8_e4m3fn)
    if fp8 != native:
        return f"weights in {_name(fp8)} (aiter's FP8 GEMMs on this GPU read {_name(native)})"
    block = static.get("block_size")
    if block is not None and tuple(block) != AITER_SCALE_BLOCK:
        return (f"block size {list(block)} (aiter's blockscale GEMM reads 128 x 128 weight-scale blocks; a "
                "merged layer whose shards are not multiples of 128 rows has its scales expanded to [1, 128])")
    return None


# ---------------------------------------------------------------- KV cache and attention


def kv_cache_supports(static: Mapping, native: torch.dtype) -> str | None:
    """reshape_and_cache / paged_attention: 16-bit caches, or FP8 caches in the GPU's native FP8 type."""
    dtype = static.get("kv_cache_dtype")
    if dtype is None or dtype in HALF:
        return None
    if dtype in FP8_DTYPES:
        if dtype != native:
            return f"a {_name(dtype)} KV cache (aiter's FP8 cache kernels on this GPU store {_name(native)})"
        return None
    return f"a {_name(dtype)} KV cache (aiter's cache kernels take bfloat16, float16 or FP8 caches)"


def attention_supports(static: Mapping, native: torch.dtype) -> str | None:
    if static.get("has_sinks"):
        return "the mapped AITER attention kernels have no attention sinks"
    return kv_cache_supports(static, native)


def gather_context(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's context from the paged cache, packed: (k, v [sum(seq_lens), Hkv, D] in `dtype`,
    cu_seqlens int32 [B + 1]) for a varlen flash-attention call (what vLLM's ROCm backend does for chunked
    prefill). FP8 caches are dequantized (entry * scale, as atom.ops.attention reads them)."""
    block_size = k_cache.shape[1]
    lens = seq_lens.long()
    cu_k = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device=k_cache.device)
    cu_k[1:] = lens.cumsum(0)
    seq_of = torch.repeat_interleave(torch.arange(lens.shape[0], device=k_cache.device), lens)
    pos = torch.arange(seq_of.shape[0], device=k_cache.device) - cu_k[:-1].long()[seq_of]
    slots = block_tables.long()[seq_of, pos // block_size] * block_size + pos % block_size

    def rows(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if cache.dtype not in FP8_DTYPES:
            return cache.flatten(0, 1)[slots].to(dtype)
        # gathered as bytes: FP8 index kernels are not there on every device
        picked = cache.view(torch.uint8).flatten(0, 1)[slots].view(cache.dtype)
        return from_cache(picked, scale).to(dtype)

    return rows(k_cache, k_scale), rows(v_cache, v_scale), cu_k
