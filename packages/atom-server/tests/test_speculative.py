"""Speculative decoding in atom-server: MTP drafting (a tiny DeepSeek-V3 with an MTP layer) and n-gram drafting
(SmolLM2's real weights), greedy outputs identical to decoding without speculation, stops and length limits
inside accepted runs, the synthetic (benchmark) acceptance, the configuration's errors and the metrics.
The rejection sampler's distribution is tested in test_rejection_sampler.py."""

from __future__ import annotations

import random
import re

import pytest
from spec_checkpoint import deepseek_v3_config, kv_bytes_per_token, write_deepseek_v3_mtp
from tiny_checkpoint import build_tokenizer

from atom_server import LLM, EngineArgs, SamplingParams
from atom_server.engine.speculative import NgramProposer, parse_speculative_config

BLOCK = 4
POOL_BLOCKS = 24  # the waves below need more at once: the scheduler must preempt


def _mtp(k: int) -> dict | None:
    return None if k == 0 else {"method": "mtp", "num_speculative_tokens": k}


def _outputs(outs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in o.outputs] for o in outs]


def _logprobs(outs):
    return [[{t: lp.logprob for t, lp in e.items()} for c in o.outputs for e in c.logprobs or []] for o in outs]


def _assert_logprobs_close(got, want):
    assert [[set(e) for e in r] for r in got] == [[set(e) for e in r] for r in want]
    for r_got, r_want in zip(got, want):
        for e_got, e_want in zip(r_got, r_want):
            for t in e_want:
                assert e_got[t] == pytest.approx(e_want[t], abs=1e-4)


def _check_all_free(llm):
    stats = llm.llm_engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and not llm.llm_engine.has_unfinished_requests()
    return stats


@pytest.fixture(scope="module")
def partial_mtp(tmp_path_factory):
    """The MTP drafter accepts part of the time (see spec_checkpoint: a mostly-bigram target)."""
    return write_deepseek_v3_mtp(tmp_path_factory.mktemp("v3_mtp"), draft="bigram", target_scale=0.03)


def test_mtp_greedy_matches_no_speculation(partial_mtp, monkeypatch):
    """K = 0 (no speculation), 1, 2, 3 on the same batches: identical tokens and logprobs, with chunked prefill
    (a 16-token budget), preemption (a pool too small for the batch), prefix caching (a second wave sharing
    whole blocks with the first), and every KV block free at the end. K = 1, 2, 3 run eager and on the step
    graphs' buffers (ATOM_DECODE_GRAPHS=static: the verify graphs, rows with fewer drafts padded in front, the
    decode graphs keeping hidden states, and the MTP drafter's first pass and greedy drafts replay their bodies):
    the same results, and a seeded sampled row of the second wave (its drafts are drawn eager, over the graph's
    hidden states) draws the same tokens in both."""
    config = deepseek_v3_config()
    rng = random.Random(0)
    first = [[rng.randrange(config.vocab_size) for _ in range(n)] for n in (5, 19, 11, 23, 2)]
    second = [first[1][:12] + [rng.randrange(config.vocab_size) for _ in range(6)], first[3][:20] + [7, 8, 9],
              [rng.randrange(config.vocab_size) for _ in range(7)]]
    lengths = [14, 9, 17, 12, 6]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=2 if i % 2 else None)
              for i, m in enumerate(lengths)]
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)
    runs = {}
    for k, mode in ((0, "off"), *((k, mode) for k in (1, 2, 3) for mode in ("off", "static"))):
        monkeypatch.setenv("ATOM_DECODE_GRAPHS", mode)
        llm = LLM(partial_mtp, dtype="float32", block_size=BLOCK, max_model_len=64, max_num_batched_tokens=16,
                  kv_cache_memory_bytes=POOL_BLOCKS * BLOCK * kv_bytes_per_token(config, 1 if k else 0),
                  skip_tokenizer_init=True, device="cpu", speculative_config=_mtp(k))
        runner = llm.llm_engine.runner
        assert runner.num_blocks == POOL_BLOCKS and (runner.graphs is None) == (mode == "off")
        outs = [llm.generate([{"prompt_token_ids": p} for p in wave], ps, use_tqdm=False)
                for wave, ps in ((first, params), (second, [*params[:2], sampled]))]
        stats = _check_all_free(llm)
        runs[k, mode] = [(_outputs(o), _logprobs(o)) for o in outs], stats
        assert stats["num_preemptions"] > 0, (k, stats)
        assert stats["prefix_cache_hits"] >= 12 + 20 - 8, (k, stats)
        if mode == "static":
            replays = runner.graphs.replays
            assert replays["verify"] > 0 and replays["mtp_first_pass"] > 0 and replays["mtp_drafts"] > 0, replays
            if k > 1:  # rows near max_tokens draft fewer than K
                assert runner.graphs.short_rows > 0
    base = runs[0, "off"][0]
    assert [len(c[0][0]) for c in base[0][0]] == lengths
    chained = 0
    for k in (1, 2, 3):
        got, stats = runs[k, "off"]
        graphed, graphed_stats = runs[k, "static"]
        assert _outputs_of(graphed) == _outputs_of(got), k  # the sampled row included
        for mode_got in (got, graphed):
            for (tokens, lps), (want_tokens, want_lps) in zip(_greedy_rows(mode_got), _greedy_rows(base)):
                assert tokens == want_tokens, k
                _assert_logprobs_close(lps, want_lps)
        for name in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens"):
            assert graphed_stats[name] == stats[name], name
        assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"], stats
        assert stats["spec_decode_num_draft_tokens"] <= k * stats["spec_decode_num_drafts"]
        per_pos = [stats[f"spec_decode_num_accepted_tokens_per_pos.{i}"] for i in range(k)]
        assert sum(per_pos) == stats["spec_decode_num_accepted_tokens"]
        assert per_pos == sorted(per_pos, reverse=True)  # position i is accepted only after i - 1
        chained += sum(per_pos[1:])
    assert chained > 0  # runs of two or more accepted drafts happened


