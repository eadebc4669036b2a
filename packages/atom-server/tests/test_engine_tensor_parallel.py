"""Tensor and expert parallelism in atom-server's engine: TP=2 (two processes on gloo) and TP=2 with expert
parallelism give the greedy tokens of TP=1 and of transformers, for Llama, Qwen3, Qwen3-MoE and Mixtral
tiny checkpoints in float32 (and DeepSeek-V3 with expert parallelism: MLA, grouped routing, shared experts), through prefix-cache hits, chunked prefills and preemptions; every KV block
is free at the end and every rank's runner holds the same block tables as rank 0's (nothing once released).
Some cases run the decode graphs' buffers (ATOM_DECODE_GRAPHS=static), hence async scheduling: launched
steps whose tokens each rank takes from its own previous replay. Bad TP configurations fail before any
worker starts, naming the problem.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch
import transformers

from tp_checkpoints import BASE, CONFIGS, hf_greedy, kv_bytes, write_checkpoint

from atom.layers.moe import FusedMoE
from atom_server import LLM, SamplingParams
from atom_server.engine.executor import ExecutorFatalError, TPExecutor, WorkerError, cpu_shares

BLOCK = 4
MAX_NEW = 8
NUM_BLOCKS = 20  # 80 tokens for 8 sequences of up to ~50: preemptions
# (family, expert parallel, decode graphs' buffers + async scheduling)
CASES = [("llama", False, True), ("qwen3", False, False), ("qwen3_moe", False, False), ("qwen3_moe", True, True),
         ("mixtral", False, True), ("mixtral", True, False), ("deepseek_v3", True, False)]


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    shared = [rng.randrange(2, 150) for _ in range(20)]  # 5 full blocks: prefix-cache hits
    lengths = [3, 23, 41, 9, 30, 5]  # 41 and 30: prefills chunked at 16 tokens
    return [[rng.randrange(2, 150) for _ in range(n)] for n in lengths] + [shared + [7, 8], shared + [9]]


PROMPTS = _prompts()
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_ckpts")
    return {name: write_checkpoint(name, root / name) for name in CONFIGS}


def _run(path: str, name: str, tp: int, ep: bool = False) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, tensor_parallel_size=tp, enable_expert_parallel=ep, block_size=BLOCK, max_model_len=64,
              max_num_batched_tokens=16, kv_cache_memory_bytes=kv_bytes(name, tp, NUM_BLOCKS, BLOCK),
              skip_tokenizer_init=True, dtype="float32", device="cpu")
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        assert all(o.finished and len(o.outputs[0].token_ids) == MAX_NEW for o in outs)
    except BaseException:
        llm.llm_engine.shutdown()  # the next case starts its own workers
        raise
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize("name,ep,graphs", CASES,
                         ids=[f"{n}{'-ep' if e else ''}{'-graphs' if g else ''}" for n, e, g in CASES])
def test_tp2_greedy_matches_tp1_and_transformers(checkpoints, name, ep, graphs, monkeypatch):
    path = checkpoints[name]
    want = hf_greedy(path, PROMPTS, MAX_NEW)
    tp1, llm1 = _run(path, name, 1)
    assert tp1 == want
    del llm1
    if graphs:  # inherited by the worker: every rank runs launched steps from its own replay's tokens
        monkeypatch.setenv("ATOM_DECODE_GRAPHS", "static")
    got, llm = _run(path, name, 2, ep)
    engine = llm.llm_engine
    try:
        runner = engine.runner
        assert isinstance(runner, TPExecutor) and runner.world_size == 2
        assert engine.async_scheduling == graphs
        if ep:  # whole experts, half of them per rank
            experts = next(m for m in runner.model.modules() if isinstance(m, FusedMoE))
            assert (experts.num_local_experts, experts.tp_size) == (experts.num_experts // 2, 1)
        assert got == want
        stats = engine.stats()
        assert stats["num_total_blocks"] == NUM_BLOCKS
        assert stats["num_free_blocks"] == NUM_BLOCKS and stats["num_running"] == stats["num_waiting"] == 0
        assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] >= 20
        states = runner.rank_states()
        assert [s.rank for s in states] == [0, 1]
        assert states[0].tables and states[1].tables == states[0].tables  # the last finished, not yet released
        runner.execute(engine.step_inputs.flush())
        assert all(not s.tables and not s.generators for s in runner.rank_states())
        if name == "qwen3":  # (once) a dead worker: the next step fails at once, naming the rank
            (pid,) = runner.worker_pids
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(WorkerError, match=f"rank 1 \\(pid {pid}\\) killed by SIGKILL") as e:
                llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False)
            assert isinstance(e.value, ExecutorFatalError) and e.value.rank == 1
    finally:
        engine.shutdown()
    assert all(p.poll() is not None for p in runner._procs)


@pytest.fixture
def config_only(tmp_path):
    """A checkpoint folder with only config.json: bad TP settings are refused before any weight is read."""

    def write(config) -> str:
        config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
        config.save_pretrained(tmp_path)
        return os.fspath(tmp_path)

    return write


@pytest.mark.parametrize("config,tp,ep,needle", [
    (CONFIGS["llama"](), 3, False, "num_attention_heads=4 is not divisible by tensor_parallel_size=3"),
    (transformers.LlamaConfig(**{**BASE, "num_attention_heads": 6, "hidden_size": 96}, num_key_value_heads=3), 2,
     False, "num_key_value_heads=3 is not divisible by tensor_parallel_size=2"),
    (transformers.Qwen3MoeConfig(**BASE, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                                 moe_intermediate_size=32), 4, True,
     "num_experts=6 is not divisible by tensor_parallel_size=4"),
    (transformers.Qwen3MoeConfig(**BASE, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                                 moe_intermediate_size=30), 4, False,
     "moe intermediate size 30 is not divisible by tensor_parallel_size=4"),
])
def test_bad_parallel_configs_fail_before_workers_start(config_only, config, tp, ep, needle):
    with pytest.raises(ValueError, match=needle):
        LLM(config_only(config), tensor_parallel_size=tp, enable_expert_parallel=ep, skip_tokenizer_init=True,
            device="cpu")
    assert TPExecutor._live is None


def test_more_ranks_than_gpus_is_refused(config_only):
    visible = torch.cuda.device_count()
    tp = max(2, visible + 1)
    with pytest.raises(ValueError, match=f"tensor_parallel_size={tp} needs {tp} GPUs, {visible} visible"):
        LLM(config_only(CONFIGS["llama"]()), tensor_parallel_size=tp, skip_tokenizer_init=True, device="cuda")


@pytest.mark.parametrize("allowed,cores,total,tp,want", [
    # atom serve pinned the engine to 6 of 8 cores: the two ranks split them
    ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], 8, 2, ([(0, 1, 2), (3, 4, 5)], 3)),
    # SMT: 12 logical CPUs pinned, 6 physical cores among them: one CPU per core, split
    (list(range(12)), [0, 2, 4, 6, 8, 10], 16, 3, ([(0, 2), (4, 6), (8, 10)], 2)),
    # not pinned (offline LLM): threads split, the ranks float
    (list(range(8)), list(range(8)), 8, 2, ([None, None], 4)),
    # pinned to fewer cores than ranks: they share, one thread each
    ([0], [0], 2, 2, ([None, None], 1)),
])
def test_cpu_ranks_split_the_engines_cores(allowed, cores, total, tp, want):
    assert cpu_shares(tp, allowed, cores, total) == want
