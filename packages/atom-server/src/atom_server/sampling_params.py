"""Per-request sampling parameters, with vLLM's names, defaults and checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# Every integer crosses the engine socket as msgpack and may end up in an int64 tensor.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_FLOAT_PARAM = 1e6  # temperature and repetition_penalty beyond this only produce NaNs or infinities
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        def integer(name: str, lo: int, hi: int = INT64_MAX, optional: bool = False, why: str = "") -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise bad(name, why or f"must be an integer in [{lo}, {hi}]")

        def finite(name: str, lo: float, hi: float, lo_open: bool = False, why: str = "") -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or not (lo < v if lo_open else lo <= v) or v > hi:
                raise bad(name, why or f"must be a number in {'(' if lo_open else '['}{lo}, {hi}]")

        integer("n", 1, why="must be an integer >= 1")
        finite("temperature", 0.0, MAX_FLOAT_PARAM, why=f"must be >= 0 (and at most {MAX_FLOAT_PARAM:g})")
        finite("top_p", 0.0, 1.0, lo_open=True, why="must be in (0, 1]")
        integer("top_k", 0, why="must be -1 or 0 (off) or a positive integer")
        finite("min_p", 0.0, 1.0, why="must be in [0, 1]")
        integer("max_tokens", 1, optional=True, why="must be an integer >= 1")
        integer("min_tokens", 0, why="must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must hold non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings of at most "
                             f"{MAX_STOP_STRING_CHARS} characters")
        if any(not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative token ids")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids")
        for name in ("logprobs", "prompt_logprobs"):
            integer(name, -1, optional=True, why="must be None, -1 (whole vocabulary) or an integer >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            finite(name, -2.0, 2.0, why="must be in [-2, 2]")
        finite("repetition_penalty", 0.0, MAX_FLOAT_PARAM, lo_open=True,
               why=f"must be > 0 (and at most {MAX_FLOAT_PARAM:g})")
        integer("seed", INT64_MIN, optional=True, why="must be an integer in the int64 range")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def clone(self, **changes) -> SamplingParams:
        return replace(self, **changes)
