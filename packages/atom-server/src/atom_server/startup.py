"""Start-up phase log: one line per phase with its duration (config, tokenizer, weights, KV cache,
CUDA graphs, ready), so a slow start says where its time goes."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("atom_server.startup")

_started = time.perf_counter()
_last = _started


def begin() -> None:
    """Start the clock (the engine process and LLM() call this before loading anything)."""
    global _started, _last
    _started = _last = time.perf_counter()


def phase_done(name: str, detail: str = "") -> float:
    """Log that a phase ended: its duration since the previous phase; returns that duration."""
    global _last
    now = time.perf_counter()
    took, _last = now - _last, now
    logger.info("start-up: %s in %.1f s%s", name, took, f" ({detail})" if detail else "")
    return took


def total() -> float:
    return time.perf_counter() - _started
