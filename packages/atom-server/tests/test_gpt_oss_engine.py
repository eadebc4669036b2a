"""GPT-OSS through atom-server's engine: greedy tokens equal transformers' (dense experts in transformers'
layout, and MXFP4 experts against transformers on the dequantized weights), with prompts longer than the
sliding window (5), blocks of 4 tokens, chunked prefill and a prefix-cache hit; the sliding-window layer
keeps only its window (the window pool) unless --disable-hybrid-kv-cache-manager. The decode graphs'
input plumbing (window slots and tables in the static buffers) runs on CPU without capture."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import write_tiny_gpt_oss

from atom_server import LLM, SamplingParams
from atom_server.engine import step_input as si
from atom_server.engine.executor import TPExecutor
from atom_server.engine.model_runner import ModelRunner

MAX_NEW = 10
BLOCK, WINDOW = 4, 5
REPO = Path(__file__).resolve().parents[3]
PROMPT_LENS = (3, 17, 41, 9, 26)
ENGINE = dict(block_size=BLOCK, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=16,
              kv_cache_memory_bytes=1 << 20, device="cpu")


def _quantize(dense: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("quantize_mxfp4", REPO / "tools" / "quantize_mxfp4.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.convert(dense, out)


def _hf_greedy(hf, prompts) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                              pad_token_id=0, eos_token_id=None)
            out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    rng = random.Random(3)
    prompts = [[rng.randrange(2, 300) for _ in range(n)] for n in PROMPT_LENS]
    prompts.append(prompts[2][:30] + [7, 8])  # a cached prefix of the 41-token prompt, run afterwards
    dense = write_tiny_gpt_oss(tmp_path_factory.mktemp("gpt_oss_dense"))
    mxfp4 = str(tmp_path_factory.mktemp("gpt_oss_mxfp4"))
    _quantize(dense, mxfp4)
    hf_dense = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    hf_mxfp4 = AutoModelForCausalLM.from_pretrained(mxfp4, dtype=torch.float32,
                                                    quantization_config=Mxfp4Config(dequantize=True)).float().eval()
    return {"prompts": prompts, "dense": (dense, _hf_greedy(hf_dense, prompts)),
            "mxfp4": (mxfp4, _hf_greedy(hf_mxfp4, prompts))}


def _watch_window(engine) -> list[int]:
    """After every commit: window-pool blocks each running sequence holds (the most seen is returned)."""
    held = [0]
    commit = engine.scheduler.commit

    def watching_commit(batch):
        commit(batch)
        for s in engine.scheduler.running:
            held[0] = max(held[0], len(s.window_table) - s.window_start)

    engine.scheduler.commit = watching_commit
    return held


@pytest.mark.parametrize("experts,windowed", [("dense", True), ("mxfp4", True), ("dense", False)],
                         ids=["dense-window-pool", "mxfp4-window-pool", "dense-full-length"])
def test_greedy_matches_transformers(experts, windowed, checkpoints):
    path, want = checkpoints[experts]
    prompts = checkpoints["prompts"]
    llm = LLM(path, disable_hybrid_kv_cache_manager=not windowed, **ENGINE)
    engine = llm.llm_engine
    runner = engine.runner
    assert runner.model.model.layers[0].mlp.experts.w13_weight.dtype == (
        torch.uint8 if experts == "mxfp4" else torch.float32)  # MXFP4 served packed
    sliding = runner.model.model.layers[0].self_attn.attn.impl.kv_cache
    full = runner.model.model.layers[1].self_attn.attn.impl.kv_cache
    if windowed:
        assert runner.kv_window == WINDOW and sliding.k.shape[0] == runner.num_window_blocks < full.k.shape[0]
    else:
        assert runner.kv_window is None and sliding.k.shape == full.k.shape
    held = _watch_window(engine)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:-1]], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want[:-1]
    again = llm.generate([{"prompt_token_ids": prompts[-1]}], params, use_tqdm=False)
    assert engine.stats()["prefix_cache_hits"] > 0 and again[0].outputs[0].token_ids == want[-1]
    if windowed:  # the last WINDOW - 1 tokens span at most 2 blocks of 4
        assert 0 < held[0] <= -(-(WINDOW - 1) // BLOCK) + 1
        assert len(engine.block_manager.window_pool.free) == runner.num_window_blocks  # all given back


def test_fp8_kv_cache_in_both_pools(checkpoints):
    """--kv-cache-dtype fp8 with the window pool: the sliding-window layer's pool is FP8 too (one byte a
    value), and the greedy tokens equal those of the same FP8 cache at full length
    (--disable-hybrid-kv-cache-manager): keeping only the window changes nothing on an FP8 cache either,
    prefix-cache hit included."""
    path, _ = checkpoints["dense"]
    prompts = [{"prompt_token_ids": p} for p in checkpoints["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    tokens = {}
    for windowed in (True, False):
        llm = LLM(path, kv_cache_dtype="fp8", disable_hybrid_kv_cache_manager=not windowed, **ENGINE)
        engine = llm.llm_engine
        runner = engine.runner
        assert {c.k.dtype for c in runner.kv_caches} == {torch.float8_e4m3fn}
        if windowed:
            spec = runner.model.model.layers[0].self_attn.attn.impl.kv_cache_spec
            assert runner.kv_window == WINDOW and runner.num_window_blocks > 0
            assert runner.window_block_bytes == 2 * BLOCK * spec.num_kv_heads * spec.head_dim  # k and v, e4m3
        outs = llm.generate(prompts[:-1], params, use_tqdm=False)
        again = llm.generate(prompts[-1:], params, use_tqdm=False)
        assert engine.stats()["prefix_cache_hits"] > 0
        tokens[windowed] = [o.outputs[0].token_ids for o in outs + again]
    assert tokens[True] == tokens[False]


def _generate(path, prompts, monkeypatch, mode: str, record: list | None = None):
    monkeypatch.setenv("ATOM_DECODE_GRAPHS", "off" if mode == "eager" else "static")
    monkeypatch.setenv("ATOM_ASYNC_SCHEDULING", "1" if mode == "async" else "0")
    llm = LLM(path, **ENGINE)
    engine = llm.llm_engine
    assert (engine.runner.graphs is None) == (mode == "eager") and engine.runner.kv_window == WINDOW
    replays = [0]
    if engine.runner.graphs is not None:
        replay = engine.runner.graphs.replay

        def counting_replay(*a):
            replays[0] += 1
            return replay(*a)

        engine.runner.graphs.replay = counting_replay
    if record is not None:
        execute = engine.runner.execute

        def recording_execute(step):
            results = execute(step)
            record.append((si.encode(step), results))
            return results

        engine.runner.execute = recording_execute
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW + i, ignore_eos=True) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], replays[0]


def test_decode_graph_inputs_with_the_window_pool_on_cpu(checkpoints, monkeypatch):
    """The static graph buffers carry the window pool's slots and tables (sync and async launches); the
    StepInputs with window-table deltas round-trip and drive a second runner to the same results."""
    path, _ = checkpoints["mxfp4"]
    prompts = checkpoints["prompts"][:5]
    sent: list = []
    eager, _ = _generate(path, prompts, monkeypatch, "eager")
    static, replays = _generate(path, prompts, monkeypatch, "static", record=sent)
    asynchronous, async_replays = _generate(path, prompts, monkeypatch, "async")
    assert static == eager and asynchronous == eager and replays > 10 and async_replays > 10
    steps = [si.decode(data) for data, _ in sent]
    assert any(u.start > 0 for s in steps for u in s.window_block_updates)  # grown tails of window tables
    monkeypatch.setenv("ATOM_DECODE_GRAPHS", "off")
    other = ModelRunner(path, dtype="auto", device=torch.device("cpu"), gpu_memory_utilization=0.9,
                        load_format="auto", **{k: v for k, v in ENGINE.items() if k != "device"})
    for step, (_, results) in zip(steps, sent):
        assert other.execute(step) == results


def test_tp2_with_the_window_pool_matches_transformers(checkpoints, monkeypatch):
    """MXFP4 GPT-OSS at TP=2 (a worker process, gloo): heads and sinks split over the ranks, each expert's
    intermediate size too (MXFP4 codes and scales sliced, the down bias added by one rank); the window pool's
    table deltas reach the worker in StepInput.window_block_updates. Decode graphs' buffers with async
    scheduling (each rank feeds its own replay's tokens). Greedy tokens = transformers (float32), through a
    prefix-cache hit; both ranks hold the same main and window-pool tables, and nothing once released."""
    path, want = checkpoints["mxfp4"]
    prompts = checkpoints["prompts"]
    monkeypatch.setenv("ATOM_DECODE_GRAPHS", "static")  # inherited by the worker
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    engine = llm.llm_engine
    runner = engine.runner
    try:
        assert isinstance(runner, TPExecutor) and runner.kv_window == WINDOW and engine.async_scheduling
        attn = runner.model.model.layers[0].self_attn
        assert attn.sinks.shape == (2,) and runner.model.model.layers[0].mlp.experts.w13_weight.shape[1] == 64
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:-1]], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want[:-1]
        states = runner.rank_states()
        assert states[0].window_tables and states[1].window_tables == states[0].window_tables
        assert states[1].tables == states[0].tables
        again = llm.generate([{"prompt_token_ids": prompts[-1]}], params, use_tqdm=False)
        assert engine.stats()["prefix_cache_hits"] > 0 and again[0].outputs[0].token_ids == want[-1]
        runner.execute(engine.step_inputs.flush())
        assert all(not s.tables and not s.window_tables for s in runner.rank_states())
        assert len(engine.block_manager.window_pool.free) == runner.num_window_blocks
    finally:
        engine.shutdown()


@pytest.mark.parametrize("experts,method", [("dense", "UnquantizedSwigluOaiMethod"),
                                            ("mxfp4", "Mxfp4SwigluOaiMethod")])
def test_expert_parallel_is_refused_before_workers_start(checkpoints, experts, method):
    """GPT-OSS's expert kernels take every id as a local expert (no -1 skipping): --enable-expert-parallel is
    refused by name, from the meta-device check, before any worker process starts."""
    with pytest.raises(ValueError, match=f"and expert parallelism: .*{method} experts yet.*without "
                                         "--enable-expert-parallel"):
        LLM(checkpoints[experts][0], tensor_parallel_size=2, enable_expert_parallel=True, **ENGINE)
    assert TPExecutor._live is None


@pytest.mark.gpu
@pytest.mark.serial  # KV sized from free GPU memory: not beside other GPU tests
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graphs_with_sinks_and_the_window_pool(tmp_path):  # pragma: no cover - GPU
    """Decode graphs captured over the Triton kernels (sinks, window, MXFP4 experts), KV sized by the profile
    run with the window pool: the same greedy tokens as eager steps and as transformers (float32)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    dense = write_tiny_gpt_oss(tmp_path / "dense")
    mxfp4 = str(tmp_path / "mxfp4")
    _quantize(dense, mxfp4)
    rng = random.Random(5)
    prompts = [[rng.randrange(2, 300) for _ in range(n)] for n in (5, 33, 70, 12, 2, 48)]
    runs = {}
    for eager in (True, False):
        # 64-token steps: the window pool (twice what 8 windows and one step hold) is then smaller than
        # full-length caches, so the engine uses it
        llm = LLM(mxfp4, dtype="float32", block_size=BLOCK, max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=64, gpu_memory_utilization=0.3, enforce_eager=eager)
        runner = llm.llm_engine.runner
        assert runner.kv_window == WINDOW and (runner.graphs is None) == eager
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        runs[eager] = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                    params, use_tqdm=False)]
        del llm
    assert runs[True] == runs[False]
    hf = AutoModelForCausalLM.from_pretrained(mxfp4, dtype=torch.float32,
                                              quantization_config=Mxfp4Config(dequantize=True)).float().eval()
    assert runs[False] == _hf_greedy(hf, prompts)


