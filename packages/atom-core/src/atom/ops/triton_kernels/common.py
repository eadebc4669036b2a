"""Small helpers shared by the kernels."""

from __future__ import annotations

import functools
import os

import torch

from atom.envs import env_flag, env_int  # noqa: F401  (the kernels' switches read them from here)


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last axis is contiguous (what the kernels' row pointers assume), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def interpreting() -> bool:
    """True under Triton's CPU interpreter, whose tl.dot mis-handles bf16/fp16 operands (seen with triton
    3.9): kernels then upcast dot operands to fp32, which changes rounding only."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a GPU (work-splitting heuristics); a small stand-in under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.cache
def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory (LDS on AMD) one program may use: 227 KiB on Hopper, 64 KiB on CDNA3, 160 KiB
    on CDNA4. Under the interpreter there is no limit. Read from torch's device properties (as num_sms is),
    which torch.compile can trace, unlike Triton's driver query."""
    if interpreting() or device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return 160 * 1024 if "gfx950" in getattr(props, "gcnArchName", "") else 64 * 1024
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


# What Triton adds beyond the operand tiles (layout conversions, reductions, barriers): kept free.
_SMEM_SLACK = 16 * 1024


def fit_tile(num_stages: int, block: int, smem_bytes, device: torch.device) -> tuple[int, int]:
    """(block, stages) for a pipelined loop whose shared memory is `smem_bytes(block)` = (bytes per stage,
    bytes held once): the deepest pipeline up to `num_stages` at the given block size, halving the block
    (down to 16) while not even one stage fits. The tiles are sized for 2-byte types on Hopper; float32
    operands or AMD's 64 KiB LDS need fewer stages or a smaller tile."""
    budget = shared_memory_limit(device) - _SMEM_SLACK
    while True:
        stage_bytes, fixed_bytes = smem_bytes(block)
        for stages in range(num_stages, 0, -1):
            if fixed_bytes + stages * stage_bytes <= budget:
                return block, stages
        if block <= 16:
            return block, 1
        block //= 2


def dot_ieee(dtype: torch.dtype) -> bool:
    """Whether tl.dot must run in exact float32 (not TF32): float32 runs are the correctness mode, held to
    transformers' float32 logits, and TF32 keeps only 10 mantissa bits."""
    return dtype == torch.float32 or interpreting()
