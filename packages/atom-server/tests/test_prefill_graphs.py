"""Prefill graphs (engine/prefill_graphs.py): the eager steps (prefills, chunks beside decodes) run through the
graphs' static buffers and padding (ATOM_DECODE_GRAPHS=static: the same body without capture, on CPU) and give the
eager path's tokens and logprobs: a tiny Llama with chunked prefill, prefix caching, prompt logprobs and steps too
large for the largest bucket (which stay eager); a tiny GPT-OSS with its sliding-window pool, sinks and experts."""

from __future__ import annotations

from tiny_checkpoint import write_tiny_gpt_oss, write_tiny_llama

from atom_server import LLM, SamplingParams
from atom_server.engine.prefill_graphs import rows_of, token_buckets

BLOCK = 4


def _prompts(lengths, vocab: int = 300, shared: int = 0):
    head = [7 + (5 * j) % (vocab - 7) for j in range(shared)]
    return [head + [3 + (i * 29 + j * 7) % (vocab - 3) for j in range(n)] for i, n in enumerate(lengths)]


def _generate(ckpt, prompts, params, monkeypatch, mode: str, graph_tokens: int = 16, **engine):
    monkeypatch.setenv("ATOM_DECODE_GRAPHS", "off" if mode == "eager" else "static")
    monkeypatch.setenv("ATOM_ASYNC_SCHEDULING", "0")
    monkeypatch.setenv("ATOM_PREFILL_GRAPH_TOKENS", str(graph_tokens))
    llm = LLM(ckpt, dtype="float32", block_size=BLOCK, max_model_len=96, max_num_seqs=4, device="cpu",
              kv_cache_memory_bytes=1 << 20, **engine)
    runner = llm.llm_engine.runner
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    replays = sum(runner.prefill_graphs.replays.values()) if runner.prefill_graphs is not None else 0
    if mode == "eager":
        assert runner.prefill_graphs is None
    return outs, replays, runner


def _logprob_rows(out):
    rows = [{t: lp.logprob for t, lp in d.items()} for d in out.outputs[0].logprobs or []]
    return rows + [{t: lp.logprob for t, lp in d.items()} for d in out.prompt_logprobs or [] if d]


def _same(a, b):
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    for x, y in zip(a, b):
        rx, ry = _logprob_rows(x), _logprob_rows(y)
        assert len(rx) == len(ry)
        for dx, dy in zip(rx, ry):
            assert dx.keys() == dy.keys()
            assert all(abs(dx[t] - dy[t]) < 1e-4 for t in dx), (dx, dy)


def test_buckets_and_rows():
    assert token_buckets(1024) == [16, 32, 64, 128, 256, 512, 1024]
    assert token_buckets(100) == [16, 32, 64, 100] and token_buckets(4) == [4] and token_buckets(0) == []
    assert rows_of(16, 128) == 17 and rows_of(1024, 128) == 129
    assert rows_of(16, 15) == 17  # never as many rows as tokens (the torch attention would read a decode batch)


def test_llama_prefill_graphs_match_eager(tmp_path, monkeypatch):
    ckpt = write_tiny_llama(str(tmp_path / "llama"))
    # 24-token steps: chunks of long prompts beside decodes; steps of 17-24 tokens are past the 16-token bucket
    prompts = _prompts([5, 23, 9, 30, 14, 3], shared=6)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (9, 4, 12, 6, 8, 10)]
    params[2] = SamplingParams(temperature=0.0, max_tokens=7, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    engine = dict(max_num_batched_tokens=24, enable_prefix_caching=True)
    want, _, _ = _generate(ckpt, prompts, params, monkeypatch, "eager", **engine)
    got, replays, runner = _generate(ckpt, prompts, params, monkeypatch, "static", **engine)
    assert runner.prefill_graphs is not None  # the startup self-check passed
    _same(got, want)
    assert replays > 0 and runner.eager_steps > replays  # some steps in graphs, some too large for them


def test_gpt_oss_prefill_graphs_match_eager(tmp_path, monkeypatch):
    """Sliding-window layers with the window pool (window slots and tables), sinks and routed experts."""
    ckpt = write_tiny_gpt_oss(str(tmp_path / "gpt_oss"))
    prompts = _prompts([11, 3, 14, 7], vocab=200)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (8, 12, 5, 9)]
    engine = dict(max_num_batched_tokens=16)
    want, _, _ = _generate(ckpt, prompts, params, monkeypatch, "eager", **engine)
    got, replays, runner = _generate(ckpt, prompts, params, monkeypatch, "static", **engine)
    assert runner.kv_window is not None and runner.prefill_graphs is not None and runner.prefill_graphs.windowed
    _same(got, want)
    assert replays > 0


def test_a_graph_that_differs_from_eager_turns_itself_off(tmp_path, monkeypatch, caplog):
    """The startup self-check (ModelRunner._check_prefill_graphs) runs a two-row step both ways: a graph body that
    computes something else (here: hidden states scaled by 1.5) is refused with a warning, and eager steps serve."""
    from atom_server.engine import prefill_graphs

    ckpt = write_tiny_llama(str(tmp_path / "llama"))
    body = prefill_graphs.PrefillGraphs._body
    monkeypatch.setattr(prefill_graphs.PrefillGraphs, "_body", lambda self, t: body(self, t) * 1.5)
    prompts = _prompts([5, 12])
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with caplog.at_level("WARNING"):
        got, replays, runner = _generate(ckpt, prompts, params, monkeypatch, "static", max_num_batched_tokens=24)
    assert runner.prefill_graphs is None and runner.graphs is not None and replays == 0
    assert "prefill graphs off" in caplog.text
    monkeypatch.setattr(prefill_graphs.PrefillGraphs, "_body", body)
    want, _, _ = _generate(ckpt, prompts, params, monkeypatch, "eager", max_num_batched_tokens=24)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_buckets_longer_than_the_model(tmp_path, monkeypatch):
    """Buckets up to 256 tokens over a 96-token model: a step of two 70-token prompts runs in the 256-token graph,
    whose padding row (116 entries) keeps its positions inside the rope table and its keys inside its table row."""
    ckpt = write_tiny_llama(str(tmp_path / "llama"))
    prompts = _prompts([70, 69])
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    want, _, _ = _generate(ckpt, prompts, params, monkeypatch, "eager", 256, max_num_batched_tokens=256)
    got, _, runner = _generate(ckpt, prompts, params, monkeypatch, "static", 256, max_num_batched_tokens=256)
    assert runner.prefill_graphs.sizes[-1] == 256 and runner.prefill_graphs.replays[256] == 1
    _same(got, want)
