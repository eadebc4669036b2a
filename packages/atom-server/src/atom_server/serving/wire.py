"""Messages between the API server and the engine process: msgspec (msgpack) structs, never pickle.

The engine sends token ids only (EngineCoreOutputs: the tokens each sequence took in a step, column-wise);
the API server's output processor turns them into text. Heartbeats come from a thread of their own in the
engine process, so a long step does not silence them; they carry the step progress the API server's
liveness check needs.
"""

from __future__ import annotations

import msgspec

from atom_server.outputs import EngineCoreOutputs
from atom_server.sampling_params import SamplingParams


# front-end -> engine
class AddRequest(msgspec.Struct, tag="add"):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None  # not used by the engine (text stays in the API process)
    priority: int = 0


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class StopSequences(msgspec.Struct, tag="stop"):
    """Sequences whose text reached a stop string in the API process (request id -> sequence indices)."""
    stops: dict[str, list[int]]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class Profile(msgspec.Struct, tag="profile"):
    """Start (or stop) the engine's torch profiler (POST /start_profile, /stop_profile)."""
    start: bool


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
    profiling: bool = False  # --profiler-dir given: /start_profile and /stop_profile exist
    model_type: str | None = None  # config.json's (the chat layer reads gpt_oss's harmony format)


class EngineOutputs(msgspec.Struct, tag="outputs"):
    outputs: EngineCoreOutputs


class RequestFailed(msgspec.Struct, tag="error"):
    request_id: str
    message: str
    status: int = 400


class Heartbeat(msgspec.Struct, tag="beat"):
    stats: dict[str, float]
    num_steps: int = 0
    step_running_s: float = 0.0  # how long the step in progress has been running (0: idle)
    longest_step_s: float = 0.0  # the longest step so far


class EngineFailed(msgspec.Struct, tag="failed"):
    message: str


class ProfileDone(msgspec.Struct, tag="profiled"):
    """The engine's answer to Profile: error is None when it worked; trace_path once a trace is written."""
    start: bool
    error: str | None = None
    trace_path: str | None = None


ToEngine = AddRequest | AbortRequests | StopSequences | Shutdown | Profile
FromEngine = EngineReady | EngineOutputs | RequestFailed | Heartbeat | EngineFailed | ProfileDone

encoder = msgspec.msgpack.Encoder()
to_engine_decoder = msgspec.msgpack.Decoder(ToEngine)
from_engine_decoder = msgspec.msgpack.Decoder(FromEngine)
