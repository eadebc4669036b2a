"""Async plumbing between engine outputs and HTTP responses: merge several requests, stop (and abort)
when the client disconnects, server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import Request

from atom_server.outputs import RequestOutput

logger = logging.getLogger("atom_server.api")


async def _wait_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(raw: Request, source: AsyncIterator) -> AsyncIterator:
    """Iterate `source`; when the client goes away, close it (which aborts its engine requests).

    The cleanup is shielded: a streaming response is cancelled by Starlette when its client leaves (anyio
    cancels again at every await in the cancelled scope), and closing `source` while its pending step still
    runs would fail ("asynchronous generator is already running") and surface as a server error."""
    gone = asyncio.ensure_future(_wait_disconnect(raw))
    nxt: asyncio.Future | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(source.__anext__())
            await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                logger.info("client disconnected; request aborted")
                return
            done, nxt = nxt, None
            try:
                item = done.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        gone.cancel()
        with anyio.CancelScope(shield=True):
            if nxt is not None:
                nxt.cancel()
                await asyncio.wait({nxt})
                if not nxt.cancelled():
                    nxt.exception()  # retrieved: the request is being dropped anyway
            await source.aclose()


async def merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as (index, output), as they come; closing it aborts them all."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0]) as g:
            async for out in g:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done_marker = object()

    async def pump(i: int, gen) -> None:
        try:
            async with contextlib.aclosing(gen):
                async for out in gen:
                    queue.put_nowait((i, out))
            queue.put_nowait((i, done_marker))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done_marker:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def chain(first, source: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in source:
        yield item


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
