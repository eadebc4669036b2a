"""Issue 19's sampler-side fields and structured outputs in the engine (offline LLM on a tiny llama), each
checked against transformers or its definition: allowed_token_ids (only they come out; greedy = transformers'
argmax over them), logit_bias (greedy = argmax of transformers' logits plus the bias), bad_words (never
generated; greedy = transformers with the word's token masked), truncate_prompt_tokens (= the cut prompt),
priority scheduling (the lower value is served first; preemption takes the lowest priority), grammars
(regex / choice / JSON outputs match their definition, with n > 1, next to plain rows, on the decode-graph
path), the device bitmask op (= xgrammar's own), and StepInputs carrying bitmasks through msgpack."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tiny_checkpoint import write_tiny_llama

from atom_server import LLM, SamplingParams
from atom_server.engine import step_input
from atom_server.sampling_params import StructuredOutputsParams

BLOCK = 4
KV_BYTES = 256 * 2 * 2 * BLOCK * 2 * 16 * 4
PROMPT = [5, 77, 123, 9, 250, 31, 64, 200, 18]
STEPS = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def make_llm(ckpt: str, device: str, **kw) -> LLM:
    """The engine under test: float32 (the transformers reference's dtype) on the device under test."""
    return LLM(ckpt, dtype="float32", device=device, block_size=BLOCK, **kw)


@pytest.fixture(scope="module")
def llm(ckpt, device):
    return make_llm(ckpt, device, max_model_len=64, kv_cache_memory_bytes=KV_BYTES)


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def hf_greedy(hf, prompt: list[int], steps: int, adjust) -> list[int]:
    """transformers' greedy tokens, each picked from adjust(logits of the next position, tokens so far)."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
            token = int(adjust(logits, out).argmax())
            out.append(token)
            ids.append(token)
    return out


def generate(llm, prompt=PROMPT, **kw):
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": STEPS, "ignore_eos": True, **kw})
    return llm.generate([{"prompt_token_ids": list(prompt)}], params, use_tqdm=False)[0]


def test_allowed_token_ids(llm, hf):
    allowed = [7, 19, 42, 101, 250]
    greedy = generate(llm, allowed_token_ids=allowed).outputs[0].token_ids

    def only_allowed(logits, _):
        mask = torch.full_like(logits, float("-inf"))
        mask[allowed] = 0
        return logits + mask

    assert greedy == hf_greedy(hf, PROMPT, STEPS, only_allowed)
    sampled = generate(llm, allowed_token_ids=allowed, temperature=1.0, seed=3, n=3, max_tokens=16)
    for co in sampled.outputs:
        assert set(co.token_ids) <= set(allowed)


def test_logit_bias(llm, hf):
    base = generate(llm).outputs[0].token_ids
    bias = {base[0]: -100.0, 33: 5.0, "44": 2.5}  # string keys, as JSON gives them
    greedy = generate(llm, logit_bias=bias).outputs[0].token_ids
    assert greedy[0] != base[0]

    def biased(logits, _):
        logits = logits.clone()
        logits[base[0]] -= 100.0
        logits[33] += 5.0
        logits[44] += 2.5
        return logits

    assert greedy == hf_greedy(hf, PROMPT, STEPS, biased)
    assert SamplingParams(logit_bias={1: 1e9}).logit_bias == {1: 100.0}  # clamped to OpenAI's range


def test_bad_words(llm, hf):
    tok = llm.get_tokenizer()
    base = generate(llm).outputs[0].token_ids
    # a greedy token whose text alone is that one token: banning the word bans the token
    banned = next(t for t in base if tok.decode([t]).strip() and
                  tok.encode(tok.decode([t]).lstrip(), add_special_tokens=False) == [t])
    out = generate(llm, bad_words=[tok.decode([banned])]).outputs[0]

    def ban(logits, _):
        logits = logits.clone()
        logits[banned] = float("-inf")
        return logits

    assert banned not in out.token_ids
    assert out.token_ids == hf_greedy(hf, PROMPT, STEPS, ban)
    # multi-token words: the last token is banned only after the rest of the word
    params = SamplingParams(bad_words=["quick brown"])
    params.update_from_tokenizer(tok)
    assert params.bad_words_token_ids and all(len(w) >= 1 for w in params.bad_words_token_ids)
    words = params.bad_words_token_ids
    assert step_input.bad_word_bans(words, []) == [w[0] for w in words if len(w) == 1]
    for w in words:
        assert w[-1] in step_input.bad_word_bans(words, [3, *w[:-1]])


def test_truncate_prompt_tokens(llm):
    long = PROMPT * 3
    cut = generate(llm, prompt=long, truncate_prompt_tokens=5)
    assert cut.prompt_token_ids == long[-5:]
    assert cut.outputs[0].token_ids == generate(llm, prompt=long[-5:]).outputs[0].token_ids
    whole = generate(llm, prompt=long, truncate_prompt_tokens=-1)  # -1: as much as the context holds
    assert whole.prompt_token_ids == long


def test_priority_scheduling(ckpt, device):
    eng = make_llm(ckpt, device, max_model_len=64, kv_cache_memory_bytes=KV_BYTES, max_num_seqs=1,
              scheduling_policy="priority").llm_engine
    p = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for rid, prio in (("late", 5), ("urgent", -1), ("normal", 0)):
        eng.add_request(rid, PROMPT, p, priority=prio)
    finished = []
    while eng.has_unfinished_requests():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == ["urgent", "normal", "late"]
    fcfs = make_llm(ckpt, device, max_model_len=64, kv_cache_memory_bytes=KV_BYTES).llm_engine
    with pytest.raises(ValueError, match="priority"):
        fcfs.add_request("x", PROMPT, p, priority=1)


def test_priority_preemption_takes_the_lowest_priority(ckpt, device):
    """A KV pool for about two sequences: the running sequence with the largest (priority, arrival) is
    preempted; every request still ends with the tokens it gets alone."""
    small = 12 * 2 * 2 * BLOCK * 2 * 16 * 4  # 12 blocks of the tiny model (K and V, 2 layers, 2 heads of 16)
    llm = make_llm(ckpt, device, max_model_len=48, kv_cache_memory_bytes=small, scheduling_policy="priority")
    eng = llm.llm_engine
    p = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    eng.add_request("low", PROMPT, p, priority=9)
    eng.add_request("high", PROMPT[:5], p, priority=0)
    eng.add_request("mid", PROMPT[:7], p, priority=3)
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    assert eng.stats()["num_preemptions"] > 0
    assert list(outs) == ["high", "mid", "low"]  # "low" was the one preempted (fcfs would take "mid", the last in)
    alone = {"low": PROMPT, "high": PROMPT[:5], "mid": PROMPT[:7]}
    for rid, prompt in alone.items():
        assert outs[rid] == generate(llm, prompt=prompt, max_tokens=20).outputs[0].token_ids, rid


def test_grammar_outputs_match_their_definition(llm):
    pattern = r"[0-9]{3}-(yes|no)"
    out = generate(llm, structured_outputs=StructuredOutputsParams(regex=pattern), max_tokens=24, ignore_eos=False)
    co = out.outputs[0]
    assert re.fullmatch(pattern, co.text) and co.finish_reason == "stop"
    choices = ["Paris", "Berlin", "a b c"]
    many = generate(llm, structured_outputs=StructuredOutputsParams(choice=choices), max_tokens=24, ignore_eos=False,
                    temperature=1.0, seed=1, n=4)
    assert all(c.text in choices and c.finish_reason == "stop" for c in many.outputs)
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "b": {"enum": ["x", "y"]}}, "required": ["a", "b"]}
    js = generate(llm, structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True),
                  max_tokens=40, ignore_eos=False).outputs[0]
    value = json.loads(js.text)
    assert js.finish_reason == "stop" and set(value) == {"a", "b"} and value["b"] in ("x", "y")


def test_grammar_rows_next_to_plain_rows(llm):
    """A batch mixing grammar rows and plain greedy rows: the plain rows keep their tokens."""
    plain = generate(llm).outputs[0].token_ids
    params = [SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=STEPS, structured_outputs=StructuredOutputsParams(
                  regex="[a-z]{2,6}")),
              SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 3, params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == plain == outs[2].outputs[0].token_ids
    assert re.fullmatch("[a-z]{2,6}", outs[1].outputs[0].text)


def test_grammar_on_the_decode_graph_path(ckpt, device, monkeypatch):
    """Decode steps read the graph's captured logits (on CPU: ATOM_DECODE_GRAPHS=static); grammar rows mask
    them."""
    if device == "cpu":
        monkeypatch.setenv("ATOM_DECODE_GRAPHS", "static")
    llm = make_llm(ckpt, device, max_model_len=64, kv_cache_memory_bytes=KV_BYTES, max_num_seqs=4)
    assert llm.llm_engine.core.runner.graphs is not None
    out = generate(llm, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{4}"), max_tokens=12,
                   ignore_eos=False).outputs[0]
    assert re.fullmatch(r"[0-9]{4}", out.text) and out.finish_reason == "stop"


def _join_mid_decode(ckpt, device, monkeypatch, async_scheduling: bool):
    """Plain greedy requests decode; grammar requests join mid-way and finish first; the plain ones go on.
    Returns ({request id: (text, token ids, finish reason)}, steps that left a launched step in flight before
    the grammar requests came, while they ran, after they finished)."""
    if device == "cpu":  # the decode graphs' buffers and body without capture (on a GPU: captured)
        monkeypatch.setenv("ATOM_DECODE_GRAPHS", "static")
    monkeypatch.setenv("ATOM_ASYNC_SCHEDULING", "1" if async_scheduling else "0")
    llm = make_llm(ckpt, device, max_model_len=64, kv_cache_memory_bytes=KV_BYTES, max_num_seqs=8)
    eng = llm.llm_engine
    assert eng.async_scheduling == async_scheduling
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i in range(3):
        eng.add_request(f"plain{i}", PROMPT[i:], plain, final_only=True)
    outs, overlapped = {}, {"before": 0, "during": 0, "after": 0}

    def step(phase: str) -> None:
        outs.update((o.request_id, o) for o in eng.step())
        overlapped[phase] += eng.core.pipeline.inflight is not None

    for _ in range(5):
        step("before")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"]}
    grammars = {"regex": StructuredOutputsParams(regex=r"[0-9]{3}-(yes|no)"),
                "json": StructuredOutputsParams(json=schema, disable_any_whitespace=True),
                "choice": StructuredOutputsParams(choice=["Paris", "Berlin"])}
    for name, spec in grammars.items():
        params = SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=spec)
        eng.add_request(name, PROMPT[::-1], params, final_only=True)
    while any(name not in outs for name in grammars):
        step("during")
    while eng.has_unfinished_requests():
        step("after")
    stats = eng.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    results = {rid: (o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason)
               for rid, o in outs.items()}
    return results, overlapped


def test_grammar_requests_join_an_async_decode(ckpt, device, monkeypatch):
    """Async scheduling (a greedy decode step launched before the previous one is read) next to grammar rows,
    whose next-token mask depends on the token just taken: a batch holding a grammar row resolves the step in
    flight and runs synchronously, so every mask is computed from the committed tokens. Same outputs as the
    synchronous engine; the grammar outputs match their definition; the plain rows overlap again
    afterwards."""
    got, overlapped = _join_mid_decode(ckpt, device, monkeypatch, async_scheduling=True)
    want, none = _join_mid_decode(ckpt, device, monkeypatch, async_scheduling=False)
    assert overlapped["before"] > 0 and overlapped["after"] > 0 and overlapped["during"] == 0, overlapped
    assert not any(none.values())
    assert got == want
    assert re.fullmatch(r"[0-9]{3}-(yes|no)", got["regex"][0]) and got["regex"][2] == "stop"
    assert 0 <= json.loads(got["json"][0])["n"] <= 9 and got["json"][2] == "stop"
    assert got["choice"][0] in ("Paris", "Berlin")
    assert all(len(got[f"plain{i}"][1]) == 40 for i in range(3))


def test_bitmask_op_matches_xgrammar():
    xgr = pytest.importorskip("xgrammar")
    from atom.ops.sampling import apply_token_bitmask

    vocab, rows = 1000, 5
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, vocab, generator=gen)
    bitmask = torch.randint(-(1 << 31), (1 << 31) - 1, (rows, -(-vocab // 32)), dtype=torch.int32, generator=gen)
    which = [1, 2, 4, 6, 7]
    ours = logits.clone()
    apply_token_bitmask(ours, bitmask, torch.tensor(which))
    ref = logits.clone()
    full = torch.full((8, bitmask.shape[1]), -1, dtype=torch.int32)
    full[which] = bitmask
    xgr.apply_token_bitmask_inplace(ref, full, vocab_size=vocab, indices=which)
    assert torch.equal(ours, ref)


def test_step_input_carries_bitmasks(llm):
    from atom_server.engine.sequence import Sequence

    core = llm.llm_engine.core
    params = SamplingParams(temperature=0.0, max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[ab]+"))
    seq = Sequence(10**6, "g", 0, PROMPT, params, core.eos_ids, core.max_model_len)
    seq.grammar = core.grammar_compiler.matchers(params.structured_outputs, 1)[0]
    plain = Sequence(10**6 + 1, "p", 0, PROMPT, SamplingParams(temperature=0.5), core.eos_ids, core.max_model_len)
    sampling = step_input.sampling_inputs([plain, seq], core.grammar_compiler)
    step = step_input.StepInput(seq_ids=[plain.seq_id, seq.seq_id], token_ids=[1, 2], query_start_loc=[0, 1, 2],
                                seq_lens=[10, 10], sampling=sampling)
    again = step_input.decode(step_input.encode(step))
    assert again == step and again.sampling.grammar_rows == [1]
    words = np.frombuffer(again.sampling.grammar_bitmask, dtype=np.int32).reshape(1, -1)
    tok = llm.get_tokenizer()
    allowed = [t for t in range(core.vocab_size) if (words[0, t // 32] >> (t % 32)) & 1]
    assert allowed and all(set(tok.decode([t])) <= {"a", "b"} for t in allowed)


def test_grammar_and_bias_rows_next_to_ngram_speculation(ckpt):
    """Speculative decoding (n-gram) with rows it must not draft for: a grammar row and a logit_bias row decode
    one token a step in the same batches as drafted plain rows. The plain rows' greedy tokens equal the engine
    without speculation (drafts were proposed from their repetitive prompts and verified), the grammar output matches its regex,
    the biased row equals its non-speculative run, and every block comes back."""
    motif = [11, 42, 7, 99]
    plain_prompts = [motif * 4, [3, 5] + motif * 3]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    regex = SamplingParams(temperature=0.0, max_tokens=12,
                           structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-(yes|no)"))
    biased = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logit_bias={motif[0]: 5.0})
    runs = {}
    # one-token lookups: the random tiny model repeats single tokens often, longer n-grams rarely
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                        "prompt_lookup_max": 2}):
        llm = make_llm(ckpt, "cpu", max_model_len=64, kv_cache_memory_bytes=KV_BYTES, max_num_seqs=8,
                       speculative_config=spec)
        prompts = [{"prompt_token_ids": p} for p in (*plain_prompts, PROMPT, motif * 3)]
        outs = llm.generate(prompts, [greedy, greedy, regex, biased], use_tqdm=False)
        stats = llm.llm_engine.stats()
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
        runs[spec is not None] = ([o.outputs[0].token_ids for o in outs], outs[2].outputs[0].text, stats)
        llm.llm_engine.shutdown()
    (base, base_text, _), (spec_ids, spec_text, stats) = runs[False], runs[True]
    assert spec_ids == base
    assert spec_text == base_text and re.fullmatch(r"[0-9]{3}-(yes|no)", spec_text), spec_text
    assert stats["spec_decode_num_draft_tokens"] > 0, stats  # verify steps ran next to the undrafted rows