def _outputs_of(waves):
    return [tokens for tokens, _ in waves]


def _greedy_rows(waves):
    """The waves' (outputs, logprobs) without the second wave's sampled row."""
    (first, first_lps), (second, second_lps) = waves
    return [(first, first_lps), (second[:2], second_lps[:2])]


@pytest.fixture(scope="module")
def bigram_mtp(tmp_path_factory):
    """A pure bigram target: its MTP drafter is always right, so every verify step accepts all K drafts and
    stops land inside accepted runs. With a (byte-level BPE) tokenizer, for stop strings."""
    return write_deepseek_v3_mtp(tmp_path_factory.mktemp("v3_bigram"), draft="bigram", target_scale=0.0,
                                 tokenizer=build_tokenizer())


def test_stops_and_length_inside_accepted_runs(bigram_mtp, monkeypatch):
    """max_tokens, stop token ids and stop strings that fall inside a run of accepted drafts: the engine core
    and the output processor emit nothing past them; text, tokens and finish reasons equal the run without
    speculation."""
    monkeypatch.setenv("ATOM_DECODE_GRAPHS", "off")
    tok = build_tokenizer()
    prompts = [tok(t)["input_ids"] for t in ("The quick brown fox", "Paged attention stores", "Hello world!",
                                             "A scheduler batches prefill", "Numbers: 0 1 2", "Prefix caching")]
    engines = {k: LLM(bigram_mtp, dtype="float32", block_size=BLOCK, max_model_len=96, device="cpu",
                      speculative_config=_mtp(k)) for k in (0, 3)}
    greedy = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (2, 3, 5, 6, 7, 9)]

    def run(k, params):
        outs = engines[k].generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        _check_all_free(engines[k])
        return _outputs(outs)

    base = run(0, [p.clone(max_tokens=40) for p in greedy])
    texts = [o[0][3] for o in base]
    # stop strings: two printable characters from the middle of each text; stop tokens: one from each output
    stops = sorted({m.group(0) for t in texts for m in [re.search(r"[!-~]{2}", t[5:])] if m})[:5]
    stop_ids = [o[0][0][4] for o in base]
    cases = {"length": greedy,
             "stop_token_ids": [p.clone(max_tokens=40, stop_token_ids=[s]) for p, s in zip(greedy, stop_ids)],
             "stop": [p.clone(max_tokens=40, stop=stops) for p in greedy]}
    for name, params in cases.items():
        before = engines[3].llm_engine.stats()
        want, got = run(0, params), run(3, params)
        assert got == want, name
        after = engines[3].llm_engine.stats()
        drafted = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
        accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
        assert drafted > 0 and accepted == drafted, name  # every draft accepted: the stops fell inside runs
        reasons = {o[0][1] for o in got}
        assert reasons == {"length"} if name == "length" else "stop" in reasons, name
    assert [len(o[0][0]) for o in run(3, greedy)] == [2, 3, 5, 6, 7, 9]


