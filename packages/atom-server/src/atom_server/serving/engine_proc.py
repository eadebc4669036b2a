"""The engine-core process: receive add/abort messages, step the LLMEngine, send outputs, stats and
heartbeats back. Started by the API server as `python -m atom_server.serving.engine_proc`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback

import msgspec
import zmq

from atom_server.serving import wire
from atom_server.serving.output_deltas import DeltaEncoder

logger = logging.getLogger("atom_server.engine_core")

HEARTBEAT_S = float(os.environ.get("ATOM_ENGINE_HEARTBEAT_S", "0.5"))
ENGINE_ARGS_ENV = "ATOM_ENGINE_ARGS"


class EngineCore:
    def __init__(self, engine, pull: zmq.Socket, push: zmq.Socket, parent_pid: int):
        self.engine = engine
        self.pull = pull
        self.push = push
        self.parent_pid = parent_pid
        self.stop_requested = False  # Shutdown message or parent gone: leave now
        self.draining = False  # SIGTERM: finish what is running, then leave
        self.last_beat = 0.0
        self.deltas = DeltaEncoder()

    def _send(self, msg) -> None:
        self.push.send(wire.encoder.encode(msg), copy=False)

    def _handle(self, msg) -> bool:
        """Apply one message; True when the engine has work it must step for (an abort to report)."""
        if isinstance(msg, wire.AddRequest):
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, prompt=msg.prompt)
            except ValueError as e:
                self._send(wire.RequestFailed(msg.request_id, str(e), 400))
            except Exception as e:  # a bad request must not take the engine down
                logger.exception("add_request(%s) failed", msg.request_id)
                self._send(wire.RequestFailed(msg.request_id, f"{type(e).__name__}: {e}", 500))
            return False
        if isinstance(msg, wire.AbortRequests):
            for rid in msg.request_ids:
                self.engine.abort_request(rid)
            return True
        if isinstance(msg, wire.Shutdown):
            self.stop_requested = True
        return False

    def _drain_inbox(self, timeout_ms: int) -> bool:
        stepped_for_abort = False
        if not self.pull.poll(timeout_ms):
            return False
        while True:
            try:
                raw = self.pull.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return stepped_for_abort
            stepped_for_abort |= self._handle(wire.to_engine_decoder.decode(raw.buffer))

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self.last_beat < HEARTBEAT_S:
            return
        self.last_beat = now
        stats = {k: float(v) for k, v in self.engine.stats().items() if isinstance(v, (int, float))}
        self._send(wire.Heartbeat(stats))
        if os.getppid() != self.parent_pid:
            logger.warning("API server process is gone; engine core exits")
            self.stop_requested = True

    def run(self) -> None:
        while not self.stop_requested:
            busy = self.engine.has_unfinished_requests()
            if self.draining and not busy:
                logger.info("drained; engine core exits")
                break
            timeout = 0 if busy else int(HEARTBEAT_S * 1000)
            must_step = self._drain_inbox(timeout)
            if self.stop_requested:
                break
            if must_step or self.engine.has_unfinished_requests():
                outputs = self.engine.step()
                if outputs:
                    self._send(wire.EngineOutputs([self.deltas.encode(o) for o in outputs]))
                if not self.engine.has_unfinished_requests():
                    self.last_beat = 0.0  # just went idle: report the freed blocks now
            self._beat()
        self.last_beat = 0.0
        self._beat()  # last stats, so the front-end sees freed blocks


def _vocab_size(engine) -> int | None:
    for holder in (engine, getattr(engine, "runner", None), getattr(engine, "config", None)):
        v = getattr(holder, "vocab_size", None)
        if isinstance(v, int):
            return v
    return None


def _engine_args_from_env():
    from atom_server.config import EngineArgs

    return msgspec.json.decode(os.environ[ENGINE_ARGS_ENV].encode(), type=EngineArgs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ATOM engine core (started by `atom serve`)")
    parser.add_argument("--input", required=True, help="ZMQ address to pull requests from")
    parser.add_argument("--output", required=True, help="ZMQ address to push outputs to")
    parser.add_argument("--parent-pid", type=int, default=os.getppid())
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"(EngineCore pid={os.getpid()}) %(levelname)s %(message)s")

    # Ctrl-C reaches the whole process group: the API server decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    core: EngineCore | None = None

    def on_sigterm(signum, frame):
        if core is None:
            raise SystemExit(0)
        core.draining = True

    signal.signal(signal.SIGTERM, on_sigterm)

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(ns.input)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(ns.output)
    try:
        from atom_server.cpu_threads import configure_engine_process
        from atom_server.engine.llm_engine import LLMEngine

        args = _engine_args_from_env()
        configure_engine_process(args)  # on CPU: threads and pinning, before torch starts its pool
        engine = LLMEngine.from_engine_args(args)
        push.send(wire.encoder.encode(wire.EngineReady(
            pid=os.getpid(),
            model_path=str(engine.model_path),
            served_model_name=str(engine.served_model_name),
            max_model_len=int(engine.max_model_len),
            dtype=str(engine.dtype).removeprefix("torch."),
            kernel_backend=str(engine.kernel_backend),
            kv_capacity_tokens=int(engine.kv_capacity_tokens),
            vocab_size=_vocab_size(engine),
        )))
        core = EngineCore(engine, pull, push, ns.parent_pid)
        core.run()
        logger.info("engine core stopped")
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            return 0
        logger.error("engine core failed:\n%s", traceback.format_exc())
        push.send(wire.encoder.encode(wire.EngineFailed(f"{type(e).__name__}: {e}")))
        return 1
    finally:
        push.close()
        pull.close(linger=0)
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
