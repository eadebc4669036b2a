"""The engine <-> API server wire format: msgpack structs, outputs sent as deltas and rebuilt."""

from __future__ import annotations

import pytest

from atom_server.outputs import CompletionOutput, Logprob, RequestOutput
from atom_server.sampling_params import SamplingParams
from atom_server.serving import wire
from atom_server.serving.output_deltas import DeltaDecoder, DeltaEncoder


def _out(text: str, ids: list[int], finished: bool = False, reason: str | None = None) -> RequestOutput:
    lps = [{t: Logprob(-0.25 * t, 1, f"<{t}>"), t + 1: Logprob(-9.0, 2, None)} for t in ids]
    return RequestOutput(
        request_id="req-1", prompt="hi", prompt_token_ids=[3, 4],
        prompt_logprobs=[None, {4: Logprob(-1.5, 3, "4")}],
        outputs=[CompletionOutput(0, text, list(ids), -0.25 * sum(ids), lps, reason, "x" if reason else None),
                 CompletionOutput(1, text[::-1], ids[:1], None, None, reason)],
        finished=finished, metrics={"arrival_time": 1.0})


def test_deltas_rebuild_the_cumulative_outputs():
    enc, dec = DeltaEncoder(), DeltaDecoder()
    steps = [_out("ab", [5]), _out("abc", [5, 6]), _out("abc", [5, 6, 7]),
             _out("abd", [5, 6, 7, 8]),  # text that is not an extension is sent whole
             _out("abde", [5, 6, 7, 8, 9], finished=True, reason="stop")]
    sizes = []
    for step in steps:
        raw = wire.encoder.encode(wire.EngineOutputs([enc.encode(step)]))
        sizes.append(len(raw))
        msg = wire.from_engine_decoder.decode(raw)
        assert dec.apply(msg.outputs[0]) == step
    assert sizes[2] < sizes[0]  # later messages carry only the new token, not the prompt again
    assert not enc._sent and not dec._outputs  # finished requests are forgotten on both sides


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
