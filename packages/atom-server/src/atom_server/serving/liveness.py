"""Is the engine process alive and making progress? Judged in the API server from its heartbeats.

Two signs of a stalled engine:
- silence: no heartbeat for `silence_timeout_s` (30 s). Heartbeats come from a thread of their own, so a busy
  engine still sends them; a stopped, frozen or swapped-out-for-good process does not. The bound is generous
  because a false alarm ends every request in flight: on an overloaded 2-core CI box a 5 s bound killed a
  healthy engine whose heartbeat thread was starved (a process that exits is seen at once anyway).
- a step that does not end: the heartbeat says a step has been running longer than the step bound, which is
  derived from the longest step seen so far (STEP_BOUND_FACTOR times it, never under a floor that covers a
  cold start), e.g. a GPU kernel that never finishes while the heartbeat thread still runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

STEP_BOUND_FACTOR = 10.0


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass
class LivenessConfig:
    silence_timeout_s: float = 30.0
    step_bound_floor_s: float = 30.0

    @classmethod
    def from_env(cls) -> LivenessConfig:
        return cls(silence_timeout_s=_env_float("ATOM_ENGINE_HEARTBEAT_TIMEOUT_S", cls.silence_timeout_s),
                   step_bound_floor_s=_env_float("ATOM_ENGINE_STEP_TIMEOUT_FLOOR_S", cls.step_bound_floor_s))


class LivenessMonitor:
    def __init__(self, config: LivenessConfig | None = None, now: float | None = None):
        self.config = config or LivenessConfig.from_env()
        self.last_beat = time.monotonic() if now is None else now
        self.num_steps = 0
        self.step_running_s = 0.0
        self.longest_step_s = 0.0

    def step_bound_s(self) -> float:
        return max(self.config.step_bound_floor_s, STEP_BOUND_FACTOR * self.longest_step_s)

    def beat(self, num_steps: int, step_running_s: float, longest_step_s: float, now: float | None = None) -> None:
        self.last_beat = time.monotonic() if now is None else now
        self.num_steps = num_steps
        self.step_running_s = step_running_s
        self.longest_step_s = longest_step_s

    def stalled(self, now: float | None = None) -> str | None:
        """Why the engine counts as stalled, or None while it is fine."""
        now = time.monotonic() if now is None else now
        silent = now - self.last_beat
        if silent > self.config.silence_timeout_s:
            return f"no heartbeat from the engine for {silent:.1f} s (bound {self.config.silence_timeout_s:g} s)"
        running = self.step_running_s + silent  # the step kept running since that beat
        if self.step_running_s > 0 and running > self.step_bound_s():
            return (f"an engine step has been running for {running:.1f} s, over its bound of "
                    f"{self.step_bound_s():.1f} s (longest step so far {self.longest_step_s:.2f} s)")
        return None
