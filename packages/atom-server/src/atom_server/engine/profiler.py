"""torch profiler traces of the engine core (POST /start_profile and /stop_profile; LLM.start_profile()).

Enabled by `--profiler-dir DIR` (or $VLLM_TORCH_PROFILER_DIR, vLLM's variable). A trace covers the engine
steps between start and stop, CPU and (on a GPU) CUDA activity, and is written as a Chrome trace
(`chrome://tracing`, Perfetto) named after the process and the time it stopped.
"""

from __future__ import annotations

import logging
import os
import time

import torch

logger = logging.getLogger(__name__)


class ProfilerError(ValueError):
    """Profiling was asked for in a state where it cannot be done (off, already running, not running)."""


class EngineProfiler:
    def __init__(self, trace_dir: str | None):
        self.trace_dir = trace_dir
        self._profiler: torch.profiler.profile | None = None

    @property
    def enabled(self) -> bool:
        return self.trace_dir is not None

    @property
    def running(self) -> bool:
        return self._profiler is not None

    def start(self) -> None:
        if not self.enabled:
            raise ProfilerError("profiling is off: start the server with --profiler-dir DIR")
        if self._profiler is not None:
            raise ProfilerError("the profiler is already running (POST /stop_profile first)")
        os.makedirs(self.trace_dir, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
        self._profiler.start()
        logger.info("torch profiler started (traces go to %s)", self.trace_dir)

    def stop(self) -> str:
        """Stop and write the trace; returns its path."""
        if self._profiler is None:
            raise ProfilerError("the profiler is not running (POST /start_profile first)")
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        path = os.path.join(self.trace_dir, f"atom-engine-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}-"
                                            f"{time.time_ns() % 1_000_000:06d}.pt.trace.json")
        profiler.export_chrome_trace(path)
        logger.info("torch profiler trace written to %s", path)
        return path