@pytest.mark.parametrize("mode", ["off", "static"])
def test_synthetic_acceptance_forces_the_accepted_length(partial_mtp, monkeypatch, mode):
    """Benchmarks: synthetic_acceptance_length L = K + 1 accepts every draft, L = 1 none, whatever the tokens;
    the bonus token is the target's own. Eager, and on the step graphs' buffers (what the device benchmark
    measures): every step after the prefill a verify or decode graph, the drafts on the MTP graphs."""
    monkeypatch.setenv("ATOM_DECODE_GRAPHS", mode)
    prompts = [{"prompt_token_ids": [3, 4, 5, 6, 7][:n]} for n in (2, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)
    for length, accepted in ((4, lambda d: d), (1, lambda d: 0)):
        spec = {"method": "mtp", "num_speculative_tokens": 3, "rejection_sample_method": "synthetic",
                "synthetic_acceptance_length": length}
        llm = LLM(partial_mtp, dtype="float32", block_size=BLOCK, max_model_len=64, skip_tokenizer_init=True,
                  device="cpu", speculative_config=spec)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [13, 13]
        stats = _check_all_free(llm)
        assert stats["spec_decode_num_draft_tokens"] > 0
        assert stats["spec_decode_num_accepted_tokens"] == accepted(stats["spec_decode_num_draft_tokens"])
        # steps: one prefill, then 1 + 4 + 4 + 4 tokens per sequence when everything is accepted
        # verify steps with drafts: 3 per sequence when every draft is accepted (1 + 4 + 4 + 4 tokens), else one
        # per token until the last (no draft left to verify then: the 13th token takes a plain step)
        assert stats["spec_decode_num_drafts"] == (2 * 3 if length == 4 else 2 * 11)
        if mode == "static":  # one prefill step (eager); every later step replays a verify graph (or, for the
            # last token when no draft is left, a decode graph), then the MTP graphs (first pass, drafts)
            runner = llm.llm_engine.runner
            replays = runner.graphs.replays
            graph_steps = replays["verify"] + replays["decode"]
            assert runner.eager_steps == 1, (runner.eager_steps, replays)
            assert replays["verify"] == (3 if length == 4 else 11), replays
            assert replays["mtp_first_pass"] == replays["mtp_drafts"] == graph_steps, replays
        if length == 4:  # the heartbeat's stats as /metrics exports them, under vLLM's names and labels
            _check_exposition(stats)


def test_mtp_drafts_stop_at_max_model_len(partial_mtp, monkeypatch):
    """A sequence that runs into max_model_len: the MTP's draft steps stay inside the rope table (the block
    table's slots reach past max_model_len: 16-token blocks, max_model_len 20), eager and on the step graphs;
    the same tokens as without speculation, finished by length."""
    prompt = [{"prompt_token_ids": [random.Random(0).randrange(300) for _ in range(8)]}]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    got = {}
    for k, mode in ((0, "off"), (3, "off"), (3, "static")):
        monkeypatch.setenv("ATOM_DECODE_GRAPHS", mode)
        llm = LLM(partial_mtp, dtype="float32", block_size=16, max_model_len=20, skip_tokenizer_init=True,
                  device="cpu", speculative_config=_mtp(k))
        out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        got[k, mode] = (out.token_ids, out.finish_reason)
        _check_all_free(llm)
    assert got[0, "off"][1] == "length" and len(got[0, "off"][0]) == 12
    assert got[3, "off"] == got[0, "off"] and got[3, "static"] == got[0, "off"]


def _check_exposition(stats: dict) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from atom_server.serving.metrics import _EngineStatsCollector

    collector = _EngineStatsCollector("m")
    collector.stats = stats
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()

    def value(series: str) -> float:
        m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        assert m, f"{series} is not exported"
        return float(m.group(1))

    labels = 'engine="0",model_name="m"'
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert value(f"vllm:spec_decode_{name}_total{{{labels}}}") == stats[f"spec_decode_{name}"]
        assert value(f"atom:spec_decode_{name}_total") == stats[f"spec_decode_{name}"]
    for pos in range(3):
        assert (value(f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position="{pos}"}}')
                == stats[f"spec_decode_num_accepted_tokens_per_pos.{pos}"])


