"""Tokenization and detokenization off the event loop: a small thread pool with a bounded queue.

Prompts are encoded with a bound: a text far longer than the context could hold is refused after encoding
a prefix, without building millions of token ids (a 10 MB prompt would otherwise take seconds and a GB of
memory just to be refused). Fast (Rust) tokenizers release the GIL while they encode, so the loop keeps
answering meanwhile.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
from concurrent.futures import ThreadPoolExecutor

PROBE_MARGIN_TOKENS = 64  # a prefix's count can exceed the whole text's by boundary effects: stay well clear
PROBE_CHARS_PER_TOKEN = 16  # prefixes this many characters per allowed token are probed first
LARGE_TEXT_CHARS = 1 << 20  # after encoding texts this long, give the freed memory back to the OS


class PromptTooLong(ValueError):
    """The prompt has more than num_tokens tokens (counted on a prefix only)."""

    def __init__(self, num_tokens: int):
        super().__init__(f"more than {num_tokens} tokens")
        self.num_tokens = num_tokens


class QueueFull(RuntimeError):
    pass


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Preprocessor:
    def __init__(self, tokenizer, num_threads: int = 2, max_pending: int = 256):
        self.tokenizer = tokenizer
        self.max_pending = max_pending
        self._pending = 0
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="atom-preprocess")
        backend = getattr(tokenizer, "_tokenizer", None)
        self._fast = backend if hasattr(backend, "encode_batch") else None

    async def run(self, fn, *args):
        if self._pending >= self.max_pending:
            raise QueueFull(f"{self._pending} requests are waiting for tokenization")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._pending -= 1

    async def encode(self, text: str, add_special_tokens: bool, max_tokens: int) -> list[int]:
        """Token ids of text; PromptTooLong when it has far more than max_tokens (a shorter text that is still
        too long comes back whole: the caller's length check names its exact size)."""
        return await self.run(self.encode_bounded, text, add_special_tokens, max_tokens)

    async def decode(self, ids: list[int]) -> str:
        return await self.run(self.tokenizer.decode, ids)

    def encode_bounded(self, text: str, add_special_tokens: bool, max_tokens: int) -> list[int]:
        probe_chars = (max_tokens + PROBE_MARGIN_TOKENS) * PROBE_CHARS_PER_TOKEN
        try:
            if self._fast is not None and len(text) > probe_chars:
                probe = self._fast.encode_batch([text[:probe_chars]], add_special_tokens=add_special_tokens)[0]
                if len(probe) > max_tokens + PROBE_MARGIN_TOKENS:
                    raise PromptTooLong(len(probe) - PROBE_MARGIN_TOKENS)
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        finally:
            if len(text) > LARGE_TEXT_CHARS:
                _release_memory()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
