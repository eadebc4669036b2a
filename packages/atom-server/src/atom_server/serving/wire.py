"""Messages between the API server and the engine process: msgspec (msgpack) structs, never pickle."""

from __future__ import annotations

import msgspec

from atom_server.outputs import TokenLogprobs
from atom_server.sampling_params import SamplingParams


# front-end -> engine
class AddRequest(msgspec.Struct, tag="add"):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


# engine -> front-end
class EngineReady(msgspec.Struct, tag="ready"):
    pid: int
    model_path: str
    served_model_name: str
    max_model_len: int
    dtype: str
    kernel_backend: str
    kv_capacity_tokens: int
    vocab_size: int | None = None


class CompletionDelta(msgspec.Struct):
    """What is new in one sequence since the last message (see output_deltas)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: str | int | None
    text_reset: bool = False  # text replaces what was sent before instead of extending it


class RequestDelta(msgspec.Struct):
    request_id: str
    finished: bool
    metrics: dict[str, float]
    outputs: list[CompletionDelta]
    prompt: str | None = None  # prompt fields: first message of a request only
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # when it changed


class EngineOutputs(msgspec.Struct, tag="outputs"):
    outputs: list[RequestDelta]


class RequestFailed(msgspec.Struct, tag="error"):
    request_id: str
    message: str
    status: int = 400


class Heartbeat(msgspec.Struct, tag="beat"):
    stats: dict[str, float]


class EngineFailed(msgspec.Struct, tag="failed"):
    message: str


ToEngine = AddRequest | AbortRequests | Shutdown
FromEngine = EngineReady | EngineOutputs | RequestFailed | Heartbeat | EngineFailed

encoder = msgspec.msgpack.Encoder()
to_engine_decoder = msgspec.msgpack.Decoder(ToEngine)
from_engine_decoder = msgspec.msgpack.Decoder(FromEngine)
