"""Async scheduling (a greedy decode step launched before the previous one is read) gives the same tokens
and finish reasons as the synchronous engine and as eager mode: mid-decode admissions, stops by token,
length stops, and sampled / logprob requests (which fall back to synchronous steps) in the same batch.

On a GPU the decode graphs are captured; on CPU the same buffers and body run without capture
(ATOM_DECODE_GRAPHS=static), which covers the async input plumbing (a batch that shrinks while a row's
token is pending once fed a -1 placeholder to the embedding as a padding row)."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoint import write_tiny_llama

from atom_server import LLM, SamplingParams

ON_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.serial  # on a GPU its KV cache is sized from free memory: not beside other GPU tests


def _run(ckpt, prompts, params, monkeypatch, mode: str):
    monkeypatch.setenv("ATOM_ASYNC_SCHEDULING", "0" if mode == "sync" else "1")
    if not ON_GPU:
        monkeypatch.setenv("ATOM_DECODE_GRAPHS", "off" if mode == "eager" else "static")
    llm = LLM(ckpt, dtype="float32", block_size=16, max_model_len=128, max_num_seqs=4, gpu_memory_utilization=0.3,
              enforce_eager=mode == "eager", device=None if ON_GPU else "cpu")
    eng = llm.llm_engine
    assert eng.async_scheduling == (mode == "async")
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = eng.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and not eng.has_unfinished_requests()
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs]


def test_async_matches_sync_and_eager(tmp_path, monkeypatch):
    ckpt = write_tiny_llama(tmp_path)
    prompts = [{"prompt_token_ids": [3 + (i * 29 + j * 7) % 250 for j in range(4 + 9 * i)]} for i in range(10)]
    lengths = [1, 2, 9, 30, 17, 5, 40, 3, 12, 25]
    greedy = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in lengths]
    base = _run(ckpt, prompts, greedy, monkeypatch, "eager")
    # A token that some outputs produce mid-way: as a stop token it ends them early, at different steps.
    stop = next(t for ids, _, _ in base for t in ids[3:6])
    mixed = [p.clone(stop_token_ids=[stop]) for p in greedy]
    mixed[4] = SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)
    mixed[7] = SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True, logprobs=2)
    got = {mode: _run(ckpt, prompts, mixed, monkeypatch, mode) for mode in ("eager", "sync", "async")}
    assert any(r == "stop" for _, r, _ in got["eager"]) and any(r == "length" for _, r, _ in got["eager"])
    greedy_rows = [i for i in range(10) if i != 4]
    for mode in ("sync", "async"):
        assert [got[mode][i] for i in greedy_rows] == [got["eager"][i] for i in greedy_rows], mode
    assert got["async"][4] == got["sync"][4]  # seeded sampling: same draws on both graph paths


def test_stop_strings_under_async_scheduling(tmp_path, monkeypatch):
    """A stop string is found in the output processor after the engine has already launched the next step:
    the token in flight is dropped, nothing extra is reported, every KV block comes back."""
    import re

    ckpt = write_tiny_llama(tmp_path)
    prompts = [{"prompt_token_ids": [3 + (i * 31 + j * 5) % 250 for j in range(5 + 7 * i)]} for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    def run(mode, params):
        monkeypatch.setenv("ATOM_ASYNC_SCHEDULING", "0" if mode == "sync" else "1")
        if not ON_GPU:
            monkeypatch.setenv("ATOM_DECODE_GRAPHS", "off" if mode == "eager" else "static")
        llm = LLM(ckpt, dtype="float32", block_size=16, max_model_len=128, max_num_seqs=8,
                  gpu_memory_utilization=0.3, enforce_eager=mode == "eager", device=None if ON_GPU else "cpu")
        assert llm.llm_engine.async_scheduling == (mode == "async")
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.llm_engine.stats()
        assert stats["num_free_blocks"] == stats["num_total_blocks"] and not llm.llm_engine.has_unfinished_requests()
        return [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
                for o in outs]

    full = run("eager", greedy)
    stops = sorted({m.group(0) for text, *_ in full for m in [re.search(r"[!-~]{2}", text[6:])] if m})[:4]
    with_stops = greedy.clone(stop=stops)
    got = {mode: run(mode, with_stops) for mode in ("eager", "sync", "async")}
    assert any(r == "stop" for _, _, r, _ in got["eager"])
    assert got["async"] == got["eager"] and got["sync"] == got["eager"]
