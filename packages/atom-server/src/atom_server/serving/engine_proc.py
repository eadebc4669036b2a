"""The engine-core process: receive add/abort/stop messages, step the EngineCore, send its token-id outputs.

Started by the API server as `python -m atom_server.serving.engine_proc`. A heartbeat thread (with its own
socket) reports stats and step progress every HEARTBEAT_S, also while a long step runs, and leaves when
the API server is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback

import msgspec
import zmq

from atom_server.serving import wire

logger = logging.getLogger("atom_server.engine_core")

HEARTBEAT_S = float(os.environ.get("ATOM_ENGINE_HEARTBEAT_S", "0.5"))
IDLE_POLL_MS = 500
ENGINE_ARGS_ENV = "ATOM_ENGINE_ARGS"
ORPHAN_GRACE_S = 5.0  # the API server is gone and the main thread has not left: exit anyway


class EngineCoreProc:
    def __init__(self, core, ctx: zmq.Context, pull: zmq.Socket, push: zmq.Socket, output_addr: str,
                 parent_pid: int):
        self.core = core
        self.pull = pull
        self.push = push
        self.parent_pid = parent_pid
        self.stop_requested = False  # Shutdown message or parent gone: leave now
        self.draining = False  # SIGTERM: finish what is running, then leave
        # Step progress, read by the heartbeat thread (plain attribute writes: atomic under the GIL).
        self.num_steps = 0
        self.step_started: float | None = None
        self.longest_step_s = 0.0
        self.stats = self._stats()
        self._beats = threading.Thread(target=self._heartbeat_loop, args=(ctx, output_addr), daemon=True,
                                       name="engine-heartbeat")
        self._beats.start()

    def _send(self, msg) -> None:
        self.push.send(wire.encoder.encode(msg), copy=False)

    def _stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.core.stats().items() if isinstance(v, (int, float))}

    # ---- messages --------------------------------------------------------------------------------
    def _handle(self, msg) -> None:
        if isinstance(msg, wire.AddRequest):
            try:
                self.core.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.priority)
            except ValueError as e:
                self._send(wire.RequestFailed(msg.request_id, str(e), 400))
            except Exception as e:  # a bad request must not take the engine down
                logger.exception("add_request(%s) failed", msg.request_id)
                self._send(wire.RequestFailed(msg.request_id, f"{type(e).__name__}: {e}", 500))
        elif isinstance(msg, wire.AbortRequests):
            self.core.abort_requests(msg.request_ids)
        elif isinstance(msg, wire.StopSequences):
            for rid, indices in msg.stops.items():
                self.core.stop_sequences(rid, indices)
        elif isinstance(msg, wire.Shutdown):
            self.stop_requested = True
        elif isinstance(msg, wire.Profile):
            self._profile(msg.start)

    def _profile(self, start: bool) -> None:
        from atom_server.engine.profiler import ProfilerError

        try:
            if start:
                self.core.profiler.start()
                self._send(wire.ProfileDone(True))
            else:
                self._send(wire.ProfileDone(False, trace_path=self.core.profiler.stop()))
        except ProfilerError as e:
            self._send(wire.ProfileDone(start, error=str(e)))
        except Exception as e:  # writing the trace failed: say so, keep serving
            logger.exception("profiler %s failed", "start" if start else "stop")
            self._send(wire.ProfileDone(start, error=f"{type(e).__name__}: {e}"))

    def _drain_inbox(self, timeout_ms: int) -> None:
        if not self.pull.poll(timeout_ms):
            return
        while True:
            try:
                raw = self.pull.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._handle(wire.to_engine_decoder.decode(raw.buffer))
        self.stats = self._stats()  # aborts free blocks without a step

    # ---- heartbeat -------------------------------------------------------------------------------
    def _heartbeat_loop(self, ctx: zmq.Context, output_addr: str) -> None:
        sock = ctx.socket(zmq.PUSH)  # zmq sockets are not thread-safe: the thread has its own
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 16)
        sock.connect(output_addr)
        orphaned_at = None
        try:
            while True:
                started = self.step_started
                beat = wire.Heartbeat(self.stats, self.num_steps,
                                      time.monotonic() - started if started is not None else 0.0,
                                      self.longest_step_s)
                try:
                    sock.send(wire.encoder.encode(beat), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                if os.getppid() != self.parent_pid:
                    if orphaned_at is None:
                        logger.warning("API server process is gone; engine core exits")
                        orphaned_at = time.monotonic()
                        self.stop_requested = True
                    elif time.monotonic() - orphaned_at > ORPHAN_GRACE_S:
                        os._exit(1)  # the main thread is stuck in a step; nobody is listening anyway
                time.sleep(HEARTBEAT_S)
        except zmq.ZMQError:  # context terminated: the process is leaving
            pass
        finally:
            sock.close(0)

    # ---- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        core = self.core
        while not self.stop_requested:
            busy = core.has_unfinished_requests()
            if self.draining and not busy:
                logger.info("drained; engine core exits")
                break
            self._drain_inbox(0 if busy else IDLE_POLL_MS)
            if self.stop_requested:
                break
            if core.has_unfinished_requests():
                started = time.monotonic()
                self.step_started = started
                outputs = core.step()
                elapsed = time.monotonic() - started
                self.step_started = None
                self.num_steps += 1
                if elapsed > self.longest_step_s:
                    self.longest_step_s = elapsed
                if outputs.token_ids or outputs.errors or outputs.prompt_logprobs:
                    self._send(wire.EngineOutputs(outputs))
                self.stats = self._stats()
        self.stats = self._stats()
        self._send(wire.Heartbeat(self.stats, self.num_steps, 0.0, self.longest_step_s))  # the freed blocks


def _vocab_size(core) -> int | None:
    for holder in (core, getattr(core, "runner", None), getattr(core, "config", None)):
        v = getattr(holder, "vocab_size", None)
        if isinstance(v, int):
            return v
    return None


def _fail_fast(output: str):
    """A fatal handler for the tensor-parallel executor: a dead worker ends the engine at once (even while it
    idles), saying which rank died; the front-end then reports the engine dead."""

    def handler(message: str) -> None:
        logger.error("engine core exits: %s", message)
        ctx = zmq.Context()  # this runs on the executor's watch thread: its own context, flushed below
        sock = ctx.socket(zmq.PUSH)
        sock.connect(output)
        sock.send(wire.encoder.encode(wire.EngineFailed(message)))
        sock.close(linger=2000)
        ctx.term()  # returns once the message is out (or after the linger)
        time.sleep(0.3)  # let the front-end read why before it sees the process exit
        os._exit(1)

    return handler


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
    proc: EngineCoreProc | None = None

    def on_sigterm(signum, frame):
        if proc is None:
            raise SystemExit(0)
        proc.draining = True

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
        from atom_server.engine.engine_core import EngineCore

        args = _engine_args_from_env()
        configure_engine_process(args)  # on CPU: threads and pinning, before torch starts its pool
        core = EngineCore(args)
        if hasattr(core.runner, "set_fatal_handler"):  # tensor parallel: a dead worker is fatal
            core.runner.set_fatal_handler(_fail_fast(ns.output))
        push.send(wire.encoder.encode(wire.EngineReady(
            pid=os.getpid(),
            model_path=str(core.model_path),
            served_model_name=str(core.served_model_name),
            max_model_len=int(core.max_model_len),
            dtype=str(core.dtype).removeprefix("torch."),
            kernel_backend=str(core.kernel_backend),
            kv_capacity_tokens=int(core.kv_capacity_tokens),
            vocab_size=_vocab_size(core),
            profiling=core.profiler.enabled,
            model_type=getattr(core.config, "model_type", None),
        )))
        proc = EngineCoreProc(core, ctx, pull, push, ns.output, ns.parent_pid)
        proc.run()
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
