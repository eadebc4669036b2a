"""`atom bench throughput` on a config-only checkpoint and `atom bench serve` against a real
`python -m atom_server serve` subprocess (tiny llama, loopback only)."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
import torch

from atom_server import bench_cli
from atom_server.bench_serve import RequestResult, random_prompts, summarize
from server_harness import ServerProcess
from tiny_checkpoint import write_tiny_llama

MODEL = "tiny-bench"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_tiny_llama(str(tmp_path_factory.mktemp("ckpt")))
    srv = ServerProcess([ckpt, "--served-model-name", MODEL, "--max-model-len", "64"],
                        tmp_path_factory.mktemp("log") / "server.log")
    try:
        srv.ckpt = ckpt
        yield srv.wait_healthy()
    finally:
        srv.stop()


def test_throughput_cli_writes_json(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "m")
    out = tmp_path / "res" / "atom.json"
    rc = bench_cli.main(["throughput", "--model", str(tmp_path / "m"), "--load-format", "dummy",
                         "--input-len", "8", "--output-len", "4", "--batch-sizes", "1,3", "--num-iters", "2",
                         "--block-size", "4", "--kv-cache-memory-bytes", str(1 << 20), "--output-json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["engine"] == "atom" and report["args"]["enable_prefix_caching"] is False
    runs = report["runs"]
    assert [r["batch_size"] for r in runs] == [1, 3]
    assert [r["output_tokens"] for r in runs] == [4, 12]
    for r in runs:
        assert len(r["total_s_all"]) == 2 and len(r["prefill_s_all"]) == 2
        assert r["prefill_ms"] > 0 and r["output_tok_s"] > 0 and r["ms_per_step"] is not None
        # what a comparison with vLLM must show next to vLLM's own settings
        # the bench runs on the GPU when there is one, with CUDA graphs on (as vLLM's does); on CPU there are none
        assert r["settings"]["max_num_seqs"] == 3 and r["settings"]["cuda_graphs"] is torch.cuda.is_available()
    # the start-up breakdown: every phase of the engine, the weights' laps named in its detail
    phases = [p["phase"] for p in report["startup"]["phases"]]
    assert phases[0] == "config" and phases[-1] == "ready" and "weights" in phases
    weights = next(p for p in report["startup"]["phases"] if p["phase"] == "weights")
    assert weights["detail"].startswith("dummy: build") and "post_load" in weights["detail"]
    table = capsys.readouterr().out
    assert "prefill ms" in table and "ms/step" in table and "out tok/s" in table


def test_throughput_cli_rejects_unknown_model(capsys):
    with pytest.raises(SystemExit) as e:
        bench_cli.main(["throughput", "--model", "no-such-preset-or-path"])
    assert e.value.code == 2
    assert "qwen3-0.6b" in capsys.readouterr().err


def test_random_prompts_lengths_and_vocab():
    fixed = random_prompts(5, 16, 7, 0.0, vocab=50, seed=1)
    assert [(len(p), n) for p, n in fixed] == [(16, 7)] * 5
    assert all(0 <= t < 50 for p, _ in fixed for t in p)
    assert fixed == random_prompts(5, 16, 7, 0.0, vocab=50, seed=1)
    ranged = random_prompts(50, 20, 10, 0.5, vocab=50, seed=2)
    assert all(10 <= len(p) <= 30 and 5 <= n <= 15 for p, n in ranged)
    assert len({len(p) for p, _ in ranged}) > 1


def test_summarize_metrics():
    a = RequestResult(prompt_len=4, success=True, ttft=0.1, latency=0.5, itl=[0.2, 0.2], output_tokens=3, start=0.0)
    b = RequestResult(prompt_len=4, success=True, ttft=0.3, latency=0.7, itl=[0.1, 0.3], output_tokens=5, start=0.2)
    bad = RequestResult(prompt_len=4, error="HTTP 500")
    s = summarize([a, b, bad], duration=2.0, percentiles=[50, 99], metrics=["ttft", "tpot", "itl", "e2el"])
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"][2] == "HTTP 500"
    assert s["total_output_tokens"] == 8 and s["output_throughput"] == pytest.approx(4.0)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["mean_tpot_ms"] == pytest.approx((200.0 + 100.0) / 2)  # (0.5-0.1)/2 and (0.7-0.3)/4
    assert s["median_itl_ms"] == pytest.approx(200.0)
    assert s["p99_e2el_ms"] == pytest.approx(698.0)
    assert s["max_concurrent_requests"] == 2


def test_serve_bench_against_atom_server(server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = bench_cli.main(["serve", "--base-url", server.url, "--tokenizer", server.ckpt, "--num-prompts", "6",
                         "--random-input-len", "8", "--random-output-len", "5", "--ignore-eos",
                         "--max-concurrency", "3", "--disable-tqdm", "--save-result",
                         "--result-filename", str(out)])
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["model_id"] == MODEL  # from /v1/models
    assert s["completed"] == 6 and s["failed"] == 0, s["errors"]
    assert s["input_lens"] == [8] * 6 and s["output_lens"] == [5] * 6
    assert s["total_output_tokens"] == 30
    assert 0 < s["median_ttft_ms"] <= s["median_e2el_ms"] <= s["p99_e2el_ms"]
    assert s["mean_tpot_ms"] > 0 and s["mean_itl_ms"] > 0
    assert 1 <= s["max_concurrent_requests"] <= 3
    report = capsys.readouterr().out
    assert "Serving Benchmark Result" in report and "Mean TTFT (ms):" in report


def test_serve_bench_poisson_rate(server, tmp_path):
    out = tmp_path / "rate.json"
    rc = bench_cli.main(["serve", "--host", "127.0.0.1", "--port", str(server.port), "--model", MODEL,
                         "--vocab-size", "300", "--num-prompts", "4", "--request-rate", "50", "--seed", "3",
                         "--random-input-len", "6", "--random-output-len", "3", "--ignore-eos",
                         "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,90",
                         "--disable-tqdm", "--save-result", "--result-filename", str(out)])
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 4 and s["request_rate"] == 50 and s["total_output_tokens"] == 12
    assert "p90_ttft_ms" in s and "p50_e2el_ms" in s and "mean_itl_ms" not in s


def test_serve_bench_unknown_model_fails_clearly(server):
    with pytest.raises(SystemExit) as e:
        bench_cli.main(["serve", "--base-url", server.url, "--model", "not-served", "--vocab-size", "300",
                        "--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "2",
                        "--disable-tqdm"])
    assert "test request" in str(e.value) and "404" in str(e.value)


def _make_table_module(name: str = "make_table"):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[3] / "tools" / "device" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_device_table_rooflines_match_perf_md():
    from atom_server.bench import PRESETS

    mt = _make_table_module()
    gb = {name: mt.step_bytes(PRESETS[name], 1, 0) / 1e9 for name in PRESETS}
    # PERF.md: 1.19 GB, 15.1 GB and ~6.1 GB per batch-1 step; the MoE shape reads ~53 GB at batch 32, 61 at 128
    assert gb["qwen3-0.6b"] == pytest.approx(1.19, abs=0.01)
    assert gb["qwen3-8b"] == pytest.approx(15.1, abs=0.1)
    assert gb["qwen3-30b-a3b"] == pytest.approx(6.1, abs=0.1)
    assert mt.step_bytes(PRESETS["qwen3-30b-a3b"], 32, 0) / 1e9 == pytest.approx(53, abs=1)
    assert mt.step_bytes(PRESETS["qwen3-30b-a3b"], 128, 0) / 1e9 == pytest.approx(61, abs=1)
    assert mt.roofline_ms(PRESETS["qwen3-8b"], 1, 0, 2970) == pytest.approx(5.10, abs=0.01)
    # gpt-oss-20b, batch 1: 4 of 32 experts in MXFP4 (24 x 4 x 3 x 2880^2 x 17/32 B = 1.27 GB) + bf16 attention,
    # router and LM head (2.44 GB); the 12 windowed layers read at most 128 tokens of KV
    assert gb["gpt-oss-20b"] == pytest.approx(1.27 + 2.44, abs=0.01)
    assert gb["gpt-oss-20b-bf16"] == pytest.approx(1.27 * 64 / 17 + 2.44, abs=0.01)  # 2 bytes a weight
    kv_token = 2 * 8 * 64 * 2  # K and V bytes per token and layer
    assert mt.step_bytes(PRESETS["gpt-oss-20b"], 1, 4096) - mt.step_bytes(PRESETS["gpt-oss-20b"], 1, 0) == \
        pytest.approx((12 * 4096 + 12 * 128) * kv_token)


def test_device_table_markdown():
    from atom_server.bench import PRESETS

    mt = _make_table_module()

    def rep(tok_s, step):
        return dict(versions={"torch": "2.11.0"}, runs=[dict(batch_size=1, input_len=128, output_len=128,
                                                             output_tok_s=tok_s, ms_per_step=step, prefill_ms=9.0)])

    bench = dict(shape="qwen3-8b", device="NVIDIA H200", bandwidth_gbps=4300.0, date="2026-11-24", dtype="bfloat16",
                 config=PRESETS["qwen3-8b"], command="bash tools/device/bench_vs_vllm.sh --shapes qwen3-8b",
                 engines=dict(atom=rep(120.0, 8.0), vllm=rep(150.0, 6.4),
                              **{"atom-vllm": dict(error="timed out after 240 s", atom_model_built=False)}))
    text = mt.markdown([bench])
    row = next(line for line in text.splitlines() if line.startswith("| qwen3-8b | 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:7] == ["120", "150", "-", "0.80x", "-"]
    roof = mt.roofline_ms(PRESETS["qwen3-8b"], 1, 192, 4300.0)
    assert cells[10] == f"{roof:.2f}" and cells[11] == f"{roof / 8.0:.0%}"
    assert "NVIDIA H200" in text and "timed out after 240 s" in text and "no 'ATOM built' line" in text


def test_device_table_flags_steps_faster_than_the_roofline():
    """A decode step more than 5% under its roofline read less than the workload needs (vLLM's qwen3-30b-a3b FP8
    batches under dummy routers, 144-153%, 2026-12-06): the table's problems name the engine, batch and share, and
    point MoE shapes at --materialize; a step at 74% is not flagged."""
    from atom_server.bench import PRESETS

    mt = _make_table_module()
    roof = mt.roofline_ms(PRESETS["qwen3-30b-a3b"], 32, 192, 3000.0)

    def rep(step):
        return dict(runs=[dict(batch_size=32, input_len=128, output_len=128, output_tok_s=1000.0, ms_per_step=step)])

    bench = dict(shape="qwen3-30b-a3b", device="NVIDIA H100", bandwidth_gbps=3000.0, date="2026-12-06",
                 dtype="bfloat16", config=PRESETS["qwen3-30b-a3b"], command="bash tools/device/bench_vs_vllm.sh",
                 engines=dict(atom=rep(roof / 0.74), vllm=rep(roof / 1.53)))
    text = mt.markdown([bench])
    flagged = [line for line in text.splitlines() if "of the roofline, fewer bytes" in line]
    assert len(flagged) == 1 and "vLLM batch 32: 153%" in flagged[0] and "--materialize" in flagged[0]


def test_device_table_names_a_step_time_that_is_no_measurement():
    """A run whose prefill-only pass took longer than its full run has a step time of 0 or less (vLLM+ATOM's
    qwen3-8b batch 32 in one round of 2026-12-07 on the H200: -2.95 ms): the median step leaves it out and the
    problems name the engine, round and batch; the tok/s (end to end) still counts."""
    mt = _make_table_module()

    def rep(tok_s, step):
        return dict(runs=[dict(batch_size=32, input_len=128, output_len=128, output_tok_s=tok_s, ms_per_step=step)])

    rounds = [dict(vllm=rep(100.0, 5.7), **{"atom-vllm": rep(110.0, 5.0)}),
              dict(vllm=rep(100.0, 5.8), **{"atom-vllm": rep(112.0, -2.95)}),
              dict(vllm=rep(100.0, 5.7), **{"atom-vllm": rep(111.0, 5.1)})]
    bench = dict(shape="qwen3-8b", date="2026-12-07", dtype="bfloat16", config=None, command="c", session="S1",
                 engines=rounds[0], repeats=rounds)
    (row,) = mt.rows([bench])
    assert row["atom-vllm_ms_step"] == pytest.approx(5.05) and row["atom-vllm_tok_s"] == 111.0
    flagged = [line for line in mt.markdown([bench]).splitlines() if "no decode step time" in line]
    assert flagged == ["- qwen3-8b vLLM+ATOM round 2 batch 32: no decode step time (-2.95 ms: the prefill-only run "
                       "took longer than the full run); left out of the ms/step median"]


def test_device_table_pairs_atom_alt_by_round():
    """bench_vs_vllm.py's atom-alt / atom-alt2 engines (ATOM with --alt-env / --alt2-env): ATOM / alt per round,
    a table each."""
    mt = _make_table_module()

    def rep(tok_s, step, **extra):
        return dict(runs=[dict(batch_size=1, input_len=128, output_len=128, output_tok_s=tok_s, ms_per_step=step,
                               prefill_ms=9.0)], **extra)

    rounds = [dict(atom=rep(110.0, 8.0), vllm=rep(100.0, 9.0), **{"atom-alt": rep(100.0, 8.5, alt_env="X=0"),
                                                                  "atom-alt2": rep(55.0, 8.5, alt_env="Y=1")}),
              dict(atom=rep(120.0, 7.5), vllm=rep(100.0, 9.0), **{"atom-alt": rep(80.0, 9.5, alt_env="X=0"),
                                                                  "atom-alt2": rep(120.0, 7.5, alt_env="Y=1")})]
    bench = dict(shape="s", date="2026-12-02", dtype="bfloat16", config=None, command="c", session="S1",
                 engines=rounds[0], repeats=rounds)
    (row,) = mt.rows([bench])
    assert row["atom-alt_ratio_all"] == [1.1, 1.5]  # paired by round, not medians of each engine
    assert row["atom-alt2_ratio_all"] == [2.0, 1.0]
    text = mt.markdown([bench])
    assert "ATOM alt: ATOM with X=0" in text and "ATOM alt2: ATOM with Y=1" in text
    alt_row, alt2_row = [line for line in text.splitlines() if line.startswith("| s | 1 |")][-2:]
    assert "1.30x [1.10-1.50x] n=2" in alt_row and "1.50x [1.00-2.00x] n=2" in alt2_row


def test_device_table_gives_atom_base_ratios_end_to_end_and_by_step():
    """ATOM's FP8 run over its bf16 one (atom-base), paired by round, both end to end (tok/s, the prefill inside)
    and by decode step (bf16 ms over FP8 ms), at three decimals: qwen3-8b batch 1 on the H100 (2026-12-07) was 1.696x
    and 1.701x, both "1.70x" at two."""
    mt = _make_table_module()

    def rep(tok_s, step):
        return dict(runs=[dict(batch_size=1, input_len=128, output_len=128, output_tok_s=tok_s, ms_per_step=step,
                               prefill_ms=6.0)])

    rounds = [dict(atom=rep(277.2, 3.590), **{"atom-base": rep(163.4, 6.113)}),
              dict(atom=rep(277.4, 3.591), **{"atom-base": rep(163.5, 6.108)})]
    bench = dict(shape="s", date="2026-12-07", dtype="bfloat16", config=None, command="c", session="S1",
                 engines=rounds[0], repeats=rounds)
    (row,) = mt.rows([bench])
    assert row["atom_base_ratio_all"] == pytest.approx([277.2 / 163.4, 277.4 / 163.5])
    assert row["atom_base_step_ratio_all"] == pytest.approx([6.113 / 3.590, 6.108 / 3.591])
    base_row = [line for line in mt.markdown([bench]).splitlines() if line.startswith("| s | 1 |")][-1]
    cells = [c.strip() for c in base_row.strip("|").split("|")]
    assert cells[4] == "1.697x [1.696-1.697x] n=2" and cells[5] == "1.702x [1.701-1.703x] n=2"


def test_device_table_pairs_atom_vllm_alt_by_round():
    """bench_vs_vllm.py's atom-vllm-alt engine (vLLM+ATOM with --vllm-alt-env): vLLM+ATOM / alt per round in a table
    of its own; the main table's vLLM+ATOM columns stay atom-vllm's, against vLLM."""
    mt = _make_table_module()

    def rep(tok_s, step, **extra):
        return dict(runs=[dict(batch_size=1, input_len=128, output_len=128, output_tok_s=tok_s, ms_per_step=step,
                               prefill_ms=9.0)], **extra)

    rounds = [dict(atom=rep(110.0, 8.0), vllm=rep(100.0, 9.0),
                   **{"atom-vllm": rep(130.0, 7.0, atom_model_built=True),
                      "atom-vllm-alt": rep(120.0, 7.5, alt_env="ATOM_X=1", atom_model_built=True)}),
              dict(atom=rep(120.0, 7.5), vllm=rep(100.0, 9.0),
                   **{"atom-vllm": rep(90.0, 10.0, atom_model_built=True),
                      "atom-vllm-alt": rep(75.0, 12.0, alt_env="ATOM_X=1", atom_model_built=False)})]
    bench = dict(shape="s", date="2026-12-02", dtype="bfloat16", config=None, command="c", session="S1",
                 engines=rounds[0], repeats=rounds)
    (row,) = mt.rows([bench])
    # paired by round (130/120, 90/75: median 1.14), not medians of each engine (110/97.5 = 1.13)
    assert row["atom-vllm-alt_ratio_all"] == pytest.approx([130 / 120, 1.2])
    assert row["atom-vllm_ratio_all"] == pytest.approx([1.3, 0.9])  # atom-vllm against vLLM, as before
    assert row["atom-alt_ratio_all"] == []
    text = mt.markdown([bench])
    main = next(line for line in text.splitlines() if line.startswith("| s | 1 |"))
    cells = [c.strip() for c in main.strip("|").split("|")]
    assert cells[4] == "110 [90-130] n=2" and cells[6] == "1.10x [0.90-1.30x] n=2"  # atom-vllm's, not the alt's
    assert "vLLM+ATOM alt: vLLM+ATOM with ATOM_X=1" in text
    assert not any(line.startswith("ATOM alt") for line in text.splitlines())  # no ATOM / alt table
    assert "| shape | batch | vLLM+ATOM tok/s | vLLM+ATOM alt tok/s (same call) | vLLM+ATOM / vLLM+ATOM alt |" in text
    alt_row = [line for line in text.splitlines() if line.startswith("| s | 1 |")][-1]
    assert alt_row == "| s | 1 | 110 [90-130] n=2 | 98 [75-120] n=2 | 1.14x [1.08-1.20x] n=2 | 8.50 | 9.75 |"
    assert "s vLLM+ATOM alt round 2: the log shows no 'ATOM built' line" in text


def _bench_vs_vllm_module():
    """tools/device/bench_vs_vllm.py, with sys.path as it was (the script puts its folder first)."""
    saved = list(sys.path)
    try:
        return _make_table_module("bench_vs_vllm")
    finally:
        sys.path[:] = saved


@pytest.mark.parametrize("argv, message", [
    (["--engines", "atom-vllm,atom-vllm-alt", "--vllm-alt-env", "ATOM_X=1 ATOM_Y"],
     "--vllm-alt-env takes NAME=VALUE pairs, got 'ATOM_Y'"),
    (["--engines", "atom-vllm,atom-vllm-alt", "--vllm-alt-env", "=1"], "--vllm-alt-env takes NAME=VALUE pairs"),
    (["--engines", "atom-vllm,atom-vllm-alt"], "the atom-vllm-alt engine needs --vllm-alt-env NAME=VALUE ... "
                                               "(what it changes against atom-vllm)"),
    (["--engines", "atom-vllm-alt", "--vllm-alt-env", "ATOM_DISABLE_VLLM_PLUGIN=1"],
     "--vllm-alt-env may not set 'ATOM_DISABLE_VLLM_PLUGIN=1'"),
    (["--engines", "atom-vllm,atom-vllm-alt2", "--vllm-alt-env", "ATOM_X=1"], "unknown engine(s) atom-vllm-alt2"),
])
def test_device_bench_refuses_bad_vllm_alt_flags(argv, message, capsys):
    bench = _bench_vs_vllm_module()
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_device_bench_vllm_alt_is_atom_vllm_with_its_env(monkeypatch):
    """atom-vllm-alt runs atom-vllm's command from atom-vllm's PYTHONPATH with the plugin on, plus its pairs."""
    bench = _bench_vs_vllm_module()
    monkeypatch.setenv("PYTHONPATH", "/tmp/site-atom:/tmp/site")
    monkeypatch.setenv("ATOM_DISABLE_VLLM_PLUGIN", "1")
    ns = bench.parse_args(["--engines", "atom-vllm,atom-vllm-alt", "--vllm-alt-env", "ATOM_X=1 ATOM_Y=a=b"])
    ns.load_format = "dummy"
    cmd, env = bench.engine_command("atom-vllm", "/m", ns, "/tmp/o.json")
    alt_cmd, alt_env = bench.engine_command("atom-vllm-alt", "/m", ns, "/tmp/o.json")
    assert alt_cmd == cmd and "--expect-no-atom" not in cmd and cmd[1].endswith("vllm_throughput.py")
    assert set(alt_env) - set(env) == {"ATOM_X", "ATOM_Y"} and set(env) <= set(alt_env)
    assert {k: v for k, v in alt_env.items() if env.get(k) != v} == {"ATOM_X": "1", "ATOM_Y": "a=b"}
    assert alt_env["PYTHONPATH"] == "/tmp/site-atom:/tmp/site" and "ATOM_DISABLE_VLLM_PLUGIN" not in alt_env
    assert bench.alt_env("atom-vllm-alt", ns) == "ATOM_X=1 ATOM_Y=a=b" and bench.alt_env("atom-alt", ns) == ""


def test_device_table_merges_calls_per_shape():
    mt = _make_table_module()
    run = dict(batch_size=1, input_len=128, output_len=128, output_tok_s=100.0, ms_per_step=9.0, prefill_ms=5.0)
    first = dict(shape="s", date="2026-11-24", time="10:00:00", command="call A", config=None, session="S1",
                 engines=dict(atom=dict(runs=[run]), vllm=dict(error="timed out")))
    second = dict(shape="s", date="2026-11-24", time="10:09:00", command="call B", config=None, session="S1",
                  engines=dict(vllm=dict(runs=[{**run, "output_tok_s": 200.0}]), atom=dict(error="skipped")))
    (merged,) = mt.merge([second, first])
    assert merged["commands"] == ["call A", "call B"]
    assert merged["engines"]["atom"]["runs"][0]["output_tok_s"] == 100.0  # a later failure keeps the runs
    assert merged["engines"]["vllm"]["runs"][0]["output_tok_s"] == 200.0


def test_device_table_keeps_calls_with_other_atom_switches_apart():
    """A call run as `ATOM_X=1 bash bench_vs_vllm.sh ...` records its ATOM_* switches; make_table.py never merges
    its engines with those of a call without them (the same shape and session), and labels the rows."""
    bench, mt = _bench_vs_vllm_module(), _make_table_module()
    assert bench.atom_env_of_call({"ATOM_MX_FRAG": "1", "ATOM_A": "x", "ATOM_SITE": "/s", "ATOM_TEST_DEVICES": "cuda",
                                   "HOME": "/root"}) == "ATOM_A=x ATOM_MX_FRAG=1"
    run = dict(batch_size=1, input_len=128, output_len=128, ms_per_step=9.0, prefill_ms=5.0)
    plain = dict(shape="s", date="2026-12-05", time="05:11:00", command="A", config=None, session="S1",
                 atom_env="", engines=dict(atom=dict(runs=[{**run, "output_tok_s": 100.0}])))
    switched = dict(shape="s", date="2026-12-05", time="05:15:00", command="B", config=None, session="S1",
                    atom_env="ATOM_MX_FRAG=1", engines=dict(atom=dict(runs=[{**run, "output_tok_s": 120.0}])))
    switched["engines"]["vllm"] = dict(runs=[{**run, "output_tok_s": 90.0, "ms_per_step": -2.4}])
    rows = mt.rows(mt.merge([plain, switched]))
    assert [(r["shape"], r["atom_tok_s"]) for r in rows] == [("s", 100.0), ("s [ATOM_MX_FRAG=1]", 120.0)]
    # a negative step time (the prefill-only run compiled what the timed run then had) is no figure
    assert rows[1]["vllm_tok_s"] == 90.0 and rows[1]["vllm_ms_step"] is None and rows[1]["atom_ms_step"] == 9.0


def test_device_table_never_pairs_sessions_and_reports_the_spread():
    """Issue 16's method: engines of two device sessions are never compared; rounds give median and spread."""
    mt = _make_table_module()

    def rnd(atom: float, vllm: float) -> dict:
        row = dict(batch_size=1, input_len=128, output_len=128, ms_per_step=9.0, prefill_ms=5.0)
        return dict(atom=dict(runs=[{**row, "output_tok_s": atom}]), vllm=dict(runs=[{**row, "output_tok_s": vllm}]))

    rounds = [rnd(100.0, 50.0), rnd(90.0, 60.0), rnd(120.0, 40.0)]
    one = dict(shape="s", date="2026-11-24", time="10:00:00", command="A", config=None, session="S1",
               engines=rounds[0], repeats=rounds)
    other = dict(shape="s", date="2026-11-25", time="10:00:00", command="B", config=None, session="S2",
                 engines=dict(vllm=rounds[0]["vllm"]), repeats=[dict(vllm=rounds[0]["vllm"])])
    rows = mt.rows(mt.merge([one, other]))
    assert [r["shape"] for r in rows] == ["s (S1)", "s (S2)"]
    s1, s2 = rows
    assert s1["atom_tok_s"] == 100.0 and s1["vllm_tok_s"] == 50.0  # medians over the rounds
    assert sorted(s1["atom_ratio_all"]) == [1.5, 2.0, 3.0]  # paired by round, not medians over medians
    assert s2["atom_tok_s"] is None and s2["atom_ratio_all"] == []  # S1's ATOM never meets S2's vLLM
    assert "2.00x [1.50-3.00x] n=3" in mt.table(mt.merge([one]))


