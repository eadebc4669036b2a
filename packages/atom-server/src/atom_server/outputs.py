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


class EngineCoreOutputs(msgspec.Struct, array_like=True):
    """What one engine step produced, column-wise (a decode step of a large batch costs a few list appends
    per sequence, not an object each). Row i: sequence seq_indices[i] of request request_ids[i] took token
    token_ids[i]; a sequence may take two tokens in one step (an async step resolved, then a new one)."""

    request_ids: list[str] = []
    seq_indices: list[int] = []
    token_ids: list[int] = []
    # rows whose token ended the sequence: "stop" (an EOS or stop token; the stop token id when stop_token_ids
    # ended it) or "length"
    finish_rows: list[int] = []
    finish_reasons: list[str] = []
    stop_token_ids: list[int | None] = []
    logprobs: dict[int, PositionLogprobs] = {}  # row -> logprobs (requests that asked for them)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = {}  # request id -> entries new in this step
    num_cached_tokens: dict[str, int] = {}  # request id -> prompt tokens its admission found cached
    errors: dict[str, str] = {}  # request id -> why the engine failed it (it is forgotten)

    def add(self, request_id: str, index: int, token: int) -> int:
        self.request_ids.append(request_id)
        self.seq_indices.append(index)
        self.token_ids.append(token)
        return len(self.token_ids) - 1

    def finish(self, row: int, reason: str, stop_token: int | None) -> None:
        self.finish_rows.append(row)
        self.finish_reasons.append(reason)
        self.stop_token_ids.append(stop_token)
