"""Triton dense_linear (atom.ops.dense): bf16 / fp16 linears at decode on the FP8 GEMMs' swap-AB kernel.

Up to atom.ops.dense.swap_max_m() rows (32 on NVIDIA GPUs), y = x W^T runs quant_fp8's _fp8_gemm_swap_kernel with
SCALED=False: the 16-bit weight tile [64 rows, block_k] is the matrix instruction's wide operand, the few activation
rows (padded to 16) the narrow one, split over K until about two programs per SM stream weights. A call that splits
hands its float32 partials to a consumer that adds them (parts: the residual RMSNorm after o_proj / down_proj,
the attention's decode prep after qkv_proj), as the FP8 linears do; otherwise the partials are added by
_split_k_sum_kernel. Above the bound, and for anything else (float32, mixed dtypes), F.linear (cuBLAS).

The tile: DENSE_SWAP_TILE, K steps of 128 bf16 (the bytes of the FP8 tile's 256) in 4 stages: within 0.4% of the
best of 8 tiles swept over qwen3-8b's four linears at one row, and tied with it in the engine (H100, stop 62,
dense_skinny_bench.py --sweep). ATOM_DENSE_SWAP_TILE (a JSON object of quant_fp8's tile keys: block_n, block_k,
num_warps, num_stages, split_k, tma) replaces it per process, for sweeps.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from atom.ops import dense as dense_ref
from atom.ops.registry import register
from atom.ops.triton_kernels import quant_fp8

DENSE_SWAP_TILE = {"block_k": 128, "num_stages": 4}


def _env_tile() -> dict:
    raw = os.environ.get("ATOM_DENSE_SWAP_TILE", "").strip()
    if not raw:
        return dict(DENSE_SWAP_TILE)
    try:
        tile = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"ATOM_DENSE_SWAP_TILE is not a JSON object: {e}") from None
    allowed = quant_fp8._TILE_KEYS - {"block_m", "fast_acc", "ws"}
    if not isinstance(tile, dict) or set(tile) - allowed:
        what = f"unknown keys {sorted(set(tile) - allowed)}" if isinstance(tile, dict) else "not a JSON object"
        raise ValueError(f"ATOM_DENSE_SWAP_TILE: {what}; keys: {', '.join(sorted(allowed))}")
    return tile


TILE = _env_tile()


def swap_applies(m: int, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether dense_linear runs the swap-AB kernel for m rows of x against weight."""
    return (0 < m <= dense_ref.swap_max_m() and x.dtype == weight.dtype and x.dtype in dense_ref._DTYPES
            and weight.dim() == 2 and weight.stride(-1) == 1)


@register("dense_linear", "triton", dtypes=(torch.bfloat16, torch.float16))
def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 parts: list | None = None) -> torch.Tensor:
    """y = x W^T + b in x's dtype; the swap-AB kernel up to swap_max_m() rows (parts: as quant_fp8's
    _launch_split), F.linear above."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"dense_linear: input has {x.shape[-1]} features, the weight [{n}, {k}] expects {k}")
    m = x.numel() // k if k else 0
    if not swap_applies(m, x, weight):
        return F.linear(x, weight, bias)
    out = quant_fp8._swap_gemm(quant_fp8._rows(x), None, weight, None, bias, None, x.dtype, False, parts=parts,
                               dense_tile=TILE)
    return out.view(*x.shape[:-1], n)