@pytest.mark.parametrize("value,error", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({"method": "mtp", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "mtp", "num_speculative_tokens": 9}, "num_speculative_tokens"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "mtp", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "ngram"),
    ({"method": "mtp", "num_speculative_tokens": 2, "draft_model": "x"}, "draft_model"),
    ({"method": "mtp", "num_speculative_tokens": 2, "rejection_sample_method": "synthetic"}, "synthetic"),
    ({"method": "mtp", "num_speculative_tokens": 2, "rejection_sample_method": "synthetic",
      "synthetic_acceptance_length": 3.5}, "synthetic_acceptance_length"),
    ({"method": "mtp", "num_speculative_tokens": 2, "rejection_sample_method": "synthetic",
      "synthetic_acceptance_rates": [0.5, 0.9]}, "synthetic_acceptance_rates"),
    ("{not json", "JSON"),
    ({"method": "qwen3_next_mtp", "num_speculative_tokens": 2}, "method must be one of"),
    # the MTP layer's first pass needs rank 0's verification mid-step: refused under TP, before any worker starts
    ({"method": "mtp", "num_speculative_tokens": 2}, "tensor_parallel_size > 1"),
])
def test_speculative_config_errors(value, error):
    tp = 2 if error == "tensor_parallel_size > 1" else 1
    with pytest.raises(ValueError, match=error):
        EngineArgs(speculative_config=value, tensor_parallel_size=tp)


def test_speculative_config_cli_and_defaults():
    import argparse

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, '
                                                    '"prompt_lookup_max": 4}'])
    args = EngineArgs.from_cli_args(ns)
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    spec = parse_speculative_config(args.speculative_config)
    assert (spec.k, spec.prompt_lookup_min, spec.prompt_lookup_max) == (3, 4, 4)  # min defaults to max
    both = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2})
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (5, 5)  # vLLM's defaults
    # MTP's K defaults to the checkpoint's num_nextn_predict_layers (vLLM); synthetic rates from a length
    assert parse_speculative_config({"method": "mtp"}, num_mtp_layers=1).k == 1
    synthetic = parse_speculative_config({"method": "mtp", "num_speculative_tokens": 3,
                                          "rejection_sample_method": "synthetic", "synthetic_acceptance_length": 2.5})
    assert synthetic.synthetic_acceptance_rates == (1.0, 0.5, 0.0)
    # vLLM's older per-model name of MTP; the config survives the JSON trip to a tensor-parallel worker
    assert parse_speculative_config({"method": "deepseek_mtp", "num_speculative_tokens": 2}).method == "mtp"
    import msgspec

    from atom_server.engine.speculative import SpeculativeConfig

    assert SpeculativeConfig.from_fields(msgspec.json.decode(msgspec.json.encode(synthetic))) == synthetic


def test_mtp_needs_mtp_layers(tmp_path):
    from tiny_checkpoint import write_tiny_llama

    ckpt = write_tiny_llama(tmp_path)
    with pytest.raises(ValueError, match="no MTP layers"):
        LLM(ckpt, max_model_len=64, device="cpu", speculative_config={"method": "mtp", "num_speculative_tokens": 2})


