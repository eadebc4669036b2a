"""Sampling-side behaviour of the engine: parameter checks, penalties (vLLM as oracle), seeds, n > 1,
logprobs (transformers as oracle), stop tokens, EOS from the generation config, min_tokens, abort.

The engine tests run on each `device` in float32 (conftest.py); logprobs also in bfloat16 on a GPU, within
atom.testing's bf16 bounds."""

from __future__ import annotations

import json
import os
import shutil

import msgspec
import pytest
import torch
from tiny_checkpoint import write_tiny_llama

from atom.testing import assert_bf16_greedy_close, bf16_margin
from atom_server import LLM, EngineArgs, SamplingParams
from atom_server.engine.model_runner import apply_penalties
from atom_server.engine.sequence import Sequence
from atom_server.engine.step_input import sampling_inputs
from atom_server.outputs import RequestOutput

BLOCK = 4
KV_BYTES = 256 * 2 * 2 * BLOCK * 2 * 16 * 4  # 256 blocks of the tiny model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def engines(ckpt):
    """engines(device, dtype): one engine per device and dtype, built on first use."""
    made: dict[tuple[str, str], LLM] = {}

    def get(device: str, dtype: str = "float32") -> LLM:
        if (device, dtype) not in made:
            made[device, dtype] = LLM(ckpt, dtype=dtype, device=device, block_size=BLOCK, max_model_len=64,
                                      kv_cache_memory_bytes=KV_BYTES)
        return made[device, dtype]

    return get


@pytest.fixture(scope="module")
def llm(engines, device):
    return engines(device)


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


PROMPT = [5, 77, 123, 9, 250, 31, 64, 200, 18]


def _ids(llm, params, prompts=(PROMPT,)):
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return outs


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("max_tokens", 0), ("min_tokens", -1), ("logprobs", -5), ("prompt_logprobs", -3),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("stop", [""]),
    ("stop_token_ids", [-1]),
])
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_defaults_and_normalization():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and p.top_k == 0 and p.n == 1 and p.max_tokens == 16 and p.temperature == 1.0
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=20, max_tokens=10)
    # It crosses the engine socket as msgpack: round-trips without pickle.
    again = msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams)
    assert again == p


@pytest.mark.parametrize("field,value", [("block_size", 0), ("max_num_seqs", -1), ("gpu_memory_utilization", 1.5),
                                         ("dtype", "int3"), ("load_format", "pickle"), ("max_model_len", 0)])
def test_engine_args_validation(field, value):
    with pytest.raises(ValueError, match=field):
        EngineArgs(**{field: value})


def test_engine_args_cli_roundtrip():
    import argparse

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--model", "m", "--max-model-len", "128", "--no-enable-prefix-caching", "-tp", "1",
                            "--block-size", "32", "--max-num-batched-tokens", "64", "--dtype", "bfloat16"])
    args = EngineArgs.from_cli_args(ns)
    assert (args.model, args.max_model_len, args.enable_prefix_caching, args.block_size,
            args.max_num_batched_tokens, args.dtype) == ("m", 128, False, 32, 64, "bfloat16")


def test_penalties_match_vllm():
    vllm_utils = pytest.importorskip("vllm.model_executor.layers.utils", reason="vLLM is the oracle here")
    vllm_apply_penalties = vllm_utils.apply_penalties

    vocab = 50
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=gen)
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(repetition_penalty=0.7, frequency_penalty=-0.4),
              SamplingParams(presence_penalty=-1.0)]
    prompts = [[1, 2, 3, 3], [4, 5], [7, 8, 9]]
    outputs = [[2, 2, 10, 11], [5, 6, 6, 6], [9, 12]]
    seqs = []
    for i, (pr, out, p) in enumerate(zip(prompts, outputs, params)):
        s = Sequence(i, str(i), 0, pr, p, frozenset(), 64)
        s.token_ids.extend(out)
        seqs.append(s)
    got = apply_penalties(logits.clone(), sampling_inputs(seqs).penalties)

    def pad(rows):
        width = max(map(len, rows))
        return torch.tensor([r + [vocab] * (width - len(r)) for r in rows])

    want = vllm_apply_penalties(logits.clone(), pad(prompts), pad(outputs),
                                torch.tensor([p.presence_penalty for p in params]),
                                torch.tensor([p.frequency_penalty for p in params]),
                                torch.tensor([p.repetition_penalty for p in params]))
    torch.testing.assert_close(got, want)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    a = _ids(llm, p)[0].outputs[0].token_ids
    others = [[3, 4, 5], list(range(10, 40))]
    b = _ids(llm, [SamplingParams(temperature=0.9, max_tokens=7, ignore_eos=True)] * 2 + [p],
             others + [PROMPT])[2].outputs[0].token_ids
    assert a == b
    c = _ids(llm, p.clone(seed=99))[0].outputs[0].token_ids
    assert c != a  # another seed, another draw (10 tokens from a near-flat distribution)


