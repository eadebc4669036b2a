"""The API server's handle on the engine-core process: spawn it, turn its token-id outputs into per-request
RequestOutputs (the output processor runs here), abort requests, notice when the engine dies or stalls,
and restart it when asked to."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import glob
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from atom_server.config import EngineArgs
from atom_server.output_processor import OutputKind, OutputProcessor
from atom_server.outputs import CompletionOutput, EngineCoreOutputs, RequestOutput
from atom_server.sampling_params import SamplingParams
from atom_server.serving import wire
from atom_server.serving.engine_proc import ENGINE_ARGS_ENV
from atom_server.serving.liveness import LivenessMonitor
from atom_server.serving.metrics import Metrics, RequestTracker

logger = logging.getLogger("atom_server.api")

IPC_PREFIX = "atom-zmq-"


class EngineDeadError(RuntimeError):
    pass


class EngineShutdownError(RuntimeError):
    """The server is shutting down and the request's drain time ran out."""


class EngineRequestError(RuntimeError):
    """The engine refused a request (e.g. a prompt longer than max_model_len) or failed it."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class EngineState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    CLOSED = "closed"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_ipc_dirs(tmp: str | None = None) -> list[str]:
    """IPC folders left by API servers that were killed (named atom-zmq-<pid>-*): remove those whose process
    is gone. Returns what was removed."""
    removed = []
    for path in glob.glob(os.path.join(tmp or tempfile.gettempdir(), IPC_PREFIX + "*")):
        pid_part = os.path.basename(path)[len(IPC_PREFIX):].split("-", 1)[0]
        try:
            owned = os.stat(path).st_uid == os.getuid()
        except OSError:
            continue
        if pid_part.isdigit() and owned and not _pid_alive(int(pid_part)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class _RequestStream:
    """Outputs waiting for one request's consumer. Deltas that pile up while the consumer is busy are merged
    into one, so a slow client costs memory for its text, not one message per step."""

    def __init__(self, track: RequestTracker):
        self.track = track
        self.pending: RequestOutput | None = None
        self.error: Exception | None = None
        self.event = asyncio.Event()
        self.finished = False  # the last output (or an error) arrived: nothing left in the engine

    def put(self, out: RequestOutput) -> None:
        if self.pending is None:
            self.pending = out
        else:
            _merge_delta(self.pending, out)
        self.finished = self.finished or out.finished
        self.event.set()

    def fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.event.set()

    async def get(self) -> RequestOutput:
        await self.event.wait()
        if self.pending is not None:
            out, self.pending = self.pending, None
            if self.error is None:
                self.event.clear()
            return out
        raise self.error


def _merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    by_index = {co.index: co for co in into.outputs}
    for co in new.outputs:
        old = by_index.get(co.index)
        if old is None:
            into.outputs.append(CompletionOutput(co.index, co.text, list(co.token_ids), co.cumulative_logprob,
                                                 list(co.logprobs) if co.logprobs is not None else None,
                                                 co.finish_reason, co.stop_reason))
            continue
        old.text += co.text
        old.token_ids.extend(co.token_ids)
        if co.logprobs is not None:
            old.logprobs = (old.logprobs or []) + co.logprobs
        old.cumulative_logprob = co.cumulative_logprob
        old.finish_reason, old.stop_reason = co.finish_reason, co.stop_reason
    into.outputs.sort(key=lambda c: c.index)
    if into.prompt_logprobs is None:
        into.prompt_logprobs = new.prompt_logprobs
    into.finished = new.finished
    into.metrics = new.metrics


class EngineClient:
    def __init__(self, args: EngineArgs, metrics: Metrics | None = None, liveness: LivenessMonitor | None = None):
        self.args = args
        self.metrics = metrics or Metrics()
        self.liveness = liveness or LivenessMonitor()
        self.info: wire.EngineReady | None = None
        self.stats: dict[str, float] = {}
        self.state = EngineState.STARTING
        self.dead_reason: str | None = None
        self.died = asyncio.Event()  # set when the engine dies; the server decides: exit or restart
        self.processor = OutputProcessor(None)
        self._streams: dict[str, _RequestStream] = {}
        self._proc: asyncio.subprocess.Process | None = None
        for path in remove_stale_ipc_dirs():
            logger.info("removed the IPC folder of a server that is gone: %s", path)
        self._tmpdir = tempfile.mkdtemp(prefix=f"{IPC_PREFIX}{os.getpid()}-")
        self._ctx = zmq.asyncio.Context()
        self._generation = 0
        self._open_sockets()
        self._tasks: list[asyncio.Task] = []

    def _open_sockets(self) -> None:
        """Fresh sockets per engine process, so nothing a dead engine left in flight reaches its successor."""
        self._generation += 1
        self._in_addr = f"ipc://{self._tmpdir}/to_engine.{self._generation}"
        self._out_addr = f"ipc://{self._tmpdir}/from_engine.{self._generation}"
        self._to_engine = self._ctx.socket(zmq.PUSH)
        self._to_engine.setsockopt(zmq.SNDHWM, 0)
        self._to_engine.setsockopt(zmq.LINGER, 0)
        self._from_engine = self._ctx.socket(zmq.PULL)
        self._to_engine.bind(self._in_addr)
        self._from_engine.bind(self._out_addr)

    def _close_sockets(self) -> None:
        self._to_engine.close(0)
        self._from_engine.close(0)

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return self.state is not EngineState.READY

    @property
    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    def attach_tokenizer(self, tokenizer) -> None:
        """The API process's tokenizer: detokenization and stop strings happen here."""
        self.processor = OutputProcessor(tokenizer)

    async def start(self, startup_timeout_s: float | None = None) -> wire.EngineReady:
        """Spawn the engine process and wait until its model is loaded."""
        self.state = EngineState.STARTING
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
        self.liveness = LivenessMonitor(self.liveness.config)
        self.state = EngineState.READY
        self.dead_reason = None
        self.died.clear()
        self._tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._watchdog())]
        return self.info

    async def restart(self) -> wire.EngineReady:
        """Replace a dead engine process with a fresh one (the requests it held have failed already)."""
        await self._kill_engine()
        await self._stop_tasks()
        self._close_sockets()
        self._open_sockets()
        return await self.start()

    async def _kill_engine(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()  # also ends a stopped (SIGSTOP) process
            await self._proc.wait()

    async def _stop_tasks(self) -> None:
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()
        for t in self._tasks:
            if t is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self._tasks = []

    async def drain(self, timeout_s: float) -> int:
        """Shutdown: wait up to timeout_s for the requests in flight to finish; fail the rest (streams get
        an error event). Returns how many were cut short."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = list(self._streams)
        if cut:
            logger.warning("shutdown timeout (%.0f s) reached: ending %d request(s) with an error", timeout_s,
                           len(cut))
            for rid in cut:
                self._streams[rid].fail(EngineShutdownError("the server is shutting down"))
            self.abort(cut)
        return len(cut)

    async def shutdown(self, timeout_s: float = 30.0) -> int | None:
        """Ask the engine to exit (after the API server has drained) and wait for it."""
        self.state = EngineState.CLOSED
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(zmq.ZMQError):
                self._to_engine.send(wire.encoder.encode(wire.Shutdown()), zmq.NOBLOCK)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("engine did not exit within %.0f s; killing it", timeout_s)
                await self._kill_engine()
        await self._stop_tasks()
        self._close_sockets()
        self._ctx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        return self._proc.returncode if self._proc is not None else None

    def _mark_dead(self, reason: str) -> None:
        if self.state is not EngineState.READY:
            return
        self.state = EngineState.DEAD
        self.dead_reason = reason
        logger.error("engine is dead: %s", reason)
        for stream in self._streams.values():
            stream.fail(EngineDeadError(reason))
        self.processor = OutputProcessor(self.processor.tokenizer)  # what it tracked died with the engine
        self.died.set()

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
            await self._kill_engine()

    def _dispatch(self, msg) -> None:
        if isinstance(msg, wire.EngineOutputs):
            self._on_outputs(msg.outputs)
        elif isinstance(msg, wire.Heartbeat):
            self.liveness.beat(msg.num_steps, msg.step_running_s, msg.longest_step_s)
            self.stats = msg.stats
            self.metrics.update_engine_stats(msg.stats)
        elif isinstance(msg, wire.RequestFailed):
            self.processor.abort(msg.request_id)
            stream = self._streams.get(msg.request_id)
            if stream is not None:
                stream.finished = True
                stream.fail(EngineRequestError(msg.message, msg.status))
        elif isinstance(msg, wire.EngineFailed):
            self._mark_dead(f"engine failed: {msg.message}")

    def _on_outputs(self, outputs: EngineCoreOutputs) -> None:
        processed = self.processor.process(outputs)
        if processed.stop:
            self._send_quiet(wire.StopSequences(processed.stop))
        streams = self._streams
        now = time.monotonic()
        for rid, n in Counter(outputs.request_ids).items():
            stream = streams.get(rid)
            if stream is not None:
                stream.track.on_tokens(n, now)
        for out in processed.outputs:
            stream = streams.get(out.request_id)
            if stream is not None and out.request_id not in processed.errors:
                stream.put(out)
        for rid, error in processed.errors.items():
            logger.error("request %s failed in the engine: %s", rid, error)
            stream = streams.get(rid)
            if stream is not None:
                stream.finished = True
                stream.fail(EngineRequestError(error, 500))
        for rid, reason in processed.finished.items():
            stream = streams.get(rid)
            if stream is not None and rid not in processed.errors:
                stream.track.on_finish(reason)

    async def _watchdog(self) -> None:
        exited = asyncio.ensure_future(self._proc.wait())
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=0.25)
                if done:
                    if self.state is EngineState.READY:
                        self._mark_dead(f"engine process exited with code {exited.result()}")
                    return
                stalled = self.liveness.stalled()
                if stalled is not None:
                    self._mark_dead(stalled)
                    await self._kill_engine()
                    return
        finally:
            exited.cancel()

    # ---- requests --------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        if self.dead:
            raise EngineDeadError(self.dead_reason or f"the engine is {self.state.value}")
        try:
            self._to_engine.send(wire.encoder.encode(msg), zmq.NOBLOCK)
        except zmq.Again as e:  # no engine connected to the socket any more
            self._mark_dead("engine socket is gone")
            raise EngineDeadError(self.dead_reason) from e

    def _send_quiet(self, msg) -> None:
        with contextlib.suppress(EngineDeadError):
            self._send(msg)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.processor.abort(rid)
        self._send_quiet(wire.AbortRequests(request_ids))

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, stream: bool = True) -> AsyncIterator[RequestOutput]:
        """stream=True: yields delta RequestOutputs (what is new: text, token ids, logprobs), merged when the
        consumer is slower than the engine; stream=False: yields the final cumulative output once. The last
        output has finished=True. Leaving early aborts the request."""
        if self.dead:
            raise EngineDeadError(self.dead_reason or f"the engine is {self.state.value}")
        if request_id in self._streams:
            raise EngineRequestError(f"request id {request_id!r} is already in use", 400)
        try:
            self.processor.add_request(request_id, prompt, prompt_token_ids, params,
                                       OutputKind.DELTA if stream else OutputKind.FINAL_ONLY)
        except ValueError as e:
            raise EngineRequestError(str(e), 400) from e
        s = _RequestStream(self.metrics.track_request(len(prompt_token_ids)))
        self._streams[request_id] = s
        try:
            self._send(wire.AddRequest(request_id, list(prompt_token_ids), params))
            while True:
                out = await s.get()
                yield out
                if out.finished:
                    return
        except (EngineDeadError, EngineRequestError):
            s.finished = True  # nothing of it is left in the engine
            s.track.on_error()
            raise
        except EngineShutdownError:
            s.track.on_error()
            raise
        finally:
            self._streams.pop(request_id, None)
            if not s.finished:  # the client left (or the server is shutting down): stop it in the engine
                s.track.on_abort()
                self.abort([request_id])
            else:
                self.processor.abort(request_id)