def test_ngram_proposer_takes_the_earliest_longest_match():
    spec = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
                                     "prompt_lookup_max": 3})
    ngram = NgramProposer(spec)
    # suffix [7, 8, 9] occurs at 1 and 6: the earliest wins, the 3 tokens after it follow
    assert ngram.propose([1, 7, 8, 9, 2, 3, 7, 8, 9, 4, 5, 7, 8, 9], 10) == [2, 3, 7]
    assert ngram.propose([1, 7, 8, 9, 2, 3, 7, 8, 9, 4, 5, 7, 8, 9], 2) == [2, 3]  # capped by the limit
    assert ngram.propose([5, 6, 1, 2, 3, 4, 6], 10) == []  # a 1-gram match is below prompt_lookup_min
    assert ngram.propose([1, 2, 1, 2], 10) == [1, 2]  # shorter n when the longest has no match; up to the end
    assert ngram.propose([4, 4, 4, 4], 10) == [4]  # overlapping matches count; proposals stop at the end


@pytest.mark.slow
def test_ngram_on_smollm2_matches_no_speculation():
    """Real weights: prompt lookup drafts from a repetitive prompt, and greedy output (text and tokens) equals
    decoding without speculation while part of the drafts are accepted."""
    pytest.importorskip("gguf")
    from atom_server.default_model import DefaultModelMissing, resolve_model_path

    try:
        path = resolve_model_path()
    except DefaultModelMissing as e:
        pytest.skip(str(e))
    prompts = ["Count: one two three, one two three, one two three, one two three, one two",
               "The list is: apple, banana, cherry, apple, banana, cherry, apple,"]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    got = {}
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                        "prompt_lookup_min": 1}):
        llm = LLM(path, max_model_len=256, kv_cache_memory_bytes=32 << 20, speculative_config=spec)
        got[spec is None] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = _check_all_free(llm)
    assert got[False] == got[True]
    assert 0 < stats["spec_decode_num_accepted_tokens"] <= stats["spec_decode_num_draft_tokens"], stats


def test_ngram_under_tensor_parallel_matches_tp1(tmp_path, monkeypatch):
    """TP=2 (gloo): the drafts travel in the StepInput (tokens + num_drafts), every rank runs the same K + 1
    token verify forward (its collectives line up), only rank 0 verifies; greedy tokens equal TP=1 without
    speculation, drafts are accepted on repetitive prompts, ranks hold the same block tables. The speculative
    runs go through the step graphs' buffers (ATOM_DECODE_GRAPHS=static, on every rank): verify steps replay the
    verify graphs, rows with fewer drafts than K padded in front, steps without drafts the decode graphs."""
    from tp_checkpoints import write_checkpoint

    path = write_checkpoint("llama", tmp_path / "llama")
    rng = random.Random(5)
    motif = [rng.randrange(2, 150) for _ in range(4)]
    prompts = [motif * 5, [rng.randrange(2, 150) for _ in range(9)] + motif * 3, motif * 2 + [7]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
    want = None
    for tp, spec in ((1, None), (1, ngram), (2, ngram)):
        monkeypatch.setenv("ATOM_DECODE_GRAPHS", "off" if spec is None else "static")  # inherited by the worker
        llm = LLM(path, tensor_parallel_size=tp, block_size=BLOCK, max_model_len=64, max_num_batched_tokens=16,
                  skip_tokenizer_init=True, dtype="float32", device="cpu", speculative_config=spec)
        engine = llm.llm_engine
        try:
            got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                 use_tqdm=False)]
            stats = _check_all_free(llm)
            if spec is None:
                want = got
                continue
            assert got == want, tp
            assert stats["spec_decode_num_draft_tokens"] > 0, stats
            graphs = engine.runner.graphs
            assert graphs.replays["verify"] > 0 and graphs.short_rows > 0, (graphs.replays, graphs.short_rows)
            if tp == 2:
                states = engine.runner.rank_states()
                assert states[1].tables == states[0].tables
        finally:
            engine.shutdown()


