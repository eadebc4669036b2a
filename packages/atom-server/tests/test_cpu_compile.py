"""The compiled CPU forward (atom_server.engine.cpu_compile): prefill, mixed and decode steps through
torch.compile (one graph per layer kind for every size and context length, called without Dynamo after the
warm-up) give transformers' float32 greedy tokens, and the same logprobs as the eager engine; --enforce-eager
and ATOM_CPU_COMPILE=0 turn it off. conftest.py runs every other test eagerly."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_checkpoint import write_tiny_gpt_oss, write_tiny_llama

from atom_server import LLM, SamplingParams

MAX_NEW = 10
BLOCK = 4


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 300) for _ in range(n)] for n in lengths]


PROMPTS = _prompts(1, [3, 17, 41, 9, 30, 5])  # prefill chunks, mixed and decode steps of 1..6 rows


def _hf_greedy(ckpt: str, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                              pad_token_id=0, eos_token_id=None)
            out.append(ids[0, len(p):].tolist())
    return out


def _llm(ckpt: str, compiled: bool, monkeypatch, **kw) -> LLM:
    monkeypatch.setenv("ATOM_CPU_COMPILE", "1" if compiled else "0")
    kw.setdefault("max_num_batched_tokens", 32)  # prefill chunks next to decoding rows
    return LLM(ckpt, dtype="float32", device="cpu", block_size=BLOCK, max_model_len=64, max_num_seqs=8,
               kv_cache_memory_bytes=1 << 20, **kw)


def _generate(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_compiled_llama_matches_transformers_and_the_eager_engine(llama, monkeypatch):
    llm = _llm(llama, True, monkeypatch)
    compiled = llm.llm_engine.runner.compiled
    assert compiled is not None and compiled._layers is not None  # graphs bound for direct calls
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=3)
    outs = _generate(llm, PROMPTS, greedy)
    assert compiled.steps["forward"] > 0 and compiled.steps["decode"] > 0  # prefill/mixed and decode steps
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(llama, PROMPTS)

    eager = _llm(llama, False, monkeypatch)
    assert eager.llm_engine.runner.compiled is None
    ref = _generate(eager, PROMPTS, greedy)
    for got, want in zip(outs, ref):  # logprobs come from the compiled step's logits
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert list(a) == list(b)
            assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-4)
    assert llm.llm_engine.stats()["num_free_blocks"] == llm.llm_engine.stats()["num_total_blocks"]


def test_enforce_eager_turns_it_off(llama, monkeypatch):
    llm = _llm(llama, True, monkeypatch, enforce_eager=True)
    assert llm.llm_engine.runner.compiled is None


def test_compiled_gpt_oss_window_pool_and_sinks(tmp_path, monkeypatch):
    """Sliding-window layers on their own window pool (window slots and tables in the compiled step), attention
    sinks, MoE experts (an opaque custom op inside the graph): transformers' greedy tokens."""
    ckpt = write_tiny_gpt_oss(tmp_path / "gpt_oss")
    prompts = _prompts(3, [3, 17, 26, 9])
    llm = _llm(ckpt, True, monkeypatch, max_num_batched_tokens=16)  # small steps: the window pool pays off
    runner = llm.llm_engine.runner
    assert runner.compiled is not None and runner.tables.windowed
    assert runner.compiled._layers is not None  # one graph per layer kind (windowed, full), bound
    outs = _generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    assert runner.compiled.steps["forward"] > 0 and runner.compiled.steps["decode"] > 0
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(ckpt, prompts)


@pytest.mark.parametrize("fmt", ["fp8-block", "compressed-tensors"])
def test_compiled_fp8_matches_the_eager_engine(tmp_path, monkeypatch, fmt):
    """FP8 linears in the compiled step (activation quantization traced, per-token-group with a partial last
    group: hidden 96 in groups of 64, as SmolLM2's 576 in groups of 128) give the eager engine's tokens and
    logprobs. Inductor miscompiled the group scales' slice back to the row width under the step's dynamic,
    size-oblivious shapes: every logit NaN (atom.ops.quant_fp8._group_of_column)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
    import quantize_fp8

    src = write_tiny_llama(tmp_path / "src", hidden_size=96, intermediate_size=160)
    ckpt = str(tmp_path / fmt)
    quantize_fp8.quantize_checkpoint(src, ckpt, fmt, (64, 64))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=3)
    compiled = _llm(ckpt, True, monkeypatch)
    assert compiled.llm_engine.runner.compiled is not None
    outs = _generate(compiled, PROMPTS, params)
    assert compiled.llm_engine.runner.compiled.steps["decode"] > 0
    ref = _generate(_llm(ckpt, False, monkeypatch), PROMPTS, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    # Inductor's fused RMSNorm sums in another order than eager: an activation within a float32 rounding of an
    # e4m3 midpoint takes the neighbouring code (one e4m3 step, 1/8 of its value), which moves a logprob by
    # ~1e-3 here (measured up to 6e-3 for 128 x 64 groups); garbage or NaN codes move them by whole nats
    worst = max(abs(x.logprob - y.logprob) for got, want in zip(outs, ref)
                for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs)
                for x, y in zip(a.values(), b.values()))
    print(f"compiled FP8 {fmt}: largest logprob difference to the eager engine {worst:.2e}")
    for got, want in zip(outs, ref):
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert list(a) == list(b)
    assert worst < 0.05


def test_no_compilers_run_eager_with_one_warning(llama, monkeypatch, tmp_path, caplog):
    """A machine without C/C++ compilers: Inductor cannot build the compiled forward, the native attention kernel
    is not built either; the engine says so in one line each and serves eagerly (transformers' tokens)."""
    import torch._inductor.config as inductor_config

    from atom.ops import cpu_native

    for name, value in (("_tried", False), ("_lib", None), ("_has_f16", False)):
        monkeypatch.setattr(cpu_native, name, value)
    monkeypatch.setenv("CC", str(tmp_path / "no-cc"))
    monkeypatch.setenv("ATOM_CACHE_DIR", str(tmp_path / "atom"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing compiled to reuse
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-c++")))
    with caplog.at_level("WARNING"):
        llm = _llm(llama, True, monkeypatch)
    assert llm.llm_engine.runner.compiled is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("compiling the CPU forward failed" in w for w in warnings), warnings
    assert any("building the native CPU kernels failed" in w for w in warnings), warnings
    assert all("\n" not in w for w in warnings)
    prompts = PROMPTS[:3]
    outs = _generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(llama, prompts)
