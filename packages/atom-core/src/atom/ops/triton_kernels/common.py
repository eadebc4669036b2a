"""Small helpers shared by the kernels."""

from __future__ import annotations

import functools
import os

import torch


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
