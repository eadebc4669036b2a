"""SGLang's real engine pieces on ATOM's models: `sglang.benchmark.one_batch --correctness-test`.

one_batch runs SGLang's ModelRunner, loader, KV pools, schedule batch and sampler (prefill of the first
4 tokens, an extend over that cached prefix, then 15 greedy decode steps) on the checkpoint; its greedy
text must equal transformers' greedy continuation of the same token ids, and every logits row it computed
(saved by run_one_batch.py) must match transformers' float32 logits.

GPT-OSS runs on SGLang's triton attention backend (Triton's interpreter on CPU): SGLang accepts only its
own backends for GptOssForCausalLM (an assert on the architecture), and runs it on its hybrid SWA pool
(the sliding-window layers in a pool of their own); ATOM's model passes its sinks per call.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from one_batch_logits import logit_errors
from tiny_models import CONFIGS, SINK_ARCHS, write_checkpoint, write_tokenizer

WRAPPER = Path(__file__).with_name("run_one_batch.py")
OUTPUT_LEN = 16  # one_batch's default --output-len

RUNS = ([(arch, "torch_native") for arch in sorted(CONFIGS) if arch not in SINK_ARCHS]
        + [("MistralForCausalLM", "atom"), ("GptOssForCausalLM", "triton")])


def _greedy(hf, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


@pytest.fixture(scope="module")
def one_batch_runs(tmp_path_factory):
    """Start every run at once (each is mostly single-threaded start-up), then collect them."""
    runs = {}
    for arch, backend in RUNS:
        path = tmp_path_factory.mktemp(f"{arch}-{backend}")
        hf = write_checkpoint(arch, path / "model")
        # Its own folder: transformers 5 would pick the tokenizer class from the model's config.json
        # (Qwen2Tokenizer for qwen2), not from tokenizer_config.json.
        tokenizer = write_tokenizer(path / "tokenizer", hf.config.vocab_size)
        env = {**os.environ, "SGLANG_EXTERNAL_MODEL_PACKAGE": "atom_sglang.models", "OMP_NUM_THREADS": "1",
               "ATOM_SGL_DUMP_LOGITS": str(path / "logits.pt")}
        if backend == "triton":  # SGLang's Triton kernels on CPU: the interpreter, set before triton imports
            env["TRITON_INTERPRET"] = "1"
        cmd = [sys.executable, str(WRAPPER), "--model-path", str(path / "model"),
               "--tokenizer-path", str(path / "tokenizer"), "--device", "cpu",
               "--attention-backend", backend, "--sampling-backend", "pytorch", "--dtype", "float32",
               "--disable-cuda-graph", "--correctness-test", "--max-total-tokens", "4096"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs[(arch, backend)] = (proc, hf, tokenizer, path / "logits.pt")
    results = {}
    for key, (proc, hf, tokenizer, logits) in runs.items():
        out, _ = proc.communicate(timeout=900)
        results[key] = (proc.returncode, out, hf, tokenizer, logits)
    return results


@pytest.mark.parametrize("arch,backend", RUNS, ids=[f"{a}-{b}" for a, b in RUNS])
def test_one_batch_greedy_matches_transformers(one_batch_runs, arch, backend):
    returncode, out, hf, tokenizer, logits_file = one_batch_runs[(arch, backend)]
    assert returncode == 0, out[-4000:]
    assert f"atom-sglang serves {arch} with atom_sglang.models." in out
    assert f"type={arch}" in out, "SGLang did not load this architecture"
    assert ("ATOM attention backend: paged_attention from atom.ops." in out) == (backend == "atom")
    if arch in SINK_ARCHS:  # SGLang's hybrid pool: the sliding-window layer keeps fewer tokens
        assert "Use sliding window memory pool" in out

    input_ids = ast.literal_eval(re.search(r"input_ids=(\[\[.*?\]\])", out).group(1))
    texts = re.findall(r"========== Prompt \d+ ==========\n(.*?) \n", out)
    assert len(texts) == len(input_ids) == 3, out[-4000:]
    greedy = [_greedy(hf, ids, OUTPUT_LEN) for ids in input_ids]
    for text, seq in zip(texts, greedy):
        expected = tokenizer.decode(seq)
        assert text == expected, f"{arch}/{backend}:\n sglang: {text}\n     hf: {expected}"
    errors = logit_errors(hf, input_ids, greedy, torch.load(logits_file))
    assert len(errors) == 2 + OUTPUT_LEN - 1  # prefill, extend over the cached prefix, decode steps
    assert max(errors) < 1e-4, f"{arch}/{backend}: max relative logit error per call {errors}"
