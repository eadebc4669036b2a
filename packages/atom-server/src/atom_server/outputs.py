"""What the engine reports.

Two levels, as in vLLM:
- the engine core reports token ids: per request and step, the *new* token ids (and logprobs) of each
  sequence plus its finish state (`EngineCoreOutput`, msgspec structs that cross the ZMQ socket as they are);
- the output processor (atom_server.output_processor, in the API process or in-process for the offline `LLM`)
  turns those into text and stop-string decisions and reports `RequestOutput`s (vLLM's shapes, plain
  dataclasses of builtins).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely token
    decoded_token: str | None = None


# One entry per token: token id -> Logprob (top-N plus the chosen token).
TokenLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None
    stop_reason: str | int | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's outputs. Cumulative (everything so far) or, for streaming consumers, a delta: the text,
    token ids and logprobs that are new since the previous RequestOutput of the same request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)


# ---- engine core -> output processor ----------------------------------------------------------------
class PositionLogprobs(msgspec.Struct, array_like=True):
    """Logprobs of one position: the chosen token, its logprob and rank, then the top-N ids and values."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class SequenceDelta(msgspec.Struct, array_like=True):
    """What one sequence (one of a request's n) produced since its last report."""

    index: int
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None] | None = None
    # "stop" (an EOS or stop token: the last id), "length", "abort"; None while running
    finish_reason: str | None = None
    stop_reason: int | None = None  # the stop token id when stop_token_ids ended it


class EngineCoreOutput(msgspec.Struct, array_like=True):
    request_id: str
    seqs: list[SequenceDelta]
    finished: bool = False  # every sequence of the request is done; the engine has forgotten it
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # entries new since the last report
    num_cached_tokens: int = 0
    error: str | None = None  # the engine failed this request (finished is True); the reason, for the log
