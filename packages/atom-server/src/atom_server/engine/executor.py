"""Rank 0 of a tensor-parallel engine: its own ModelRunner plus N-1 worker processes (worker.py).

`build_runner(...)` is what the engine calls: at TP=1 it returns a plain ModelRunner (no extra per-step
work at all), at TP=N a `TPExecutor` with the runner's interface (execute, launch_decode, collect and the
runner's attributes). Each step the executor publishes the StepInput to the workers (tp_channel.py), then
runs rank 0's own runner on it: the model's collectives (all-reduce, the LM head's all-gather) sync the
ranks; only rank 0 samples.

Start-up: the TP configuration is checked before any process starts (devices, heads and KV heads, MoE
sizes or, under expert parallelism, the expert count: atom.loader.check_tensor_parallel). Then the workers
are spawned, say hello, and every rank joins torch.distributed (NCCL on CUDA, RCCL on ROCm, gloo on CPU)
and builds its runner in lockstep (KV blocks: the minimum over the ranks; CUDA graphs captured on every
rank, with the collectives inside).

Failure: a worker that dies is fatal to the engine and never a hang. A watch thread owns the replies socket
and checks the worker processes; on a death it records a `WorkerError` naming the rank, and
  - calls the fatal handler if the process installed one (the engine-core process: report and exit, so the
    server turns unhealthy within a second even when idle);
  - otherwise lets the main thread raise it: at once if it is inside a call (gloo fails the collective with
    the dead peer; the executor turns that into the WorkerError), at its next call if idle; a main thread
    stuck for ATOM_TP_HANG_GRACE_S inside a device collective that cannot fail (NCCL) ends the process.
Exceptions keep their kinds: `WorkerError` (a subclass of `ExecutorFatalError`) means the ranks are out of
step and the engine must stop; any other exception is rank 0's own runner, as at TP=1. One raised after the
collectives (sampling one request) concerns rank 0 alone; one raised before them (preparing a step's
inputs) is raised by the workers too, and a worker's own error is fatal (worker.py says why), so the engine
stops at its next step.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import msgspec
import torch
import zmq

from atom_server import startup
from atom_server.engine import tp_channel as ch
from atom_server.engine.model_runner import ModelRunner
from atom_server.engine.step_input import StepInput, encode

logger = logging.getLogger(__name__)

WATCH_POLL_S = 0.1
STARTUP_TIMEOUT_S = float(os.environ.get("ATOM_TP_STARTUP_TIMEOUT_S", "1800"))
COLLECTIVE_TIMEOUT_S = float(os.environ.get("ATOM_TP_TIMEOUT_S", "1800"))
HANG_GRACE_S = float(os.environ.get("ATOM_TP_HANG_GRACE_S", "10"))
STOP_TIMEOUT_S = 10.0


class ExecutorFatalError(RuntimeError):
    """The ranks can no longer run steps together: the engine must stop (no per-request recovery)."""


class WorkerError(ExecutorFatalError):
    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def build_runner(*, tensor_parallel_size: int = 1, enable_expert_parallel: bool = False,
                 **runner_kwargs) -> ModelRunner | TPExecutor:
    """The engine's model runner: rank 0's ModelRunner alone at TP=1, a TPExecutor around it at TP=N."""
    if tensor_parallel_size == 1:
        if enable_expert_parallel:
            logger.info("--enable-expert-parallel has no effect at tensor_parallel_size=1")
        return ModelRunner(**runner_kwargs)
    return TPExecutor(tensor_parallel_size, enable_expert_parallel, **runner_kwargs)


def _signal_name(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _looks_collective(e: BaseException) -> bool:
    """An error raised by a collective (a peer gone, a timeout), not by rank 0's own Python."""
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e).lower())


def _device_check(tp: int, device: torch.device) -> str:
    """The torch.distributed backend for this device; a clear error when the devices do not suffice."""
    if device.type == "cuda":
        if device.index not in (None, 0):
            raise ValueError(f"tensor_parallel_size={tp} uses devices 0..{tp - 1}; choose them with "
                             f"CUDA_VISIBLE_DEVICES, not device={device}")
        count = torch.cuda.device_count()
        if tp > count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs, {count} visible"
                             + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""))
        return "nccl"  # RCCL on ROCm, under the same name
    if device.type != "cpu":
        raise ValueError(f"tensor parallelism runs on cuda or cpu devices, not {device.type}")
    cores = os.cpu_count() or 1
    if tp > cores:
        logger.warning("tensor_parallel_size=%d on %d CPU cores: the ranks share cores", tp, cores)
    return "gloo"