@pytest.mark.gpu
@pytest.mark.serial  # KV sized from free GPU memory: not beside other GPU tests
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_mxfp4_experts_on_fragments_under_cuda_graphs(tmp_path, monkeypatch):  # pragma: no cover - GPU
    """ATOM_MX_FRAG=1 (the MXFP4 experts repacked in fragment order, the checkpoint layout dropped) in a bf16 engine
    with decode graphs: greedy tokens that follow transformers' float32 model on the dequantized weights except
    across near ties (atom.testing's bf16 rule), as the checkpoint-layout kernels' do."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from atom.ops.triton_kernels import moe_swigluoai as tk
    from atom.testing import assert_bf16_greedy_close

    dense = write_tiny_gpt_oss(tmp_path / "dense")
    mxfp4 = str(tmp_path / "mxfp4")
    _quantize(dense, mxfp4)
    hf = AutoModelForCausalLM.from_pretrained(mxfp4, dtype=torch.float32,
                                              quantization_config=Mxfp4Config(dequantize=True)).float().eval()
    rng = random.Random(7)
    prompts = [[rng.randrange(2, 300) for _ in range(n)] for n in (5, 33, 70, 12, 2, 48)]
    for frag in (False, True):
        monkeypatch.setattr(tk, "MX_FRAG", frag)
        llm = LLM(mxfp4, dtype="bfloat16", block_size=BLOCK, max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=64, gpu_memory_utilization=0.3)
        experts = llm.llm_engine.runner.model.model.layers[0].mlp.experts
        assert (experts.w13_frag is not None) == frag and (experts.w13_weight.numel() == 0) == frag
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        tokens = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                               use_tqdm=False)]
        del llm
        with torch.no_grad():
            ref = [hf(torch.tensor([p + t])).logits[0, len(p) - 1:-1] for p, t in zip(prompts, tokens, strict=True)]
        assert_bf16_greedy_close(tokens, ref)