def test_n_samples_are_distinct_and_reproducible(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    out = _ids(llm, p)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seqs = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(seqs)) == 3 and all(len(s) == 8 for s in seqs)
    assert [tuple(c.token_ids) for c in _ids(llm, p)[0].outputs] == seqs
    stats = llm.llm_engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_logprobs_match_transformers(engines, precision, hf_model):
    """float32: transformers' values to 1e-4 and its exact top-n and ranks. bfloat16: values within
    atom.testing.bf16_margin, and top-n / ranks that only differ from the reference's across a near-tie."""
    llm = engines(precision.device, precision.dtype)
    exact = precision.dtype == "float32"
    n_top = 4
    p = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=n_top, prompt_logprobs=2)
    out = _ids(llm, p)[0]
    comp = out.outputs[0]
    full = PROMPT + comp.token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([full])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    assert len(comp.logprobs) == len(comp.token_ids)
    if not exact:
        assert_bf16_greedy_close([comp.token_ids], [logits[len(PROMPT) - 1:-1]])
    total = 0.0
    for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        top_vals, top_ids = row.topk(n_top)
        if exact:
            assert set(entry) == set(top_ids.tolist()) | {tok}
            assert entry[tok].rank == 1  # greedy
            for tid, val in zip(top_ids.tolist(), top_vals.tolist()):
                assert entry[tid].logprob == pytest.approx(val, abs=1e-4)
        else:
            margin = bf16_margin(logits[len(PROMPT) - 1 + i])
            assert entry[tok].logprob == max(e.logprob for e in entry.values())  # greedy: its own top-1
            for tid, e in entry.items():
                assert e.logprob == pytest.approx(float(row[tid]), abs=margin)
                assert float(row[tid]) >= float(top_vals[-1]) - 2 * margin  # in the top n but for a near-tie
        if exact:  # (bf16 logits can tie, and a tie shares its rank)
            assert sorted(e.rank for e in entry.values()) == list(range(1, n_top + 1))
        total += entry[tok].logprob
    assert comp.cumulative_logprob == pytest.approx(total, abs=1e-4)
    # Prompt logprobs: None for the first token, then the prompt token plus the top 2.
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for pos in range(1, len(PROMPT)):
        entry = out.prompt_logprobs[pos]
        row = ref[pos - 1]
        tok = PROMPT[pos]
        assert tok in entry and len(entry) in (2, 3)
        if exact:
            assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
            assert entry[tok].rank == int((row >= row[tok]).sum())
        else:
            margin = bf16_margin(logits[pos - 1])
            assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=margin)
            # the rank differs from the reference's only by the tokens within a near-tie of this one
            clearly_above = int((row > row[tok] + 2 * margin).sum())
            assert clearly_above < entry[tok].rank <= int((row >= row[tok] - 2 * margin).sum())
    # Everything crosses the engine socket as msgpack, int keys included.
    again = msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=RequestOutput)
    assert again == out


def test_prompt_logprobs_survive_chunked_prefill(ckpt, llm, device):
    chunked = LLM(ckpt, dtype="float32", device=device, block_size=BLOCK, max_model_len=64,
                  kv_cache_memory_bytes=KV_BYTES, max_num_batched_tokens=4)
    p = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    a = _ids(llm, p)[0].prompt_logprobs
    b = _ids(chunked, p)[0].prompt_logprobs
    assert len(a) == len(b) == len(PROMPT)
    for ea, eb in zip(a[1:], b[1:]):
        assert ea.keys() == eb.keys()
        for k in ea:
            assert ea[k].logprob == pytest.approx(eb[k].logprob, abs=1e-5)


def test_stop_token_ids_and_min_tokens(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    base = _ids(llm, greedy)[0].outputs[0].token_ids
    stop_id = base[3]
    first = base.index(stop_id)
    out = _ids(llm, greedy.clone(stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == base[:first + 1]  # the stop token is reported ...
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    tok = llm.get_tokenizer()
    assert out.text == tok.decode(base[:first])  # ... but its text is not
    held = _ids(llm, greedy.clone(stop_token_ids=[stop_id], min_tokens=first + 2))[0].outputs[0]
    assert stop_id not in held.token_ids[:first + 2]


def test_eos_from_generation_config(ckpt, llm, device, tmp_path):
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    base = _ids(llm, greedy.clone(ignore_eos=True))[0].outputs[0].token_ids
    extra_eos = base[2]
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    gen_path = os.path.join(folder, "generation_config.json")
    cfg = json.load(open(gen_path)) if os.path.exists(gen_path) else {}
    cfg["eos_token_id"] = [llm.get_tokenizer().eos_token_id, extra_eos]
    json.dump(cfg, open(gen_path, "w"))
    eng = LLM(str(folder), dtype="float32", device=device, block_size=BLOCK, max_model_len=64,
              kv_cache_memory_bytes=KV_BYTES)
    out = _ids(eng, greedy)[0].outputs[0]
    cut = base.index(extra_eos)
    assert out.token_ids == base[:cut + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    ignored = _ids(eng, greedy.clone(ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == base and ignored.finish_reason == "length"


def test_abort_and_errors(llm):
    eng = llm.llm_engine
    with pytest.raises(ValueError, match="too long"):
        eng.add_request("long", list(range(2, 66)), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("empty", [], SamplingParams())
    p = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    eng.add_request("a", PROMPT, p)
    eng.add_request("b", PROMPT[:4], p)
    with pytest.raises(ValueError, match="already"):
        eng.add_request("a", PROMPT, p)
    eng.step()
    eng.step()
    eng.abort_request("a")
    seen = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen.setdefault(out.request_id, []).append(out)
    assert seen["a"][-1].finished and seen["a"][-1].outputs[0].finish_reason == "abort"
    assert len(seen["a"]) == 1  # reported once
    assert seen["b"][-1].outputs[0].finish_reason == "length" and len(seen["b"][-1].outputs[0].token_ids) == 30
    stats = eng.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["kv_cache_usage"] == 0.0
