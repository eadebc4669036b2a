"""The engine on a GPU: KV sizing from a profile run, greedy parity with transformers, seeded sampling."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoint import write_tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.serial]  # KV sized from free memory: not beside other GPU tests
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA or ROCm device", allow_module_level=True)

from atom_server import LLM, SamplingParams  # noqa: E402


def test_gpu_greedy_parity_and_profiled_kv(tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = write_tiny_llama(tmp_path)
    llm = LLM(ckpt, dtype="float32", block_size=16, max_model_len=256, gpu_memory_utilization=0.3,
              max_num_batched_tokens=64)
    eng = llm.llm_engine
    assert eng.device.type == "cuda"
    # Sized from free memory: far more than max_num_seqs * max_model_len needs, so capped there.
    assert eng.kv_capacity_tokens == 256 * 256
    prompts = [[5 + i for i in range(n)] for n in (3, 40, 17, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).cuda().eval()
    hf.generation_config.eos_token_id = None
    for p, g in zip(prompts, got):
        out = hf.generate(torch.tensor([p], device="cuda"), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                          pad_token_id=0)
        assert g == out[0, len(p):].tolist()
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": prompts[1]}, seeded, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate([{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": prompts[1]}], [params, seeded],
                     use_tqdm=False)[1].outputs[0].token_ids
    assert a == b
    stats = eng.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


@pytest.mark.parametrize("budget", [None, 40])
def test_cuda_graphs_match_eager(tmp_path, budget):
    """Decode graphs and prefill graphs (captured) against eager steps; a 40-token step budget puts prompt chunks
    beside decodes (mixed steps in the prefill graphs) and leaves 41-70-token prompts' first chunks at 40."""
    ckpt = write_tiny_llama(tmp_path)
    prompts = [{"prompt_token_ids": [7 + (i * 13) % 250 for i in range(n)]} for n in (5, 33, 70, 12, 2, 48)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    runs = {}
    for eager in (True, False):
        llm = LLM(ckpt, dtype="float32", block_size=16, max_model_len=256, max_num_seqs=8,
                  gpu_memory_utilization=0.3, enforce_eager=eager,
                  **({} if budget is None else dict(max_num_batched_tokens=budget)))
        runner = llm.llm_engine.runner
        assert (runner.graphs is None) == eager and (runner.prefill_graphs is None) == eager
        runs[eager] = llm.generate(prompts, params, use_tqdm=False)
        if not eager:
            assert sum(runner.prefill_graphs.replays.values()) > 0
    assert [o.outputs[0].token_ids for o in runs[True]] == [o.outputs[0].token_ids for o in runs[False]]
    for a, b in zip(runs[True], runs[False]):
        for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert da.keys() == db.keys() and all(abs(da[t].logprob - db[t].logprob) < 1e-3 for t in da)


def test_default_token_budget_is_vllms(tmp_path):
    """vLLM's default step budget: the offline LLM class 16384 tokens on a GPU of >= 70 GiB other than the A100,
    8192 on smaller ones; the KV sizing profiles a step of that many tokens (prompts of at most max_model_len),
    so a full step's activations fit beside the cache."""
    ckpt = write_tiny_llama(tmp_path)
    props = torch.cuda.get_device_properties(0)
    big = props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower()
    llm = LLM(ckpt, dtype="float32", block_size=16, max_model_len=256, gpu_memory_utilization=0.3)
    assert llm.llm_engine.scheduler.max_num_batched_tokens == (16384 if big else 8192)
    # the whole budget in one step: 64 prompts of 256 tokens, one new token each
    prompts = [{"prompt_token_ids": [(7 * i + j) % 100 + 1 for j in range(256 - 1)]} for i in range(64)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 1 for o in outs)


def test_one_launch_layers_on_cuda_graphs_match_the_modules(tmp_path, monkeypatch):
    """ATOM_DECODE_LAYER on (atom.layers.decode_layer): one sequence at a time, its decode steps (CUDA graphs of one
    row) run each layer as one launch; greedy tokens equal to the modules' run and logprobs within 1e-3 (float32:
    the linears' sums in another order), one prompt after the other so every step has one row."""
    from atom.layers import decode_layer as layer_mod
    from atom.ops.triton_kernels import decode_layer as kernel

    ckpt = write_tiny_llama(tmp_path)
    prompts = [{"prompt_token_ids": [7 + (i * 13) % 250 for i in range(n)]} for n in (5, 33, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    launches = []
    real = kernel.decode_layer
    monkeypatch.setattr(kernel, "decode_layer", lambda *a, **kw: (launches.append(1), real(*a, **kw))[1])
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(layer_mod, "ENABLED", on)
        llm = LLM(ckpt, dtype="float32", block_size=16, max_model_len=256, max_num_seqs=1,
                  gpu_memory_utilization=0.3)
        runs[on] = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
        assert bool(launches) == on  # captured (and warmed up) with the one-launch layers, replayed after
    assert [o.outputs[0].token_ids for o in runs[False]] == [o.outputs[0].token_ids for o in runs[True]]
    for a, b in zip(runs[False], runs[True], strict=True):
        for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert da.keys() == db.keys() and all(abs(da[t].logprob - db[t].logprob) < 1e-3 for t in da)
