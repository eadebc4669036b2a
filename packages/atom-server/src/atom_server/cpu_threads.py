"""Torch threads of the engine process on CPU, chosen the way vLLM's CPU backend chooses them.

`atom serve` runs two processes: the API server (HTTP, tokenization, no torch compute) and the engine
(the model). Left alone, torch starts one thread per logical CPU in the engine, and every other busy
process on the machine (the API server included) then stalls its synchronised parallel regions: a
request that takes 1 s can take 10 or more. vLLM reserves a core for its front-end processes, binds one
OpenMP thread per physical core of the rest, and logs the binding; so does this module:

- threads = the physical cores this process may run on, minus one for the API server (when there
  are at least two), one thread per core;
- the engine process is pinned to those cores (os.sched_setaffinity) so that its threads neither
  migrate nor share a core with each other;
- `--cpu-threads N` or `OMP_NUM_THREADS=N` override the count (pinned to N cores when there are that
  many, otherwise left unpinned); `ATOM_CPU_NO_PIN=1` keeps the count but does not pin.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger("atom_server.cpu_threads")

RESERVED_FOR_API_SERVER = 1


@dataclass(frozen=True)
class CpuPlan:
    threads: int
    cpus: tuple[int, ...] | None  # the logical CPUs to pin to; None: no pinning
    reason: str

    def describe(self) -> str:
        where = f"pinned to CPUs {_ranges(self.cpus)}" if self.cpus else "not pinned"
        return f"{self.threads} torch thread{'s' if self.threads != 1 else ''}, {where} ({self.reason})"


def _ranges(cpus) -> str:
    cpus = sorted(cpus)
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def one_cpu_per_core(cpus: list[int], sysfs: str = "/sys/devices/system/cpu") -> list[int]:
    """The first logical CPU of each physical core among `cpus` (SMT siblings share a core)."""
    seen: set[tuple[str, str]] = set()
    picked = []
    for cpu in cpus:
        topo = os.path.join(sysfs, f"cpu{cpu}", "topology")
        try:
            with open(os.path.join(topo, "physical_package_id")) as f:
                package = f.read().strip()
            with open(os.path.join(topo, "core_id")) as f:
                core = f.read().strip()
        except OSError:  # no topology exposed: count every logical CPU as a core
            return list(cpus)
        if (package, core) not in seen:
            seen.add((package, core))
            picked.append(cpu)
    return picked


def plan(requested: int | None = None, environ: dict | None = None, cpus: list[int] | None = None,
         cores: list[int] | None = None) -> CpuPlan:
    """The engine's threads: `requested` (--cpu-threads), else $OMP_NUM_THREADS, else the physical cores
    minus RESERVED_FOR_API_SERVER."""
    environ = os.environ if environ is None else environ
    cpus = allowed_cpus() if cpus is None else cpus
    cores = one_cpu_per_core(cpus) if cores is None else cores
    pin = environ.get("ATOM_CPU_NO_PIN", "") not in ("1", "true", "yes")
    if requested is None and environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        requested, source = int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        source = "--cpu-threads"
    if requested is not None and requested >= 1:
        chosen = tuple(cores[:requested]) if pin and requested <= len(cores) else None
        return CpuPlan(requested, chosen, f"{source}={requested}")
    reserve = RESERVED_FOR_API_SERVER if len(cores) > RESERVED_FOR_API_SERVER else 0
    chosen = tuple(cores[:len(cores) - reserve])  # the last core(s) stay free for the API server (as vLLM)
    reason = (f"{len(cores)} physical core{'s' if len(cores) != 1 else ''} available, "
              f"{reserve} left to the API server")
    return CpuPlan(len(chosen), chosen if pin else None, reason)


def apply(p: CpuPlan) -> None:
    """Set the thread count (and pinning) of this process; call before torch runs anything."""
    os.environ["OMP_NUM_THREADS"] = str(p.threads)  # for OpenMP pools started after this point
    if p.cpus:
        try:
            os.sched_setaffinity(0, p.cpus)
        except (AttributeError, OSError) as e:
            logger.warning("cannot pin the engine to CPUs %s: %s", _ranges(p.cpus), e)
    import torch

    torch.set_num_threads(p.threads)
    logger.info("CPU engine: %s", p.describe())


def configure_engine_process(args) -> CpuPlan | None:
    """`atom serve`'s engine process on CPU: plan and apply its threads; None on GPUs (nothing to do)."""
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not str(device).startswith("cpu"):
        return None
    p = plan(args.cpu_threads)
    apply(p)
    return p
