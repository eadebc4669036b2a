"""Switches and bounds read from the environment, refused with a message naming the variable when malformed."""

from __future__ import annotations

import os


def env_int(name: str, default: int, most: int, unit: str) -> int:
    """A bound from the environment (unset: default), refused with a message naming it outside 0..most."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer ({unit}), got {raw!r}") from None
    if not 0 <= value <= most:
        raise ValueError(f"{name} must be between 0 and {most}, got {value}")
    return value


def env_flag(name: str, default: bool | None) -> bool | None:
    """A 0 / 1 switch from the environment (unset: default, which may be None for "decided elsewhere"); anything
    else is refused naming it."""
    raw = os.environ.get(name, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {raw!r}")
    return default if raw == "" else raw == "1"
