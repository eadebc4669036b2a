"""Start-up phase log: one line per phase with its duration (config, tokenizer, weights, KV cache,
CUDA graphs, ready), so a slow start says where its time goes.

With the start-up profile on (`--startup-profile`, or ATOM_STARTUP_PROFILE=1) every Triton JIT compile is
recorded too (atom.ops.compile_log) under the phase or sub-phase it happened in (each captured CUDA-graph
batch size is a sub-phase), and `profile_report()` / the log at "ready" say how many kernels compiled where,
how long that took, and which specialisation made a kernel compile again. Compiles after start-up (the first
requests of a new shape) are counted under the label the caller sets (`set_label`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from atom.ops.compile_log import CompileLog

logger = logging.getLogger("atom_server.startup")

_started = time.perf_counter()
_last = _started
_phases: list[dict[str, Any]] = []
_subphases: list[dict[str, Any]] = []
_compiles: CompileLog | None = None
_phase_mark = 0  # compiles recorded before the current phase began


def begin() -> None:
    """Start the clock (the engine process and LLM() call this before loading anything)."""
    global _started, _last, _phase_mark
    _started = _last = time.perf_counter()
    _phase_mark = 0
    _phases.clear()
    _subphases.clear()
    if _compiles is not None:
        _compiles.compiles.clear()
        _compiles.label = "config"


def enable_profile() -> bool:
    """Record Triton compiles from now on (idempotent); False when there is no Triton JIT to hook."""
    global _compiles
    if _compiles is None:
        log = CompileLog()
        if not log.install():
            return False
        _compiles = log
    return True


def profiling() -> bool:
    return _compiles is not None


def wanted() -> bool:
    return os.environ.get("ATOM_STARTUP_PROFILE", "0") not in ("", "0")


def set_label(label: str) -> None:
    """Label the compiles that follow (e.g. a benchmark's warm-up of one batch size)."""
    if _compiles is not None:
        _compiles.label = label


def _compiles_since(mark: int) -> tuple[int, float]:
    if _compiles is None:
        return 0, 0.0
    new = _compiles.compiles[mark:]
    return len(new), sum(c.seconds for c in new)


def _mark() -> int:
    return len(_compiles.compiles) if _compiles is not None else 0


def phase_done(name: str, detail: str = "") -> float:
    """Log that a phase ended: its duration since the previous phase; returns that duration."""
    global _last, _phase_mark
    now = time.perf_counter()
    took, _last = now - _last, now
    n, secs = _compiles_since(_phase_mark)
    _phase_mark = _mark()
    _phases.append(dict(phase=name, seconds=took, detail=detail, compiles=n, compile_s=secs))
    jit = f"; Triton: {n} compiles, {secs:.1f} s" if _compiles is not None else ""
    logger.info("start-up: %s in %.1f s%s%s", name, took, f" ({detail})" if detail else "", jit)
    if _compiles is not None:
        _compiles.label = f"after {name}"
    return took


@contextlib.contextmanager
def subphase(name: str) -> Iterator[None]:
    """Time a part of the current phase (one captured batch size) with the compiles it caused."""
    prev = _compiles.label if _compiles is not None else None
    if _compiles is not None:
        _compiles.label = name
    mark, t0 = _mark(), time.perf_counter()
    try:
        yield
    finally:
        n, secs = _compiles_since(mark)
        _subphases.append(dict(subphase=name, seconds=time.perf_counter() - t0, compiles=n, compile_s=secs))
        if _compiles is not None:
            _compiles.label = prev
            logger.info("start-up:   %s in %.2f s; Triton: %d compiles, %.2f s", name, _subphases[-1]["seconds"],
                        n, secs)


def total() -> float:
    return time.perf_counter() - _started


def since_process_start() -> float | None:
    """Seconds since this process was created (imports and CUDA initialisation included), from /proc."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def profile_report() -> dict[str, Any]:
    """Phases, sub-phases and (with the profile on) the Triton compile log, as plain data."""
    out: dict[str, Any] = dict(phases=list(_phases), subphases=list(_subphases), engine_s=total(),
                               process_s=since_process_start())
    if _compiles is not None:
        out["triton"] = _compiles.report()
    return out


def format_profile() -> str:
    lines = ["start-up profile:"]
    for p in _phases:
        jit = f"  Triton {p['compiles']:4d} compiles {p['compile_s']:6.1f} s" if _compiles is not None else ""
        lines.append(f"  {p['phase']:<28} {p['seconds']:7.1f} s{jit}  {p['detail']}")
    for s in _subphases:
        lines.append(f"    {s['subphase']:<26} {s['seconds']:7.2f} s  Triton {s['compiles']:4d} compiles "
                     f"{s['compile_s']:6.2f} s")
    proc = since_process_start()
    if proc is not None:
        lines.append(f"  process start -> now: {proc:.1f} s (engine {total():.1f} s; the rest is imports and "
                     "process start-up)")
    if _compiles is not None:
        lines.append(_compiles.format())
    return "\n".join(lines)
