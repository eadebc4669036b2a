"""Environment switches and the supported vLLM range; cheap to import (no torch, no vllm)."""

from __future__ import annotations

import os

# vLLM versions this plugin has been written against: >=0.24,<0.34 (major, minor).
SUPPORTED_MIN = (0, 24)
SUPPORTED_MAX_EXCLUSIVE = (0, 34)
SUPPORTED_RANGE = ">=0.24,<0.34"

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def plugin_disabled() -> bool:
    """ATOM_DISABLE_VLLM_PLUGIN=1: both entry points do nothing; vLLM runs exactly as without ATOM."""
    return _flag("ATOM_DISABLE_VLLM_PLUGIN")


def atom_attention_enabled(on_cpu: bool) -> bool:
    """Whether ATOM's models run ATOM's attention kernels in vLLM (atom_vllm.attention_backend).
    ATOM_VLLM_ATTENTION=1 / 0 decides; unset: on GPUs yes (measured faster than vLLM's FlashAttention on the H200),
    on CPU no (vLLM's native CPU attention kernels read its own cache layout; ATOM's torch references on that layout
    run many more ops a step)."""
    value = os.environ.get("ATOM_VLLM_ATTENTION", "").strip().lower()
    if not value:
        return not on_cpu
    return value not in {"0", "false", "no", "off"}


# Switches that no longer exist, and why (logged once when still set).
REMOVED_SWITCHES = {
    "ATOM_DISABLE_VLLM_PLUGIN_ATTENTION": "ATOM's vLLM attention backend is switched with ATOM_VLLM_ATTENTION=0 / 1",
}


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release
    except InvalidVersion:
        return ()


def vllm_version() -> str:
    from vllm.version import __version__

    return __version__


def check_vllm_version(version: str | None = None) -> tuple[bool, str]:
    """(supported, reason). Pre-releases of a supported minor count as that minor (0.34.0rc1 is out)."""
    version = version if version is not None else vllm_version()
    release = _release(version)
    if len(release) < 2:
        return False, f"cannot parse vLLM version {version!r}; atom-vllm supports vllm{SUPPORTED_RANGE}"
    minor = tuple(release[:2])
    if not SUPPORTED_MIN <= minor < SUPPORTED_MAX_EXCLUSIVE:
        return False, (f"vLLM {version} is outside atom-vllm's supported range vllm{SUPPORTED_RANGE}; "
                       "ATOM stays off and vLLM runs its own models")
    return True, f"vLLM {version} is within vllm{SUPPORTED_RANGE}"