@pytest.mark.parametrize("warmup_runs", [None, 0, 2])
def test_throughput_defaults_to_the_bundled_model_with_progress(tmp_path, capsys, warmup_runs):
    from atom_server.default_model import DefaultModelMissing, resolve_model_path

    try:
        path = resolve_model_path()
    except DefaultModelMissing as e:
        pytest.skip(str(e))
    out = tmp_path / "atom.json"
    extra = [] if warmup_runs is None else ["--warmup-runs", str(warmup_runs)]
    rc = bench_cli.main(["throughput", "--input-len", "4", "--output-len", "2", "--batch-sizes", "1",
                         "--num-iters", "1", "--kv-cache-memory-bytes", str(8 << 20), "--output-json", str(out),
                         *extra])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model"] == path and report["runs"][0]["output_tokens"] == 2
    assert report["args"]["warmup_runs"] == (1 if warmup_runs is None else warmup_runs)
    captured = capsys.readouterr()
    assert "loading the model" in captured.out
    # tqdm: a full and a prefill-only run per warm-up (one by default), then one prefill and one full timed run
    runs = 2 * (1 if warmup_runs is None else warmup_runs) + 2
    assert "batch 1: full" in captured.err and f"{runs}/{runs}" in captured.err


def test_throughput_refuses_negative_warmup_runs(capsys):
    with pytest.raises(SystemExit):
        bench_cli.main(["throughput", "--model", "qwen3-0.6b", "--warmup-runs", "-1"])
    assert "--warmup-runs must be >= 0" in capsys.readouterr().err


