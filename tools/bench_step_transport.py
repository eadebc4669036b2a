"""Per-step cost of handing a StepInput from rank 0 to the tensor-parallel workers, three ways, on CPU.

    python tools/bench_step_transport.py [--workers 1] [--steps 2000] [--batches 1,32,256] [--gap-us 1000]

zmq     msgpack bytes on a ZMQ PUB socket (ipc://), workers block in recv (what atom-server uses)
gloo    msgpack bytes by torch.distributed.broadcast on gloo: the length, then the bytes (two collectives;
        on NCCL this needs a second, gloo, group for host objects)
shm     msgpack bytes in a shared-memory ring, workers spin on the slot's sequence number (sched_yield)

The messages are decode StepInputs of 1/32/256 rows at ~600 tokens of context, with the block-table tails of
the rows that crossed a block (1 in 16). For each message rank 0 records the time it spends sending (its
critical path: encode + send) and each worker the time from the send's start to the decoded StepInput
(perf_counter is CLOCK_MONOTONIC, one clock for every process); rank 0 waits for every worker's
acknowledgement, then pauses --gap-us (the rest of a step) before the next message, so nothing queues. Prints medians and 99th percentiles in us, and
how much of a core a worker burns while it waits (the ring's spinning).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import msgspec
import zmq

from atom_server.engine.step_input import BlockTableUpdate, StepInput, decode, encode

SLOT_BYTES = 1 << 16
SLOTS = 8


def make_step(n: int, i: int) -> StepInput:
    lens = [600 + i + r for r in range(n)]
    tails = [BlockTableUpdate(r, lens[r] // 16, [1000 + r]) for r in range(n) if lens[r] % 16 == 1]
    return StepInput(seq_ids=list(range(n)), token_ids=[7 + r for r in range(n)], query_start_loc=list(range(n + 1)),
                     seq_lens=lens, block_updates=tails)


# ---- transports -------------------------------------------------------------------------------------------
class ZmqSender:
    def __init__(self, addr: str, workers: int, ctx: zmq.Context):
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.bind(addr)
        for _ in range(workers):  # every subscription arrived: no message is lost to a slow joiner
            self.sock.recv()

    def send(self, data: bytes) -> None:
        self.sock.send(data, copy=False)


class ZmqReceiver:
    def __init__(self, addr: str, ctx: zmq.Context):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(addr)

    def recv(self) -> bytes:
        return self.sock.recv(copy=False).buffer


class GlooChannel:
    def __init__(self, rank: int, world: int, init: str):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        self.size = torch.zeros(1, dtype=torch.int64)

    def send(self, data: bytes) -> None:
        torch = self.torch
        self.size[0] = len(data)
        self.dist.broadcast(self.size, 0)
        self.dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0)

    def recv(self) -> bytes:
        self.dist.broadcast(self.size, 0)
        buf = self.torch.empty(int(self.size[0]), dtype=self.torch.uint8)
        self.dist.broadcast(buf, 0)
        return buf.numpy().tobytes()


class ShmRing:
    """One writer, readers spin on each slot's header: [seq u64 | length u64 | bytes]."""

    def __init__(self, name: str, create: bool):
        from multiprocessing import shared_memory

        self.shm = shared_memory.SharedMemory(name=name, create=create, size=SLOTS * SLOT_BYTES)
        if not create:  # the reader's resource tracker would unlink the writer's segment at exit
            from multiprocessing import resource_tracker

            resource_tracker.unregister(self.shm._name, "shared_memory")
        self.buf = self.shm.buf
        self.seq = 0

    def send(self, data: bytes) -> None:
        self.seq += 1
        off = (self.seq % SLOTS) * SLOT_BYTES
        self.buf[off + 8:off + 16] = len(data).to_bytes(8, "little")
        self.buf[off + 16:off + 16 + len(data)] = data
        self.buf[off:off + 8] = self.seq.to_bytes(8, "little")  # published last

    def recv(self) -> bytes:
        self.seq += 1
        off = (self.seq % SLOTS) * SLOT_BYTES
        want = self.seq.to_bytes(8, "little")
        while self.buf[off:off + 8] != want:
            os.sched_yield()
        n = int.from_bytes(self.buf[off + 8:off + 16], "little")
        return bytes(self.buf[off + 16:off + 16 + n])


