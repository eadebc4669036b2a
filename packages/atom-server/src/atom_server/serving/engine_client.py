"""The API server's handle on the engine-core process: spawn it, stream its outputs per request,
abort requests, and notice when it dies (process exit, failure message or missed heartbeats)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from atom_server.config import EngineArgs
from atom_server.outputs import RequestOutput
from atom_server.sampling_params import SamplingParams
from atom_server.serving import wire
from atom_server.serving.engine_proc import ENGINE_ARGS_ENV
from atom_server.serving.output_deltas import DeltaDecoder
from atom_server.serving.metrics import Metrics

logger = logging.getLogger("atom_server.api")


class EngineDeadError(RuntimeError):
    pass


class EngineRequestError(RuntimeError):
    """The engine refused a request (e.g. a prompt longer than max_model_len)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class EngineClient:
    def __init__(self, args: EngineArgs, metrics: Metrics | None = None,
                 heartbeat_timeout_s: float | None = None):
        self.args = args
        self.metrics = metrics or Metrics()
        self.heartbeat_timeout_s = heartbeat_timeout_s or float(
            os.environ.get("ATOM_ENGINE_HEARTBEAT_TIMEOUT_S", "120"))
        self.info: wire.EngineReady | None = None
        self.stats: dict[str, float] = {}
        self.dead_reason: str | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._deltas = DeltaDecoder()
        self._proc: asyncio.subprocess.Process | None = None
        self._tmpdir = tempfile.mkdtemp(prefix="atom-zmq-")
        self._ctx = zmq.asyncio.Context()
        self._to_engine = self._ctx.socket(zmq.PUSH)
        self._to_engine.setsockopt(zmq.SNDHWM, 0)
        self._to_engine.setsockopt(zmq.LINGER, 0)
        self._from_engine = self._ctx.socket(zmq.PULL)
        self._in_addr = f"ipc://{self._tmpdir}/to_engine"
        self._out_addr = f"ipc://{self._tmpdir}/from_engine"
        self._to_engine.bind(self._in_addr)
        self._from_engine.bind(self._out_addr)
        self._tasks: list[asyncio.Task] = []
        self._last_beat = time.monotonic()
        self._closing = False

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return self.dead_reason is not None

    @property
    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, startup_timeout_s: float | None = None) -> wire.EngineReady:
        """Spawn the engine process and wait until its model is loaded."""
        env = dict(os.environ)
        env[ENGINE_ARGS_ENV] = msgspec.json.encode(self.args).decode()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "atom_server.serving.engine_proc",
            "--input", self._in_addr, "--output", self._out_addr, "--parent-pid", str(os.getpid()),
            env=env,
        )
        timeout = startup_timeout_s or float(os.environ.get("ATOM_ENGINE_STARTUP_TIMEOUT_S", "1800"))
        recv = asyncio.ensure_future(self._from_engine.recv())
        exited = asyncio.ensure_future(self._proc.wait())
        try:
            done, _ = await asyncio.wait({recv, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if recv in done:
                msg = wire.from_engine_decoder.decode(recv.result())
                if isinstance(msg, wire.EngineReady):
                    self.info = msg
                elif isinstance(msg, wire.EngineFailed):
                    raise RuntimeError(f"engine failed to start: {msg.message}")
                else:
                    raise RuntimeError(f"unexpected first message from engine: {type(msg).__name__}")
            elif exited in done:
                raise RuntimeError(f"engine process exited with code {exited.result()} while starting")
            else:
                raise RuntimeError(f"engine did not start within {timeout:.0f} s")
        except BaseException:
            recv.cancel()
            exited.cancel()
            await self._kill_engine()
            raise
        exited.cancel()
        self._last_beat = time.monotonic()
        self._tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._watchdog())]
        return self.info

    async def _kill_engine(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()

    async def shutdown(self, timeout_s: float = 30.0) -> int | None:
        """Ask the engine to exit (after the API server has drained) and wait for it."""
        self._closing = True
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(zmq.ZMQError):
                self._to_engine.send(wire.encoder.encode(wire.Shutdown()), zmq.NOBLOCK)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("engine did not exit within %.0f s; killing it", timeout_s)
                await self._kill_engine()
        for t in self._tasks:
            t.cancel()
        self._to_engine.close(0)
        self._from_engine.close(0)
        self._ctx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        return self._proc.returncode if self._proc is not None else None

    def _mark_dead(self, reason: str) -> None:
        if self.dead:
            return
        self.dead_reason = reason
        if not self._closing:
            logger.error("engine is dead: %s", reason)
        for q in self._queues.values():
            q.put_nowait(EngineDeadError(reason))

    async def _output_loop(self) -> None:
        try:
            while True:
                raw = await self._from_engine.recv(copy=False)
                self._dispatch(wire.from_engine_decoder.decode(raw.buffer))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave requests waiting on a loop that is gone
            logger.exception("cannot read the engine's messages")
            self._mark_dead(f"bad message from the engine: {type(e).__name__}: {e}")

    def _dispatch(self, msg) -> None:
        if isinstance(msg, wire.EngineOutputs):
            for delta in msg.outputs:
                out = self._deltas.apply(delta)
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
        elif isinstance(msg, wire.Heartbeat):
            self._last_beat = time.monotonic()
            self.stats = msg.stats
            self.metrics.update_engine_stats(msg.stats)
        elif isinstance(msg, wire.RequestFailed):
            q = self._queues.get(msg.request_id)
            if q is not None:
                q.put_nowait(EngineRequestError(msg.message, msg.status))
        elif isinstance(msg, wire.EngineFailed):
            self._mark_dead(f"engine failed: {msg.message}")

    async def _watchdog(self) -> None:
        exited = asyncio.ensure_future(self._proc.wait())
        while True:
            done, _ = await asyncio.wait({exited}, timeout=0.25)
            if done:
                if not self._closing:
                    self._mark_dead(f"engine process exited with code {exited.result()}")
                else:
                    self.dead_reason = self.dead_reason or "engine stopped"
                return
            silent = time.monotonic() - self._last_beat
            if silent > self.heartbeat_timeout_s:
                self._mark_dead(f"no heartbeat from the engine for {silent:.0f} s")
                await self._kill_engine()
                return

    # ---- requests --------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        if self.dead:
            raise EngineDeadError(self.dead_reason)
        try:
            self._to_engine.send(wire.encoder.encode(msg), zmq.NOBLOCK)
        except zmq.Again as e:  # no engine connected to the socket any more
            self._mark_dead("engine socket is gone")
            raise EngineDeadError(self.dead_reason) from e

    def abort(self, request_ids: list[str]) -> None:
        with contextlib.suppress(EngineDeadError):
            self._send(wire.AbortRequests(request_ids))

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields cumulative RequestOutputs (intermediate ones may be skipped when the consumer is
        slower than the engine); the last has finished=True. Leaving early aborts the request."""
        if self.dead:
            raise EngineDeadError(self.dead_reason)
        if request_id in self._queues:
            raise EngineRequestError(f"request id {request_id!r} is already in use", 400)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        track = self.metrics.track_request(len(prompt_token_ids))
        finished = False
        try:
            try:
                self._send(wire.AddRequest(request_id, list(prompt_token_ids), params, prompt))
            except EngineDeadError:
                track.on_error()
                finished = True
                raise
            while True:
                item = await q.get()
                while not isinstance(item, Exception) and not item.finished and not q.empty():
                    item = q.get_nowait()  # outputs are cumulative: the latest says it all
                if isinstance(item, Exception):
                    track.on_error()
                    finished = True  # nothing left in the engine to abort
                    raise item
                track.on_output(item)
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                track.on_abort()
                self.abort([request_id])