def test_bench_materializes_moe_shapes_that_vllm_runs():
    """bench_vs_vllm.py --materialize auto (the default): one random checkpoint for an MoE shape whenever a vLLM
    engine runs it (its dummy routers sent a whole batch to a few experts: 153% of the roofline), dummy weights for
    dense shapes and for ATOM against ATOM; on / off force it."""
    from atom_server.bench import PRESETS

    bench = _bench_vs_vllm_module()
    moe, dense = PRESETS["qwen3-30b-a3b"], PRESETS["qwen3-8b"]
    assert bench.wants_materialize("auto", moe, ["vllm", "atom"])
    assert bench.wants_materialize("auto", PRESETS["deepseek-v2-lite"], ["atom-vllm"])
    assert not bench.wants_materialize("auto", moe, ["atom", "atom-alt"])
    assert not bench.wants_materialize("auto", dense, ["vllm", "atom"])
    assert bench.wants_materialize("on", dense, ["atom"]) and not bench.wants_materialize("off", moe, ["vllm"])
    assert bench.parse_args(["--materialize"]).materialize == "on"
    assert bench.parse_args([]).materialize == "auto"


def test_materialize_refuses_a_disk_too_small(tmp_path, monkeypatch):
    """materialize_checkpoint.py counts the checkpoint's bytes before writing: short of them (+1 GiB) it refuses,
    naming both, and writes no shard (a full disk half-way through 57 GiB of qwen3-30b-a3b costs a device call)."""
    import collections

    from transformers import Qwen3MoeConfig

    mat = _make_table_module("materialize_checkpoint")
    Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                   num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, max_position_embeddings=128, architectures=["Qwen3MoeForCausalLM"]
                   ).save_pretrained(tmp_path / "cfg")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(mat.shutil, "disk_usage", lambda path: usage(2 << 30, 1 << 30, 1 << 30))
    with pytest.raises(OSError, match=r"needs 0\.0 GiB, the disk has 1\.0 GiB free"):
        mat.materialize(str(tmp_path / "cfg"), str(tmp_path / "ckpt"), device="cpu")
    assert not [f for f in os.listdir(tmp_path / "ckpt") if f.endswith(".safetensors")]


