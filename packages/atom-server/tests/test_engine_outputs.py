"""The engine core reports token-id deltas; the output processor makes text, applies stop strings and
accumulates. Checked here on the real tiny model: stop strings cut where a full decode of the same tokens
says they should (n > 1, include_stop_str_in_output, min_tokens), streamed deltas add up to the final
output (nothing lost or duplicated), aborts and stops free every KV block, and a request whose sampling
fails is failed alone while the rest of its batch gives the same tokens as without it."""

from __future__ import annotations

import re

import pytest
from tiny_checkpoint import write_tiny_llama

from atom_server import LLM, SamplingParams
from atom_server.output_processor import OutputKind

PROMPT = [5, 77, 123, 9, 250, 31, 64, 200, 18]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    ckpt = write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    return LLM(ckpt, block_size=4, max_model_len=128, kv_cache_memory_bytes=1 << 20)


def _idle(engine) -> None:
    stats = engine.stats()
    assert not engine.has_unfinished_requests()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_running"] == 0


def _run(engine, params: SamplingParams, kind: OutputKind, rid: str, prompt=PROMPT, abort_after: int | None = None):
    """Drive one request through engine.step(); returns its outputs in order."""
    engine.core.add_request(rid, prompt, params)
    engine.processor.add_request(rid, None, prompt, params, kind)
    outs, steps = [], 0
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
        steps += 1
        if abort_after is not None and steps == abort_after:
            engine.abort_request(rid)
            outs += [o for o in engine.step() if o.request_id == rid]
            break
    _idle(engine)
    return outs


def _concat(deltas) -> dict[int, tuple[str, list[int], str | None, object]]:
    got: dict[int, tuple[str, list[int], str | None, object]] = {}
    for ro in deltas:
        for co in ro.outputs:
            text, ids, _, _ = got.get(co.index, ("", [], None, None))
            assert got.get(co.index, (None, None, None, None))[2] is None, "output after the finish"
            got[co.index] = (text + co.text, ids + co.token_ids, co.finish_reason, co.stop_reason)
    return got


