"""ATOM's vLLM platform on ROCm.

It is vLLM's RocmPlatform unchanged for now; it exists so ROCm-specific choices (ATOM's AITER attention
backend, once shipped) have one home, and it is only activated where ROCm hardware is present.
"""

from __future__ import annotations

from vllm.platforms.rocm import RocmPlatform


class AtomRocmPlatform(RocmPlatform):
    pass
