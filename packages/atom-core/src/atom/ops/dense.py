"""The dense (unquantized) linear as an op: y = x W^T + b with bf16 / fp16 / float32 weights.

The torch reference is F.linear; on CPU the layers keep atom.ops.cpu_linear (oneDNN's packed weights), so this op
exists for the GPU's decode GEMMs: the Triton implementation (atom.ops.triton_kernels.dense) runs the swap-AB kernel
of the FP8 GEMMs on 16-bit weights for up to swap_max_m() rows, where cuBLAS's one-row choices stream some
shapes at half the copy rate (qwen3-8b's o_proj at one row, H100: 19.4 us for 33.5 MB, 58% of the copy rate,
against 16.1 us), and F.linear above.

ATOM_DENSE_SWAP_MAX_M (rows, 0-64; 0 turns the op off, and the layers call F.linear as before) sets the bound per
process (default: 32 on NVIDIA GPUs, 0 elsewhere); dense_linear_for says whether a layer takes the op at all.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from atom.envs import env_int
from atom.ops.registry import define_op, impl_of, register, resolve

_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _default_swap_max_m() -> int:
    """32 rows on NVIDIA GPUs, where it was measured; 0 elsewhere (ROCm: not measured; CPU, the interpreter
    included: the layers keep F.linear and oneDNN, and the tests switch it on themselves). Asked when a layer is
    built, never at import: torch.cuda.is_available() poisons a later fork of the importing process."""
    return 32 if torch.cuda.is_available() and not torch.version.hip else 0


def _env_swap_max_m() -> int | None:
    """ATOM_DENSE_SWAP_MAX_M (0-64 rows), or None where it is unset."""
    if not os.environ.get("ATOM_DENSE_SWAP_MAX_M", "").strip():
        return None
    return env_int("ATOM_DENSE_SWAP_MAX_M", 0, 64, "rows; 0 turns the op off")


# Rows up to which the Triton dense_linear runs the swap-AB kernel (None: swap_max_m's default, 32 on NVIDIA GPUs).
# H100, 2026-12-07 (stop 62, bench_vs_vllm.sh --alt-env ATOM_DENSE_SWAP_MAX_M=32, 3 interleaved rounds of fresh
# processes, bf16, random weights, 128 in / 128 out, ms a decode step, the same in every round): qwen3-8b batch 1
# 6.33 -> 5.79, batch 32 6.82 -> 6.48; qwen3-0.6b batch 1 1.30 -> 1.05, batch 32 1.56 -> 1.48; qwen3-30b-a3b (its
# attention linears) batch 1 3.60 -> 3.40, batch 32 19.66 -> 19.64. Kernel by kernel (tools/device/
# dense_skinny_bench.py, one row, us a call, partials left to the consumer): 8b o_proj 19.4 -> 16.1, down 45.3 ->
# 41.6, gate_up 78.6 -> 74.8, qkv 24.6 -> 23.8; 0.6b o_proj 6.2 -> 3.7.
DENSE_SWAP_MAX_M: int | None = _env_swap_max_m()


def swap_max_m() -> int:
    """The row bound in effect: DENSE_SWAP_MAX_M, or the platform's default where the environment sets none."""
    return DENSE_SWAP_MAX_M if DENSE_SWAP_MAX_M is not None else _default_swap_max_m()


def _example(t, static):
    n, k = int(static.get("output_size", 192)), int(static.get("input_size", 256))
    w = t.randn(n, k, scale=k**-0.5)
    return [(t.randn(m, k), w, None) for m in (1, 7)]


define_op("dense_linear", example=_example,
          fake=lambda x, weight, *args, **kwargs: x.new_empty(*x.shape[:-1], weight.shape[0]))


@register("dense_linear", "torch")
def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b (F.linear). The Triton implementation also takes `parts` (its split-K hand-off,
    atom.layers.fp8_input's SplitKPartials), passed only where the layer's defers_split says it may."""
    return F.linear(x, weight, bias)


def dense_linear_for(dtype: torch.dtype, output_size: int, input_size: int) -> Callable | None:
    """The dense_linear implementation a layer of `dtype` weights [output_size, input_size] should call, or None
    when it should keep F.linear / atom.ops.cpu_linear: the op is off (swap_max_m() 0), the dtype is not a
    16-bit float, or the chain ends at the torch reference (CPU, ROCm without Triton)."""
    if dtype not in _DTYPES or swap_max_m() <= 0:
        return None
    fn = resolve("dense_linear", dtype=dtype, static={"output_size": output_size, "input_size": input_size})
    impl = impl_of(fn)
    return fn if impl is not None and impl.backend != "torch" else None