# ---- the two sides ----------------------------------------------------------------------------------------
def worker(ns) -> None:
    ctx = zmq.Context()
    ack = ctx.socket(zmq.PUSH)
    ack.connect(ns.ack)
    if ns.transport == "zmq":
        chan = ZmqReceiver(ns.addr, ctx)
    elif ns.transport == "gloo":
        chan = GlooChannel(ns.rank, ns.workers + 1, ns.addr)
    else:
        chan = ShmRing(ns.addr, create=False)
    ack.send(b"ready")
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    while True:
        data = chan.recv()
        if data == b"stop":
            ack.send(msgspec.msgpack.encode((time.process_time() - start_cpu) / (time.perf_counter() - start_wall)))
            break
        t_sent = int.from_bytes(data[:8], "little")
        decode(data[8:])
        ack.send(msgspec.msgpack.encode(time.perf_counter_ns() - t_sent))


def leader(ns, transport: str, batches: list[int]) -> dict:
    ctx = zmq.Context()
    tmp = tempfile.mkdtemp(prefix="atom-bench-transport-")
    ack = ctx.socket(zmq.PULL)
    ack_addr = f"ipc://{tmp}/ack"
    ack.bind(ack_addr)
    if transport == "zmq":
        addr = f"ipc://{tmp}/steps"
    elif transport == "gloo":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            addr = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    else:
        addr = f"atom_bench_{os.getpid()}"
        ring = ShmRing(addr, create=True)
    procs = [subprocess.Popen([sys.executable, __file__, "--role", "worker", "--transport", transport, "--addr", addr,
                               "--ack", ack_addr, "--rank", str(r + 1), "--workers", str(ns.workers)])
             for r in range(ns.workers)]
    if transport == "zmq":
        chan = ZmqSender(addr, ns.workers, ctx)
    elif transport == "gloo":
        chan = GlooChannel(0, ns.workers + 1, addr)
    else:
        chan = ring
    for _ in range(ns.workers):
        ack.recv()
    out = {}
    for n in batches:
        steps = [make_step(n, i) for i in range(64)]
        send_us, latency_us = [], []
        for i in range(ns.steps):
            t0 = time.perf_counter_ns()
            data = encode(steps[i % 64])
            chan.send(t0.to_bytes(8, "little") + data)
            send_us.append((time.perf_counter_ns() - t0) / 1e3)
            latency_us.append(max(msgspec.msgpack.decode(ack.recv()) for _ in range(ns.workers)) / 1e3)
            if ns.gap_us:  # the rest of a step (the forward), during which the workers wait for the next one
                time.sleep(ns.gap_us / 1e6)
        out[n] = (len(encode(steps[0])), send_us[ns.steps // 10:], latency_us[ns.steps // 10:])  # first 10%: warm-up
    chan.send(b"stop")
    busy = [msgspec.msgpack.decode(ack.recv()) for _ in range(ns.workers)]
    for p in procs:
        p.wait(30)
    if transport == "shm":
        ring.shm.close()
        ring.shm.unlink()
    return out, max(busy)


def _p(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", default="leader")
    ap.add_argument("--transport", default=None)
    ap.add_argument("--addr")
    ap.add_argument("--ack")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--gap-us", type=float, default=1000, help="pause between steps (a step's forward)")
    ns = ap.parse_args()
    if ns.role == "worker":
        worker(ns)
        return
    batches = [int(b) for b in ns.batches.split(",")]
    print(f"{ns.workers} worker(s), {ns.steps} steps per batch, {ns.gap_us:.0f} us between steps, {os.cpu_count()} "
          "CPUs; us: median (p99)")
    print(f"{'transport':>9} {'batch':>6} {'bytes':>7} {'rank-0 send':>16} {'to worker':>16}")
    for transport in (ns.transport,) if ns.transport else ("zmq", "gloo", "shm"):
        rows, busy = leader(ns, transport, batches)
        for n, (size, send, lat) in rows.items():
            print(f"{transport:>9} {n:>6} {size:>7} {statistics.median(send):>8.1f} ({_p(send, .99):>5.0f})"
                  f" {statistics.median(lat):>8.1f} ({_p(lat, .99):>5.0f})")
        print(f"{transport:>9} worker CPU while receiving: {100 * busy:.0f}% of one core")


if __name__ == "__main__":
    main()
