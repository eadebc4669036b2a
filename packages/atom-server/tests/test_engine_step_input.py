"""Step inputs are data: every StepInput the engine sends round-trips through msgpack, and a second model
runner (a rank of its own) fed only the decoded copies produces the same results, step for step.
The decode graphs' input plumbing (static buffers, one copy, the async previous-row indirection) runs on
CPU without capture (ATOM_DECODE_GRAPHS=static) and gives the eager path's greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_checkpoint import write_tiny_llama

from atom_server import LLM, SamplingParams
from atom_server.engine import step_input as si
from atom_server.engine.model_runner import ModelRunner

BLOCK = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _prompts(lengths, vocab: int = 300):
    return [[3 + (i * 29 + j * 7) % (vocab - 3) for j in range(n)] for i, n in enumerate(lengths)]


def test_step_inputs_round_trip_and_drive_a_second_runner(ckpt):
    kv_bytes = 20 * 2 * 2 * BLOCK * 2 * 16 * 4  # 20 blocks (80 tokens): preemptions below
    args = dict(block_size=BLOCK, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=12,
                kv_cache_memory_bytes=kv_bytes)
    llm = LLM(ckpt, device="cpu", **args)
    eng = llm.llm_engine
    sent: list[tuple[bytes, si.StepInput, list]] = []
    execute = eng.runner.execute

    def recording_execute(step):
        results = execute(step)
        sent.append((si.encode(step), step, results))
        return results

    eng.runner.execute = recording_execute
    prompts = _prompts([5, 23, 9, 30, 14, 3, 30])
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, prompt_logprobs=2, ignore_eos=True),
              SamplingParams(temperature=1.0, min_p=0.05, seed=5, max_tokens=9, repetition_penalty=1.3,
                             frequency_penalty=0.4, presence_penalty=0.2, ignore_eos=True),
              SamplingParams(n=2, temperature=0.7, seed=3, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=6, min_tokens=4, stop_token_ids=[5, 6]),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(o.finished for o in outs)
    stats = eng.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_preemptions"] > 0

    steps = [s for _, s, _ in sent]
    for data, step, _ in sent:
        assert si.decode(data) == step
    kinds = {("decode" if s.is_decode else "prefill" if s.sample_rows == [] else "mixed") for s in steps}
    assert kinds == {"decode", "prefill", "mixed"}
    assert any(s.sampling is not None and s.sampling.seeds and s.sampling.penalties for s in steps)
    assert any(s.sampling is not None and s.sampling.banned_token_ids for s in steps)
    assert any(s.prompt_logprobs for s in steps) and any(s.finished_seq_ids for s in steps)
    assert any(u.start > 0 for s in steps for u in s.block_updates)  # tails of grown tables
    assert any(s.sampling is None for s in steps)  # plain greedy steps send no sampling inputs

    other = ModelRunner(ckpt, dtype="auto", device=torch.device("cpu"), gpu_memory_utilization=0.9,
                        load_format="auto", **args)
    for data, _, results in sent:
        assert other.execute(si.decode(data)) == results
    assert other.tables.row_of.keys() == eng.runner.tables.row_of.keys()  # the same sequences' tables kept


def _run(ckpt, prompts, params, monkeypatch, mode: str):
    monkeypatch.setenv("ATOM_DECODE_GRAPHS", "off" if mode == "eager" else "static")
    monkeypatch.setenv("ATOM_ASYNC_SCHEDULING", "1" if mode == "async" else "0")
    llm = LLM(ckpt, dtype="float32", block_size=BLOCK, max_model_len=80, max_num_seqs=4, max_num_batched_tokens=4,
              kv_cache_memory_bytes=1 << 20, device="cpu")
    eng = llm.llm_engine
    assert eng.async_scheduling == (mode == "async") and (eng.runner.graphs is None) == (mode == "eager")
    counts = {"replays": 0, "launches": 0, "one_token_chunks": 0}
    if eng.runner.graphs is not None:
        replay, launch = eng.runner.graphs.replay, eng.runner.launch_decode

        def counting_replay(*a):
            counts["replays"] += 1
            return replay(*a)

        def counting_launch(step):
            counts["launches"] += 1
            return launch(step)

        eng.runner.graphs.replay, eng.runner.launch_decode = counting_replay, counting_launch
    build = eng.step_inputs.build

    def watching_build(batch, prev_rows=None):
        step = build(batch, prev_rows)
        # All rows one token but some row is a prefill chunk: must not be taken for a decode step.
        if sum(batch.num_new_tokens) == len(batch.seqs) and not step.is_decode:
            counts["one_token_chunks"] += 1
        return step

    eng.step_inputs.build = watching_build
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = eng.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and not eng.has_unfinished_requests()
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs], counts


def test_graph_input_plumbing_matches_eager_on_cpu(ckpt, monkeypatch):
    # A budget of 4 tokens for 4 sequences: when one finishes, the next prompt is prefilled one token per
    # step next to 3 decodes (one-token chunks), then all 4 decode (graph steps).
    prompts = [{"prompt_token_ids": p} for p in _prompts([4 + 3 * i for i in range(8)])]
    lengths = [1, 12, 9, 30, 13, 25, 24, 18]
    greedy = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in lengths]
    base, _ = _run(ckpt, prompts, greedy, monkeypatch, "eager")
    stop = next(t for ids, _, _ in base for t in ids[3:6])  # ends some outputs early, at different steps
    mixed = [p.clone(stop_token_ids=[stop]) for p in greedy]
    mixed[4] = SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    mixed[6] = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
    got, counts = {}, {}
    for mode in ("eager", "sync", "async"):
        got[mode], counts[mode] = _run(ckpt, prompts, mixed, monkeypatch, mode)
    assert any(r == "stop" for _, r, _ in got["eager"]) and any(r == "length" for _, r, _ in got["eager"])
    greedy_rows = [i for i in range(len(prompts)) if i != 4]
    for mode in ("sync", "async"):
        assert [got[mode][i] for i in greedy_rows] == [got["eager"][i] for i in greedy_rows], mode
        assert counts[mode]["replays"] > 10 and counts[mode]["one_token_chunks"] > 0, counts
    assert counts["async"]["launches"] > 5 and counts["sync"]["launches"] == 0
    assert got["async"][4] == got["sync"][4]  # seeded sampling: same draws on both graph paths


def test_runner_block_tables_follow_the_deltas():
    from atom_server.engine.block_tables import BlockTables

    def step(updates=(), finished=()):
        return si.StepInput(seq_ids=[], token_ids=[], query_start_loc=[0], seq_lens=[],
                            block_updates=[si.BlockTableUpdate(*u) for u in updates], finished_seq_ids=list(finished))

    tables = BlockTables(width=8, block_size=BLOCK, capacity=2)
    tables.apply(step([(10, 0, [3, 4]), (11, 0, [5]), (12, 0, [6, 7, 8])]))  # three rows: capacity grows
    rows = tables.rows([10, 11, 12])
    state = tables.state[rows].copy()
    assert tables.table[rows[2], :3].tolist() == [6, 7, 8] and tables.num_blocks[rows].tolist() == [2, 1, 3]
    slots = tables.slots(rows, np.array([5, 0, 9]))
    assert slots.tolist() == [4 * BLOCK + 1, 5 * BLOCK, 8 * BLOCK + 1]
    tables.apply(step([(10, 2, [9]), (12, 0, [1])], finished=[11]))  # a tail; a replaced (shorter) table
    assert tables.table[rows[0], :3].tolist() == [3, 4, 9] and tables.num_blocks[rows[0]] == 3
    assert tables.table[rows[2]].tolist() == [1, 0, 0, 0, 0, 0, 0, 0] and tables.num_blocks[rows[2]] == 1
    assert (tables.state[rows[[0, 2]]] != state[[0, 2]]).all() and 11 not in tables.row_of
    with pytest.raises(ValueError, match="exceeds the 8"):
        tables.apply(step([(10, 3, [1] * 6)]))
    with pytest.raises(ValueError, match="update from block 5"):
        tables.apply(step([(12, 5, [1])]))
