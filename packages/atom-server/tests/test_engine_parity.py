"""Greedy tokens of the engine = transformers' generate(do_sample=False), whatever the batching does:
prefix caching on/off (with real cache hits), tiny prefill chunks, a KV pool small enough to preempt.

Each test runs per `precision` (conftest.py): float32 on every device must give transformers' float32 tokens
exactly; bfloat16 (GPU only) must stay within atom.testing's near-tie-aware greedy bound."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_checkpoint import write_tiny_llama

from atom.testing import assert_bf16_greedy_close
from atom_server import LLM, SamplingParams

MAX_NEW = 12
BLOCK = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    return model


@pytest.fixture(scope="module")
def hf_greedy(hf_model):
    cache: dict[tuple[int, ...], list[int]] = {}

    def run(prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
        key = (*prompt, -max_new)
        if key not in cache:
            with torch.no_grad():
                out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new,
                                        min_new_tokens=max_new, pad_token_id=0)
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]

    return run


@pytest.fixture(scope="module")
def expect_greedy(hf_model, hf_greedy):
    """expect_greedy(got, prompts, dtype): the engine's greedy ids against transformers in float32, exactly
    in float32 (each output against as many reference tokens), within the bf16 bound in bfloat16."""

    def check(got: list[list[int]], prompts: list[list[int]], dtype: str) -> None:
        if dtype == "float32":
            assert got == [hf_greedy(p)[:len(g)] for p, g in zip(prompts, got)]
            return
        refs = []
        with torch.no_grad():  # the reference on the engine's own tokens (teacher forcing)
            for p, g in zip(prompts, got):
                logits = hf_model(torch.tensor([p + g[:-1]])).logits[0]
                refs.append(logits[len(p) - 1:])
        assert_bf16_greedy_close(got, refs)

    return check


def _prompts(seed: int, lengths: list[int], vocab: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


MIXED = _prompts(1, [3, 17, 41, 9, 30, 5])
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def _generate_ids(llm: LLM, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts  # input order kept
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outs)
    return [o.outputs[0].token_ids for o in outs]


def _assert_all_blocks_free(llm: LLM) -> dict:
    stats = llm.llm_engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert not llm.llm_engine.has_unfinished_requests()
    return stats


def _block_bytes(dtype_bytes: int, layers=2, kv_heads=2, head_dim=16) -> int:
    return 2 * layers * BLOCK * kv_heads * head_dim * dtype_bytes


@pytest.mark.parametrize("case", ["prefix_cache_on", "prefix_cache_off", "chunked_prefill_16", "preemption",
                                  "split_mixed_batches"])
def test_greedy_matches_transformers(ckpt, expect_greedy, case, precision, monkeypatch):
    block_bytes = _block_bytes(precision.itemsize)
    kwargs = dict(block_size=BLOCK, max_model_len=64, kv_cache_memory_bytes=256 * block_bytes,
                  dtype=precision.dtype, device=precision.device)
    if case == "prefix_cache_off":
        kwargs["enable_prefix_caching"] = False
    if case in ("chunked_prefill_16", "split_mixed_batches"):
        kwargs["max_num_batched_tokens"] = 16
    if case == "split_mixed_batches":  # CPU runs decodes and prefill chunks of one step as two forwards
        from atom_server.engine import model_runner

        monkeypatch.setattr(model_runner, "CPU_SPLIT_SCORES_BYTES", 0)
    if case == "preemption":
        kwargs["kv_cache_memory_bytes"] = 18 * block_bytes  # 72 tokens for ~6 x 35 needed
    llm = LLM(ckpt, **kwargs)
    if case == "preemption":
        assert llm.llm_engine.stats()["num_total_blocks"] == 18
    got = _generate_ids(llm, MIXED)
    expect_greedy(got, MIXED, precision.dtype)
    stats = _assert_all_blocks_free(llm)
    if case == "preemption":
        assert stats["num_preemptions"] > 0
    if case == "prefix_cache_off":
        assert stats["prefix_cache_hits"] == 0


def test_shared_prefix_hits_cache(ckpt, expect_greedy, precision):
    llm = LLM(ckpt, block_size=BLOCK, max_model_len=96, max_num_batched_tokens=32,
              kv_cache_memory_bytes=256 * _block_bytes(precision.itemsize), dtype=precision.dtype,
              device=precision.device)
    prefix = _prompts(7, [22])[0]
    prompts = [prefix + tail for tail in _prompts(8, [3, 1, 6, 9])]
    first = _generate_ids(llm, prompts[:1])
    assert llm.llm_engine.stats()["prefix_cache_hits"] == 0
    rest = _generate_ids(llm, prompts[1:])
    stats = _assert_all_blocks_free(llm)
    assert stats["prefix_cache_hits"] >= 3 * 20  # the 5 full blocks of the prefix, for each later prompt
    expect_greedy(first + rest, prompts, precision.dtype)


def test_n_greedy_siblings_share_prompt_blocks(ckpt, expect_greedy, precision):
    llm = LLM(ckpt, block_size=BLOCK, max_model_len=64,
              kv_cache_memory_bytes=256 * _block_bytes(precision.itemsize), dtype=precision.dtype,
              device=precision.device)
    prompt = MIXED[2]
    out = llm.generate({"prompt_token_ids": prompt}, GREEDY.clone(n=3), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == MAX_NEW for c in out.outputs)
    expect_greedy([c.token_ids for c in out.outputs], [prompt] * 3, precision.dtype)
    stats = _assert_all_blocks_free(llm)
    assert stats["prefix_cache_hits"] == 2 * (len(prompt) // BLOCK) * BLOCK


def test_text_prompts_and_order(ckpt, expect_greedy, precision):
    llm = LLM(ckpt, block_size=BLOCK, max_model_len=64,
              kv_cache_memory_bytes=256 * _block_bytes(precision.itemsize), dtype=precision.dtype,
              device=precision.device)
    tok = llm.get_tokenizer()
    texts = ["Hello world! How are you", "The quick brown fox", "Prefix caching"]
    outs = llm.generate(texts, [GREEDY, GREEDY.clone(max_tokens=3), GREEDY], use_tqdm=False)
    assert [o.prompt for o in outs] == texts
    for text, out in zip(texts, outs):
        ids = tok(text)["input_ids"]
        assert out.prompt_token_ids == ids
        expect_greedy([out.outputs[0].token_ids], [ids], precision.dtype)
    assert [len(o.outputs[0].token_ids) for o in outs] == [MAX_NEW, 3, MAX_NEW]
    _assert_all_blocks_free(llm)
