"""Programmatic dependent launch (PDL, Hopper and later): each Triton kernel starts while the kernel before it
is still finishing, instead of after it has drained.

At decode most of ATOM's kernels are one wave of small programs, and a CUDA-graph replay of a step runs ~13 of
them a layer back to back: each pays its launch and the previous kernel's drain. With PDL (`launch_pdl=True`),
the next kernel's programs are scheduled as soon as every program of the current one has signalled
(gdc_launch_dependents, which ATOM's kernels do right after their own wait); they then block in `gdc_wait`
until the previous grid has completed and its writes are visible. In a captured graph the launches become
programmatic edges. Measured on the H200 (BENCHMARKS.md, 2026-12-03): ~1 us a kernel boundary, qwen3-8b FP8
decode 1.07x / 1.05x at batch 1 / 32, qwen3-0.6b 1.04-1.09x.

The rule every PDL kernel keeps: before `gdc_wait` it reads nothing but constant weights, or a decode step's
host-written metadata (no kernel writes it, and only the kernel right before a waiting one may still run), and
writes nothing (the previous kernel may still read what it would overwrite). ATOM's kernels wait first thing;
only these do something before it, each behind a switch: the FP8 swap-AB GEMM (`prefetch_l2` of its weight
slice, ATOM_FP8_PDL_PREFETCH: measured slower, off) and the decode attention with the prep inside (its rows' step
metadata, ATOM_ATTN_EARLY_META; with it, ATOM_ATTN_EARLY_KV, its block-table entries and an L2 prefetch of its first
key tile (1: a prefetch reads no value, so it cannot see stale data) or loads of that tile (2)); the attention's
two are on by default (EARLY_KV 2) since they won on the H100 (2026-12-07). EARLY_KV 2 reads device-written
data before the wait, which the rule allows for data no kernel since the one two launches back writes: every
kernel lets its dependents launch only after its own wait (pdl_wait below), so when a kernel's programs run, all
kernels before the one right before it have completed. The keys of earlier steps were written by earlier steps'
attention kernels; the slot the attention itself writes after the wait (the new key) is read stale and replaced
from registers. `pdl_args(device)` gives both halves together, the launch
option and the kernel's `PDL` constexpr, so a kernel never launches early without its wait.

On: NVIDIA sm_90+ with a Triton that has the launch option (3.4+), outside torch.compile's tracing (Dynamo's
Triton wrapper does not pass the option) and outside the interpreter. ATOM_PDL=0 turns it off per process.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from atom.ops.triton_kernels.common import env_flag, interpreting

ENABLED = env_flag("ATOM_PDL", True)


@functools.cache
def _triton_has_launch_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception:  # noqa: BLE001 - a Triton without the NVIDIA backend
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def _device_supports(device: torch.device) -> bool:
    if device.type != "cuda" or torch.version.hip or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9 and _triton_has_launch_pdl()


def pdl_on(device: torch.device) -> bool:
    """Whether kernels launched now on `device` use PDL."""
    if not ENABLED or interpreting():
        return False
    if torch.compiler.is_compiling():
        return False
    return _device_supports(device)


_OFF = {"PDL": False}
_ON = {"PDL": True, "launch_pdl": True}


def pdl_args(device: torch.device) -> dict:
    """Keyword arguments of a launch of a kernel with a `PDL: tl.constexpr` parameter: the constexpr and, when
    on, Triton's launch option (always both or neither)."""
    return _ON if pdl_on(device) else _OFF


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the previous kernel of the stream has completed (its writes visible), then let the next
    kernel's programs be scheduled. A no-op without PDL. Call before the first read of anything a previous
    kernel writes and before the first write."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, nbytes):
    """Ask the GPU to bring `nbytes` (a multiple of 16, > 0) from each address of `ptrs` (16-byte aligned) into
    L2 without waiting for them (Hopper's bulk prefetch, `cp.async.bulk.prefetch.L2`). For constant weights
    before pdl_wait; the returned zeros keep the instruction alive and can be ignored."""
    return tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r", [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_line_l2(ptrs):
    """Ask the GPU to bring the 128-byte line holding each address of `ptrs` into L2 without waiting for it
    (`prefetch.global.L2`: one per-thread instruction an address, no uniform-datapath loop as prefetch_l2's bulk
    form compiles to). A hint: it reads no value, so it cannot see stale data; the returned zeros keep the
    instruction alive and can be ignored."""
    return tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)