def test_materialized_checkpoint_loads_in_atom_like_transformers(tmp_path):
    """tools/device/materialize_checkpoint.py (bench_vs_vllm.py --materialize): one random MoE checkpoint on disk,
    routers at their own scale, in the hub's tensor names: ATOM's greedy tokens on it equal transformers'."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from atom_server.llm import LLM
    from atom_server.sampling_params import SamplingParams

    mat = _make_table_module("materialize_checkpoint")
    Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                   num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, max_position_embeddings=128, dtype="float32",
                   architectures=["Qwen3MoeForCausalLM"]).save_pretrained(tmp_path / "cfg")
    out = mat.materialize(str(tmp_path / "cfg"), str(tmp_path / "ckpt"), router_scale=0.5, device="cpu")
    files = [f for f in (tmp_path / "ckpt").iterdir() if f.suffix == ".safetensors"]
    routers = other = 0.0
    keys = []
    for f in files:  # one shard a decoder layer, one for the rest
        with safe_open(str(f), "pt") as st:
            keys += st.keys()
            for key in st.keys():
                amax = st.get_tensor(key).abs().max().item()
                if key.endswith("mlp.gate.weight"):
                    routers = max(routers, amax)
                else:
                    other = max(other, amax)
    assert len(files) == 3 and any(".experts.0.gate_proj.weight" in k for k in keys)  # the hub's per-expert names
    assert 0.4 < routers <= 0.5 and other <= 1e-3
    prompts = [[5, 17, 33, 2, 90], [7, 7, 8]]
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = [ref.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist() for p in prompts]
    llm = LLM(out, device="cpu", dtype="float32", skip_tokenizer_init=True)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
    assert [list(g) for g in got] == want
    assert mat.materialize(str(tmp_path / "cfg"), out, router_scale=0.5) == out  # kept, not rewritten
    with open(tmp_path / "cfg" / "config.json") as f:
        cfg = json.load(f)
    (tmp_path / "q").mkdir()
    with open(tmp_path / "q" / "config.json", "w") as f:
        json.dump({**cfg, "quantization_config": {"quant_method": "mxfp4"}}, f)
    with pytest.raises(ValueError, match="quantized config"):
        mat.materialize(str(tmp_path / "q"), str(tmp_path / "q-out"))


def test_materialized_mxfp4_gpt_oss_checkpoint_is_the_released_layout_and_loads_like_transformers(tmp_path):
    """materialize_checkpoint.py on a GPT-OSS config with MXFP4 experts (the gpt-oss-20b preset's case): the float
    model is filled (routers at their scale), its experts written as *_blocks / *_scales (tools/quantize_mxfp4.py,
    the released layout) beside the other tensors, config.json the given one; ATOM's logits on it equal
    transformers' (which dequantizes the experts itself) to 1e-4, float32."""
    import transformers
    from safetensors import safe_open

    from atom.loader import load_model

    mat = _make_table_module("materialize_checkpoint")
    cfg = transformers.GptOssConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=64, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=8, max_position_embeddings=128,
                                    tie_word_embeddings=False, dtype="float32",
                                    architectures=["GptOssForCausalLM"])
    cfg.save_pretrained(tmp_path / "cfg")
    with open(tmp_path / "cfg" / "config.json") as f:
        raw = json.load(f)
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(tmp_path / "cfg" / "config.json", "w") as f:
        json.dump(raw, f)
    out = mat.materialize(str(tmp_path / "cfg"), str(tmp_path / "ckpt"), router_scale=0.5, device="cpu")
    with open(tmp_path / "ckpt" / "config.json") as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "mxfp4"
    names, routers = {}, 0.0
    for f in (tmp_path / "ckpt").iterdir():
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    t = st.get_tensor(key)
                    names[key] = (t.dtype, tuple(t.shape))
                    if key.endswith("mlp.router.weight"):
                        routers = max(routers, t.abs().max().item())
    e = "model.layers.0.mlp.experts."
    assert names[e + "gate_up_proj_blocks"] == (torch.uint8, (4, 128, 2, 16))
    assert names[e + "gate_up_proj_scales"] == (torch.uint8, (4, 128, 2))
    assert names[e + "down_proj_blocks"] == (torch.uint8, (4, 64, 2, 16))
    assert e + "gate_up_proj" not in names and 0.4 < routers <= 0.5

    prompt = torch.tensor([[5, 17, 33, 2, 90, 7, 7, 8, 200, 3]])
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True)).float().eval()
    with torch.no_grad():
        want = ref(prompt).logits[0, -1].double()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "atom-core" / "tests"))
    from paged_harness import PagedHarness

    model, _ = load_model(out, dtype="float32", device="cpu", progress=False)
    harness = PagedHarness(model, num_blocks=8, block_size=4, device="cpu")
    got = harness.step([prompt[0].tolist()], harness.add(1))[0].double()
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_materialized_gpt_oss_routes_a_batch_over_the_experts():
    """materialize_checkpoint.fill on a GPT-OSS model (transformers', the oracle of routing): a batch of 32 random
    tokens reaches most experts in every layer, as a real checkpoint's does, and no expert is in every token's
    top-k. The earlier rule (one seed for every tensor, biases +-1e-3 like every weight) failed this: the biases,
    the same for every token, outgrew the embeddings, and from the third layer all 32 tokens went to the same 4 of
    16 experts (one in every token's top-4); on the gpt-oss-20b benchmark shape 6-8 of 32."""
    from transformers import GptOssConfig, GptOssForCausalLM

    mat = _make_table_module("materialize_checkpoint")
    cfg = GptOssConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=16,
                       num_experts_per_tok=4, sliding_window=8, max_position_embeddings=128, tie_word_embeddings=False)
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        assert mat.fill(model, 1.0) == 4
    picked = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.router.register_forward_hook(lambda mod, args, out, i=i: picked.__setitem__(i, out[-1]))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 512, (32, 6)))
    for i in range(4):
        counts = torch.bincount(picked[i].reshape(32, 6, -1)[:, -1].flatten(), minlength=16)
        touched, top_share = int((counts > 0).sum()), counts.max().item() / 32
        print(f"layer {i}: {touched} of 16 experts, the busiest in {top_share:.0%} of the tokens' top-4")
        assert touched >= 12 and top_share < 0.8, (i, counts.tolist())


def test_device_table_keeps_the_sessions_measured_crosscheck():
    """bench_vs_vllm.py cross-checks vLLM once a session: a later call of that session records "done earlier";
    the merged table keeps the measured comparison and prints it."""
    mt = _make_table_module()
    measured = dict(batch_size=32, driver_median_s=0.80, driver_latencies_s=[0.79, 0.80, 0.81], harness_s=[0.82],
                    harness_median_s=0.82, ratio=0.82 / 0.80, agree=True, tolerance=0.10)

    def bench(time_, xc):
        return dict(shape="qwen3-8b", date="2026-12-04", time=time_, session="s1", command=f"call at {time_}",
                    engines={}, crosscheck=xc)

    merged = mt.merge([bench("10:00:00", measured), bench("10:05:00", dict(skipped="done earlier in this session"))])
    assert len(merged) == 1 and merged[0]["crosscheck"] is measured
    text = mt.markdown(merged)
    assert "harness / driver 1.025 (agree, tolerance 10%)" in text and "Problems seen" not in text
    off = {**measured, "ratio": 1.3, "agree": False}
    assert "DISAGREE" in "\n".join(mt._problems([bench("10:00:00", off)]))
