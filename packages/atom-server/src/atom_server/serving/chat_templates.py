"""Chat templates rendered in worker processes (chat_template_worker.py): Jinja's sandbox, a time bound (a
worker that does not answer in time is killed and replaced), a memory bound (RLIMIT_DATA in the worker)
and a size bound on the result. The API server's event loop never runs template code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import sys

import msgspec

from atom_server.serving.chat_template_worker import MEMORY_ENV

logger = logging.getLogger("atom_server.api")
_HEADER = struct.Struct(">I")


class TemplateError(ValueError):
    """The template (or the messages given to it) could not be rendered within the bounds: the request's
    fault, a 400."""


class _Worker:
    def __init__(self, memory_bytes: int):
        self.memory_bytes = memory_bytes
        self.proc: asyncio.subprocess.Process | None = None

    async def ensure(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            return
        env = {**os.environ, MEMORY_ENV: str(self.memory_bytes)}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "atom_server.serving.chat_template_worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
        await self.proc.stdout.readexactly(_HEADER.size)  # ready

    async def call(self, job: bytes, timeout_s: float) -> dict:
        await self.ensure()
        proc = self.proc
        proc.stdin.write(_HEADER.pack(len(job)) + job)

        async def exchange() -> bytes:
            await proc.stdin.drain()
            n = _HEADER.unpack(await proc.stdout.readexactly(_HEADER.size))[0]
            return await proc.stdout.readexactly(n)

        reply = await asyncio.wait_for(exchange(), timeout_s)
        return msgspec.msgpack.decode(reply)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self.proc = None


class ChatTemplateRenderer:
    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, memory_bytes: int = 1 << 30,
                 max_chars: int = 64 << 20):
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self._workers = [_Worker(memory_bytes) for _ in range(max(1, num_workers))]
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        for w in self._workers:
            self._idle.put_nowait(w)

    async def start(self) -> None:
        await asyncio.gather(*(w.ensure() for w in self._workers))

    async def render(self, template: str, messages: list[dict], *, add_generation_prompt: bool,
                     continue_final_message: bool, kwargs: dict, tools: list | None = None,
                     documents: list | None = None) -> str:
        try:
            job = msgspec.msgpack.encode({
                "template": template, "messages": messages, "tools": tools, "documents": documents,
                "add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                "kwargs": kwargs, "max_chars": self.max_chars})
        except (OverflowError, TypeError, ValueError) as e:  # e.g. an integer beyond 64 bits in a message
            raise TemplateError(f"the messages hold a value the chat template cannot take: {e}") from e
        worker = await self._idle.get()
        try:
            try:
                reply = await worker.call(job, self.timeout_s)
            except asyncio.TimeoutError:
                await worker.kill()
                raise TemplateError(f"rendering the chat template took longer than {self.timeout_s:g} s") from None
            except (asyncio.IncompleteReadError, BrokenPipeError, ConnectionResetError):
                await worker.kill()
                raise TemplateError("rendering the chat template failed (the renderer process died)") from None
            except BaseException:  # cancelled (client gone): the worker may be mid-job; start a fresh one
                await asyncio.shield(worker.kill())
                raise
        finally:
            self._idle.put_nowait(worker)
        if "error" in reply:
            raise TemplateError(f"cannot apply the chat template: {reply['error']}")
        return reply["text"]

    async def close(self) -> None:
        for w in self._workers:
            await w.kill()