def _expected_cut(tok, ids: list[int], stops: list[str], include: bool) -> tuple[str, list[int], str] | None:
    """From a full decode: the first token count whose text holds a stop string, the text cut there. Text is
    only looked at on character boundaries (a decode ending in a partial UTF-8 character waits a token)."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            at, s = min(hits)
            return (text[:at + len(s)] if include else text[:at]), ids[:k], s
    return None


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_each_sequence_where_a_full_decode_says(llm, include):
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    base = SamplingParams(n=3, temperature=0.8, top_k=40, seed=11, max_tokens=48, ignore_eos=True)
    full = _run(engine, base, OutputKind.FINAL_ONLY, "full")[-1].outputs
    for co in full:
        assert co.text == tok.decode(co.token_ids, skip_special_tokens=True)
    # Stop strings: printable runs from the middle of two of the samples (seeded: the same draws with stops).
    stops = [re.search(r"[!-~]{2,3}", co.text[start:]).group(0) for co, start in ((full[0], 8), (full[1], 16))]
    params = base.clone(stop=stops, include_stop_str_in_output=include)
    final = _run(engine, params, OutputKind.FINAL_ONLY, "final")[-1]
    deltas = _run(engine, params, OutputKind.DELTA, "delta")
    cumulative = _run(engine, params, OutputKind.CUMULATIVE, "cumulative")
    assert cumulative[-1].outputs == final.outputs
    streamed = _concat(deltas)
    assert sorted(streamed) == [0, 1, 2]
    stopped = 0
    for co, ref in zip(final.outputs, full):
        want = _expected_cut(tok, ref.token_ids, stops, include)
        if want is None:
            assert (co.text, co.token_ids, co.finish_reason) == (ref.text, ref.token_ids, "length")
        else:
            stopped += 1
            assert (co.text, co.token_ids, co.finish_reason, co.stop_reason) == (*want[:2], "stop", want[2])
        assert streamed[co.index] == (co.text, co.token_ids, co.finish_reason, co.stop_reason)
    assert stopped >= 2


def test_min_tokens_holds_stop_strings_back(llm):
    engine = llm.llm_engine
    full = _run(engine, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), OutputKind.FINAL_ONLY,
                "greedy")[-1].outputs[0]
    stop = full.text[4:6]
    early = _run(engine, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]),
                 OutputKind.FINAL_ONLY, "early")[-1].outputs[0]
    assert early.finish_reason == "stop" and early.text == full.text[:full.text.index(stop)]
    held = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop],
                          min_tokens=len(early.token_ids) + 1)
    final = _run(engine, held, OutputKind.FINAL_ONLY, "held")[-1].outputs[0]
    streamed = _concat(_run(engine, held, OutputKind.DELTA, "held-delta"))[0]
    assert len(final.token_ids) > held.min_tokens
    assert full.token_ids[:len(final.token_ids)] == final.token_ids  # the same greedy tokens, just more
    assert streamed == (final.text, final.token_ids, final.finish_reason, final.stop_reason)


def test_abort_mid_stream_frees_everything_and_reports_once(llm):
    engine = llm.llm_engine
    params = SamplingParams(n=2, temperature=0.0, max_tokens=100, ignore_eos=True, stop=["zzzz"])
    outs = _run(engine, params, OutputKind.DELTA, "aborted", abort_after=5)
    assert outs[-1].finished and {co.finish_reason for co in outs[-1].outputs} == {"abort"}
    assert all(not ro.finished for ro in outs[:-1])


def test_failing_request_is_isolated(llm, monkeypatch):
    """A planted failure in the sampling of one request (after its third token) fails that request only; the
    others (greedy and seeded sampling) give exactly the tokens they give alone."""
    engine = llm.llm_engine
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    marked = SamplingParams(temperature=0.77, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate([PROMPT, PROMPT[:5]], [greedy, seeded], use_tqdm=False)]

    runner = engine.runner
    real = runner._sample_rows
    failures = []

    def sample_rows(logits, sampling, seq_ids):
        running = {s.seq_id: s for r in engine.core.requests.values() for s in r.seqs}
        seqs = [running[i] for i in seq_ids if i in running]
        if any(s.params.temperature == 0.77 and s.num_output_tokens >= 3 for s in seqs):
            failures.append(len(seq_ids))
            raise OverflowError("planted: Python int too large to convert to C long")
        return real(logits, sampling, seq_ids)

    monkeypatch.setattr(runner, "_sample_rows", sample_rows)
    outs = llm.generate([PROMPT, PROMPT[:5], PROMPT[2:]], [greedy, seeded, marked], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:2]] == alone
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "length", "error"]
    assert len(outs[2].outputs[0].token_ids) == 3
    assert failures[0] == 3 and failures[-1] == 1  # the whole batch, then halves down to the culprit alone
    assert engine.stats()["num_failed_requests"] == 1
    _idle(engine)
    monkeypatch.undo()
    again = llm.generate([PROMPT], [greedy], use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone[0]


def test_numbers_at_the_int64_edges(llm):
    engine = llm.llm_engine
    for field, value in [("top_k", 1 << 63), ("seed", 1 << 63), ("seed", -(1 << 63) - 1),
                         ("stop_token_ids", [1 << 64]), ("max_tokens", 1 << 64), ("logprobs", 1 << 63),
                         ("temperature", float("inf")), ("top_p", float("nan"))]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    base = SamplingParams(temperature=1.0, seed=9, max_tokens=6, ignore_eos=True)
    ref = llm.generate([PROMPT], [base], use_tqdm=False)[0].outputs[0].token_ids
    huge_k = llm.generate([PROMPT], [base.clone(top_k=(1 << 63) - 1)], use_tqdm=False)[0].outputs[0].token_ids
    assert huge_k == ref  # top_k beyond the vocabulary is "off"
    for p in (base.clone(seed=(1 << 63) - 1), base.clone(seed=-(1 << 63)),
              base.clone(stop_token_ids=[(1 << 63) - 1])):
        assert len(llm.generate([PROMPT], [p], use_tqdm=False)[0].outputs[0].token_ids) == 6
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.generate([PROMPT], [base.clone(logprobs=21)], use_tqdm=False)
    _idle(engine)
