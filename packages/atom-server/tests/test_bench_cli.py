"""`atom bench throughput` on a config-only checkpoint and `atom bench serve` against a real
`python -m atom_server serve` subprocess (tiny llama, loopback only)."""

from __future__ import annotations

import json

import pytest

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