@pytest.mark.gpu
@pytest.mark.serial  # KV sized from free GPU memory
def test_speculation_on_cuda_matches_graph_decoding(partial_mtp):
    """CUDA, float32, graphs captured for real: K = 0 decodes through the decode graphs (async scheduling on);
    MTP K = 2 replays the verify graphs and the MTP drafter's graphs (first pass, greedy drafts); n-gram K = 3
    the verify graphs, rows with fewer drafts padded in front, and the decode graphs for steps without drafts;
    all give the same greedy tokens, every block free at the end. Then the benchmark's forced acceptance
    (synthetic, K = 3, L = 4): after the prefill every step is a graph replay, every draft accepted."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rng = random.Random(1)
    vocab = deepseek_v3_config().vocab_size
    motif = [rng.randrange(vocab) for _ in range(3)]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (4, 17, 9)] + [motif * 6]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine_args = dict(dtype="float32", block_size=16, max_model_len=128, skip_tokenizer_init=True, device="cuda",
                       gpu_memory_utilization=0.2)
    runs = {}
    for name, spec in (("none", None), ("mtp", _mtp(2)), ("ngram", {"method": "ngram", "num_speculative_tokens": 3,
                                                                      "prompt_lookup_min": 2})):
        llm = LLM(partial_mtp, speculative_config=spec, **engine_args)
        engine = llm.llm_engine
        graphs = engine.runner.graphs
        assert graphs is not None and graphs.capture and engine.async_scheduling == (name == "none")
        runs[name] = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                   params, use_tqdm=False)]
        stats = _check_all_free(llm)
        if spec is not None:
            assert stats["spec_decode_num_draft_tokens"] > 0, (name, stats)
            assert graphs.replays["verify"] > 0, (name, graphs.replays)
        if name == "mtp":
            assert graphs.replays["mtp_first_pass"] >= graphs.replays["mtp_drafts"] > 0, graphs.replays
        if name == "ngram":
            assert graphs.short_rows > 0 and graphs.replays["decode"] > 0, (graphs.short_rows, graphs.replays)
        engine.shutdown()
        del llm, engine, graphs
        torch.cuda.empty_cache()
    assert runs["mtp"] == runs["none"] and runs["ngram"] == runs["none"]

    synthetic = {"method": "mtp", "num_speculative_tokens": 3, "rejection_sample_method": "synthetic",
                 "synthetic_acceptance_length": 4}
    llm = LLM(partial_mtp, speculative_config=synthetic, **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params.clone(max_tokens=13), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [13, 13]
    stats = _check_all_free(llm)
    runner = llm.llm_engine.runner
    assert stats["spec_decode_num_drafts"] == 2 * 3 and runner.eager_steps == 1, (stats, runner.graphs.replays)
    assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"]
    assert runner.graphs.replays["verify"] == 3 and runner.graphs.replays["mtp_drafts"] == 3, runner.graphs.replays
    llm.llm_engine.shutdown()


def test_speculation_with_the_window_pool_is_refused(tmp_path):
    """A sliding-window model (GPT-OSS) gets a window pool; speculation is refused with it, naming the flag that
    turns it off, and works with full-length caches (n-gram greedy = no speculation)."""
    from tiny_checkpoint import write_tiny_gpt_oss

    ckpt = write_tiny_gpt_oss(tmp_path)
    ngram = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1}
    engine = dict(dtype="float32", block_size=BLOCK, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=16,
                  kv_cache_memory_bytes=1 << 20, device="cpu")  # a window pool without speculation
    with pytest.raises(ValueError, match="--disable-hybrid-kv-cache-manager"):
        LLM(ckpt, speculative_config=ngram, **engine)
    prompt = [{"prompt_token_ids": [5, 6, 7, 5, 6, 7, 5, 6]}]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    got = []
    for spec in (None, ngram):
        llm = LLM(ckpt, disable_hybrid_kv_cache_manager=True, speculative_config=spec, **engine)
        got.append(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)
        _check_all_free(llm)
    assert got[0] == got[1]