def cpu_shares(tp: int, allowed: list[int] | None = None, cores: list[int] | None = None,
               total: int | None = None) -> tuple[list[tuple[int, ...] | None], int]:
    """CPU ranks: (each rank's CPUs, torch threads per rank). The physical cores this process may use are
    split evenly; pinned only when this process is pinned already (`atom serve` pins its engine to the cores
    it may use, atom_server.cpu_threads): the ranks then split that set instead of all crowding into it.
    allowed / cores / total (the logical CPUs this process may use, one per physical core among them, all
    the machine's) default to this machine's."""
    from atom_server.cpu_threads import allowed_cpus, one_cpu_per_core

    allowed = allowed_cpus() if allowed is None else allowed
    cores = one_cpu_per_core(allowed) if cores is None else cores
    total = (os.cpu_count() or len(allowed)) if total is None else total
    threads = max(1, len(cores) // tp)
    if len(allowed) < total and len(cores) >= tp:
        return [tuple(cores[r * threads:(r + 1) * threads]) for r in range(tp)], threads
    return [None] * tp, threads


class TPExecutor:
    """Rank 0 of N: the runner interface the engine uses, with every step published to the workers."""

    _live: TPExecutor | None = None  # torch.distributed holds one default group per process

    def __init__(self, tensor_parallel_size: int, enable_expert_parallel: bool = False, **runner_kwargs):
        from atom.loader import check_tensor_parallel, load_config

        if TPExecutor._live is not None:
            raise RuntimeError("a tensor-parallel engine is already running in this process; shut it down first "
                               "(llm.llm_engine.shutdown())")
        tp = tensor_parallel_size
        device: torch.device = runner_kwargs.pop("device")
        backend = _device_check(tp, device)
        config = runner_kwargs.pop("config", None)
        if config is None:
            config = load_config(runner_kwargs["model_path"], runner_kwargs.get("trust_remote_code", False))
        check_tensor_parallel(config, tp, enable_expert_parallel, max_positions=runner_kwargs.get("max_model_len"),
                              quantization=runner_kwargs.get("quantization"))
        self.world_size = tp
        self.expert_parallel = enable_expert_parallel
        self.backend = backend
        self._fatal_handler: Callable[[str], None] | None = None
        self._dead: WorkerError | None = None
        self._failures: dict[int, str] = {}  # rank -> the exception a worker reported before exiting
        self._replies: queue.Queue = queue.Queue()
        self._in_call = False  # the main thread is inside a call that can block on a collective
        self._dead_at = 0.0
        self._aborted = False
        self._closed = False
        self._threads_before: int | None = None
        self._cpus_before: list[int] | None = None
        self._procs: list[subprocess.Popen] = []
        self._tmpdir = tempfile.mkdtemp(prefix="atom-tp-")
        self._ctx = zmq.Context()
        self._steps = self._ctx.socket(zmq.XPUB)
        self._steps.setsockopt(zmq.SNDHWM, 0)
        self._steps.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._steps.setsockopt(zmq.LINGER, 0)
        steps_addr = f"ipc://{self._tmpdir}/steps"
        self._steps.bind(steps_addr)
        replies_addr = f"ipc://{self._tmpdir}/replies"
        replies = self._ctx.socket(zmq.PULL)
        replies.bind(replies_addr)
        self._stop_watch = threading.Event()
        self._watch = threading.Thread(target=self._watch_loop, args=(replies,), name="tp-watch", daemon=True)
        TPExecutor._live = self
        atexit.register(self.shutdown)
        try:
            cpus, threads = cpu_shares(tp) if backend == "gloo" else ([None] * tp, None)
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            self._spawn(tp, backend, init_method, steps_addr, replies_addr, device, cpus, threads, runner_kwargs)
            self._watch.start()
            self._await(ch.Hello, tp - 1, "join")
            self._await_subscriptions(tp - 1)
            # the rendezvous and the runner's start-up collectives cannot be polled; a bad setting (e.g. a KV
            # cache too small) fails every rank alike: rank 0's own error is the one to show
            with self._calling(own_errors_first=True):
                self._init_rank0(backend, init_method, cpus[0], threads)
                startup.phase_done("tensor-parallel workers", f"{tp - 1} joined ({backend})")
                self.runner = ModelRunner(device=device, config=config, **runner_kwargs)
            ready = self._await(ch.Ready, tp - 1, "build its model runner")
            own = (self.runner.num_blocks, self.runner.num_window_blocks)
            if any((r.num_blocks, r.num_window_blocks) != own for r in ready):
                raise WorkerError(f"the ranks sized different KV caches: {own[0]} blocks (+ {own[1]} window-pool "
                                  "blocks) on rank 0, " + ", ".join(
                                      f"{r.num_blocks} (+ {r.num_window_blocks}) on rank {r.rank}" for r in ready))
        except BaseException:
            self.shutdown()
            raise
        logger.info("tensor parallel over %d ranks (%s%s), workers: %s", tp, backend,
                    ", expert parallel" if enable_expert_parallel else "",
                    ", ".join(f"rank {r} pid {p.pid}" for r, p in enumerate(self._procs, start=1)))

    # ---- start-up --------------------------------------------------------------------------------
    def _spawn(self, tp, backend, init_method, steps_addr, replies_addr, device, cpus, threads,
               runner_kwargs) -> None:
        main_thread = threading.current_thread() is threading.main_thread()
        for rank in range(1, tp):
            spec = ch.WorkerSpec(rank=rank, world_size=tp, backend=backend, init_method=init_method,
                                 timeout_s=COLLECTIVE_TIMEOUT_S, steps_addr=steps_addr, replies_addr=replies_addr,
                                 parent_pid=os.getpid(), death_signal=main_thread, device=device.type,
                                 num_threads=threads, cpus=list(cpus[rank]) if cpus[rank] else None,
                                 expert_parallel=self.expert_parallel, runner_kwargs=runner_kwargs)
            env = {**os.environ, ch.SPEC_ENV: msgspec.json.encode(spec).decode()}
            if threads:  # OpenMP reads it when torch starts its pool (the engine's own count is inherited)
                env["OMP_NUM_THREADS"] = str(threads)
            self._procs.append(subprocess.Popen([sys.executable, "-m", "atom_server.engine.worker"], env=env))

    def _init_rank0(self, backend: str, init_method: str, cpus: tuple[int, ...] | None,
                    threads: int | None) -> None:
        import torch.distributed as dist

        from atom.distributed import TorchDistGroup, set_expert_parallel, set_tp_group

        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(0)
            kwargs["device_id"] = torch.device("cuda", 0)
        elif threads:  # the ranks share this process's cores (restored at shutdown)
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
            if cpus:
                self._cpus_before = sorted(os.sched_getaffinity(0))
                os.sched_setaffinity(0, cpus)
            logger.info("CPU rank 0: %d torch threads%s", threads, f", CPUs {list(cpus)}" if cpus else "")
        dist.init_process_group(backend, init_method=init_method, rank=0, world_size=self.world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S), **kwargs)
        set_tp_group(TorchDistGroup())
        set_expert_parallel(self.expert_parallel)

    def _await(self, kind: type, count: int, what: str) -> list:
        """`count` replies of `kind` (one per worker), failing fast when a worker dies meanwhile."""
        got = []
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(got) < count:
            self._raise_if_dead()
            try:
                msg = self._replies.get(timeout=WATCH_POLL_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise WorkerError(f"tensor-parallel workers did not {what} within {STARTUP_TIMEOUT_S:.0f} s "
                                      "(ATOM_TP_STARTUP_TIMEOUT_S)") from None
                continue
            if isinstance(msg, kind):
                got.append(msg)
        return got

    def _await_subscriptions(self, count: int) -> None:
        """Every worker's subscription has reached the publisher: no step can be missed (ZMQ's slow joiner)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while count:
            self._raise_if_dead()
            if self._steps.poll(int(WATCH_POLL_S * 1000)):
                if self._steps.recv()[:1] == b"\x01":  # subscribe (b"\x00" would be a worker leaving)
                    count -= 1
            elif time.monotonic() > deadline:
                raise WorkerError("tensor-parallel workers did not subscribe to the step channel")

    # ---- the runner's interface ------------------------------------------------------------------
    def __getattr__(self, name: str):
        # num_blocks, vocab_size, config, dtype, graphs, device, can_launch_async, tables, ...: rank 0's runner
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)

    def execute(self, step: StepInput):
        self._publish(ch.EXECUTE, step)
        with self._calling():
            return self.runner.execute(step)

    def launch_decode(self, step: StepInput) -> int:
        self._publish(ch.LAUNCH, step)
        with self._calling():
            return self.runner.launch_decode(step)

    def collect(self, ticket: int, num_rows: int) -> list[int]:
        with self._calling():
            return self.runner.collect(ticket, num_rows)

    def rank_states(self, timeout_s: float = 60.0) -> list[ch.RankState]:
        """Every rank's runner state (rank 0 first), read between steps."""
        self._raise_if_dead()
        self._steps.send(ch.QUERY)
        tables, generators, window_tables = self.runner.rank_state()
        states = [ch.RankState(0, tables, generators, window_tables)]
        deadline = time.monotonic() + timeout_s
        while len(states) < self.world_size:
            self._raise_if_dead()
            try:
                msg = self._replies.get(timeout=WATCH_POLL_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise WorkerError("tensor-parallel workers did not report their state") from None
                continue
            if isinstance(msg, ch.RankState):
                states.append(msg)
        return sorted(states, key=lambda s: s.rank)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def set_fatal_handler(self, handler: Callable[[str], None]) -> None:
        """handler(message) runs on the watch thread as soon as a worker dies (it should end the process)."""
        self._fatal_handler = handler
        if self._dead is not None:
            handler(str(self._dead))

    # ---- steps and failures ----------------------------------------------------------------------
    def _publish(self, kind: bytes, step: StepInput) -> None:
        self._raise_if_dead()
        self._steps.send(kind + encode(step), copy=False)

    @contextlib.contextmanager
    def _calling(self, own_errors_first: bool = False):
        self._raise_if_dead()
        self._in_call = True
        try:
            yield
        except Exception as e:
            if (self._dead is None or own_errors_first) and not _looks_collective(e):
                raise  # rank 0's own error (e.g. sampling one request), as at TP=1
            raise self._collective_failure(e) from e
        finally:
            self._in_call = False

    def _collective_failure(self, e: BaseException) -> WorkerError:
        """The dead worker behind a failed collective (its exit may lag the peer's closed socket)."""
        deadline = time.monotonic() + 3.0
        while self._dead is None and time.monotonic() < deadline:
            time.sleep(WATCH_POLL_S)
        return self._dead or WorkerError(f"a tensor-parallel collective failed: {type(e).__name__}: {e}")

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise WorkerError("the tensor-parallel engine is shut down")

    def _watch_loop(self, replies: zmq.Socket) -> None:
        """Owns the replies socket; notices a worker's death within WATCH_POLL_S."""
        try:
            while not self._stop_watch.is_set():
                if replies.poll(int(WATCH_POLL_S * 1000)):
                    msg = ch.reply_decoder.decode(replies.recv())
                    if isinstance(msg, ch.Failed):
                        self._failures[msg.rank] = msg.message
                    else:
                        self._replies.put(msg)
                if self._dead is None and not self._closed:  # (workers leave on shutdown)
                    self._check_workers(replies)
                elif self._dead is not None and self._in_call and self._fatal_handler is None:
                    self._end_if_stuck()
        finally:
            replies.close(0)

    def _check_workers(self, replies: zmq.Socket) -> None:
        for rank, proc in enumerate(self._procs, start=1):
            code = proc.poll()
            if code is None:
                continue
            while rank not in self._failures and replies.poll(200):  # its last words, if it had any
                msg = ch.reply_decoder.decode(replies.recv())
                if isinstance(msg, ch.Failed):
                    self._failures[msg.rank] = msg.message
            reason = self._failures.get(rank)
            self._dead_at = time.monotonic()
            self._dead = WorkerError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) {_signal_name(code)}"
                                     + (f": {reason}" if reason else ""), rank)
            logger.error("%s; the engine cannot continue", self._dead)
            if self._fatal_handler is not None:
                self._fatal_handler(str(self._dead))
            return

    def _end_if_stuck(self) -> None:
        if self.backend == "nccl" and not self._aborted:  # fail the pending NCCL kernels: the sync returns
            self._aborted = True
            with contextlib.suppress(Exception):
                import torch.distributed as dist

                dist.distributed_c10d._abort_process_group()
        if self._in_call and time.monotonic() - self._dead_at > HANG_GRACE_S:
            logger.error("the engine is stuck in a collective with a dead peer (%s); exiting", self._dead)
            os._exit(1)

    # ---- shutdown --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the workers (asked, then killed after STOP_TIMEOUT_S) and leave torch.distributed."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        with contextlib.suppress(zmq.ZMQError):
            self._steps.send(ch.STOP)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._stop_watch.set()
        if self._watch.is_alive():
            self._watch.join(5)
        self._steps.close(0)
        self._ctx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        import torch.distributed as dist

        from atom.distributed import SingleProcessGroup, set_expert_parallel, set_tp_group

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        set_tp_group(SingleProcessGroup())
        set_expert_parallel(False)
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
        if self._cpus_before is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self._cpus_before)
        if TPExecutor._live is self:
            TPExecutor._live = None
