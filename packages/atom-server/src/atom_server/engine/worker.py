"""A tensor-parallel worker: rank r > 0 of an engine's model, in its own process.

Started by the rank-0 executor (executor.py) as `python -m atom_server.engine.worker` with its WorkerSpec in
the environment. It joins the process group, builds its ModelRunner on its shard (the same runner rank 0
runs: the collectives of the start-up — KV sizing, graph capture — and of every step line up), then runs
every StepInput rank 0 publishes, in order, until told to stop. It never samples (rank 0 does).

A worker never outlives the engine: the kernel kills it when its parent dies (PR_SET_PDEATHSIG, when
spawned from the parent's main thread) and a thread watching its parent's pid exits it otherwise. Ctrl-C
reaches the whole process group: workers ignore SIGINT and stop when rank 0 says so. Any exception is
fatal: the worker reports it to rank 0 and exits 1 (a worker that skipped a step would pair its collectives
with the wrong step of the other ranks).
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import sys
import threading
import time
import traceback

import msgspec
import zmq

from atom_server.engine import tp_channel as ch

logger = logging.getLogger("atom_server.worker")

PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 0.2


def _die_with_parent(spec: ch.WorkerSpec) -> None:
    if spec.death_signal and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == spec.parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # the engine is gone (and may have died before prctl above)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_distributed(spec: ch.WorkerSpec):
    import torch
    import torch.distributed as dist

    from atom.distributed import TorchDistGroup, set_expert_parallel, set_tp_group

    kwargs = {}
    if spec.backend == "nccl":
        torch.cuda.set_device(spec.rank)
        kwargs["device_id"] = torch.device("cuda", spec.rank)
    elif spec.num_threads:
        if spec.cpus:
            os.sched_setaffinity(0, spec.cpus)
        torch.set_num_threads(spec.num_threads)
        logger.info("CPU rank %d: %d torch threads%s", spec.rank, spec.num_threads,
                    f", CPUs {spec.cpus}" if spec.cpus else "")
    dist.init_process_group(spec.backend, init_method=spec.init_method, rank=spec.rank,
                            world_size=spec.world_size, timeout=datetime.timedelta(seconds=spec.timeout_s), **kwargs)
    set_tp_group(TorchDistGroup())
    set_expert_parallel(spec.expert_parallel)
    return torch.device("cuda", spec.rank) if spec.device == "cuda" else torch.device("cpu")


def serve(spec: ch.WorkerSpec, steps: zmq.Socket, replies: zmq.Socket) -> None:
    from atom_server.engine.model_runner import ModelRunner
    from atom_server.engine.step_input import decode

    # imports done: from here rank 0 waits for this worker in the process group's rendezvous
    replies.send(ch.reply_encoder.encode(ch.Hello(spec.rank, os.getpid())))
    device = _init_distributed(spec)
    runner = ModelRunner(device=device, **spec.runner_kwargs)
    replies.send(ch.reply_encoder.encode(ch.Ready(spec.rank, runner.num_blocks)))
    while True:
        frame = steps.recv(copy=False).buffer
        kind = bytes(frame[:1])
        if kind == ch.EXECUTE:
            runner.execute(decode(frame[1:]))
        elif kind == ch.LAUNCH:
            runner.launch_decode(decode(frame[1:]))
        elif kind == ch.QUERY:
            tables, generators = runner.rank_state()
            replies.send(ch.reply_encoder.encode(ch.RankState(spec.rank, tables, generators)))
        elif kind == ch.STOP:
            return
        else:
            raise ValueError(f"unknown message kind {kind!r} from rank 0")


def main() -> int:
    spec = msgspec.json.decode(os.environ[ch.SPEC_ENV].encode(), type=ch.WorkerSpec)
    _die_with_parent(spec)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the workers stop
    logging.basicConfig(level=logging.INFO,
                        format=f"(TP worker rank {spec.rank} pid={os.getpid()}) %(levelname)s %(name)s: %(message)s")
    ctx = zmq.Context()
    steps = ctx.socket(zmq.SUB)
    steps.setsockopt(zmq.SUBSCRIBE, b"")
    steps.setsockopt(zmq.RCVHWM, 0)
    steps.connect(spec.steps_addr)
    replies = ctx.socket(zmq.PUSH)
    replies.setsockopt(zmq.LINGER, 2000)
    replies.connect(spec.replies_addr)
    code = 0
    try:
        serve(spec, steps, replies)
    except BaseException as e:  # noqa: BLE001 - any failure ends the worker, after saying why
        logger.error("tensor-parallel worker rank %d failed:\n%s", spec.rank, traceback.format_exc())
        replies.send(ch.reply_encoder.encode(ch.Failed(spec.rank, f"{type(e).__name__}: {e}")))
        code = 1
    finally:
        steps.close(0)
        replies.close()
        ctx.term()
    os._exit(code)  # skip interpreter teardown: torch.distributed's atexit work could wait on dead peers


if __name__ == "__main__":
    sys.exit(main())
