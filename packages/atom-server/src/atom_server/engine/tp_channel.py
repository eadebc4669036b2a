"""The wire between rank 0 (the engine) and its tensor-parallel workers.

Rank 0 -> every worker: one ZMQ PUB socket (ipc://) carrying each step's StepInput as msgpack bytes behind
a one-byte kind (execute, launch, state query, stop); workers block in recv. ZMQ keeps the order, so every
worker applies every StepInput once, in order (block tables travel as deltas). Workers -> rank 0: one PULL
socket for the start-up handshake, state replies and a failing worker's last words (msgspec structs).

Why ZMQ PUB (tools/bench_step_transport.py, 2-core CPU box, batch 1/32/256 decode steps, 1 ms apart): rank 0
spends 3-34 us encoding and sending, a worker has the decoded step 25-140 us after the send started and
burns ~5% of a core waiting. A gloo broadcast (length, then bytes) took 350-600 us and blocks rank 0 until
the workers join it (and on NCCL it needs a second, gloo, group); a shared-memory ring delivers in 10-30 us
but its readers spin a whole core each between steps. With async scheduling rank 0 sends step N+1 while
the devices still run step N, so the delivery time is hidden whenever it is shorter than a step.
"""

from __future__ import annotations

import msgspec

EXECUTE = b"E"  # runner.execute(step)
LAUNCH = b"L"  # runner.launch_decode(step)
QUERY = b"Q"  # reply with the runner's state (tests, debugging)
STOP = b"S"  # leave the loop and exit 0


# ---- worker -> rank 0 ----------------------------------------------------------------------------------
class Hello(msgspec.Struct, tag="hello"):
    """The worker is subscribed and about to join the process group."""

    rank: int
    pid: int


class Ready(msgspec.Struct, tag="ready"):
    """The worker's runner is built (model loaded, KV cache allocated, graphs captured)."""

    rank: int
    num_blocks: int


class RankState(msgspec.Struct, tag="state"):
    """What a runner holds between steps: each live sequence's block table and its seeded generators."""

    rank: int
    tables: dict[int, list[int]]
    generators: list[int]


class Failed(msgspec.Struct, tag="failed"):
    """The worker's exception, sent before it exits non-zero."""

    rank: int
    message: str


Reply = Hello | Ready | RankState | Failed
reply_encoder = msgspec.msgpack.Encoder()
reply_decoder = msgspec.msgpack.Decoder(Reply)


class WorkerSpec(msgspec.Struct, kw_only=True):
    """Everything a worker process needs, passed as JSON in its environment."""

    rank: int
    world_size: int
    backend: str  # gloo | nccl
    init_method: str  # tcp://host:port of rank 0's store
    timeout_s: float  # collective timeout
    steps_addr: str
    replies_addr: str
    parent_pid: int
    death_signal: bool  # PR_SET_PDEATHSIG is safe (spawned from the parent's main thread)
    device: str  # cpu | cuda
    num_threads: int | None = None  # torch threads on CPU
    cpus: list[int] | None = None  # CPUs to pin to (CPU ranks of a pinned engine)
    expert_parallel: bool = False
    runner_kwargs: dict = {}


SPEC_ENV = "ATOM_TP_WORKER_SPEC"
