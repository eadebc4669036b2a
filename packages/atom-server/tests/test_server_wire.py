"""The engine <-> API server wire format: msgpack structs; the engine sends token-id deltas only."""

from __future__ import annotations

import pytest

from atom_server.outputs import EngineCoreOutputs, PositionLogprobs
from atom_server.sampling_params import SamplingParams
from atom_server.serving import wire


def _step(i: int, finished: bool = False) -> wire.EngineOutputs:
    out = EngineCoreOutputs()
    row = out.add("req-1", 0, 100 + i)
    out.logprobs[row] = PositionLogprobs(100 + i, -0.25 * i, 1, [100 + i, 7], [-0.25 * i, -9.0])
    out.add("req-1", 1, 200 + i)
    if finished:
        out.finish(row, "length", None)
    return wire.EngineOutputs(out)


def test_engine_outputs_round_trip_and_carry_only_new_tokens():
    sizes = []
    for i in range(1, 200):
        msg = _step(i, finished=i == 199)
        raw = wire.encoder.encode(msg)
        sizes.append(len(raw))
        assert wire.from_engine_decoder.decode(raw) == msg
    assert max(sizes) < 1.5 * min(sizes)  # a step's message does not grow with the output so far (x200 if it did)


def test_add_request_round_trip_keeps_sampling_params():
    params = SamplingParams(n=2, temperature=0.5, stop="END", logprobs=3, seed=9, max_tokens=7)
    raw = wire.encoder.encode(wire.AddRequest("r", [1, 2, 3], params, "p"))
    msg = wire.to_engine_decoder.decode(raw)
    assert isinstance(msg, wire.AddRequest) and msg.params == params and msg.prompt_token_ids == [1, 2, 3]


def test_invalid_sampling_params_are_refused_on_decode():
    raw = wire.encoder.encode({"type": "add", "request_id": "r", "prompt_token_ids": [1],
                               "params": {"n": 0}, "prompt": None})
    with pytest.raises(Exception, match="n must be"):
        wire.to_engine_decoder.decode(raw)
