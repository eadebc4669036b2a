"""Offline vllm.LLM: ATOM's classes are used, and their greedy tokens equal vLLM's built-in models'."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints_vllm import ARCHS, PROMPTS

VLLM_CLASS = {
    "llama": "vllm.model_executor.models.llama.LlamaForCausalLM",
    "qwen3": "vllm.model_executor.models.qwen3.Qwen3ForCausalLM",
    "qwen3_moe": "vllm.model_executor.models.qwen3_moe.Qwen3MoeForCausalLM",
}
ATOM_CLASS = {
    "llama": "atom_vllm.models.LlamaForCausalLM",
    "qwen3": "atom_vllm.models.Qwen3ForCausalLM",
    "qwen3_moe": "atom_vllm.models.Qwen3MoeForCausalLM",
}
pytestmark = pytest.mark.slow
ONE_GPU = torch.cuda.is_available() and torch.cuda.device_count() < 2  # no TP=2 run (conftest.py)


@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_instantiates_atom_class(arch, checkpoints, offline_runs):
    assert offline_runs["atom"]["results"][checkpoints[arch]]["model_class"] == [ATOM_CLASS[arch]]


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_flag_gives_vllm_builtin_class(arch, checkpoints, offline_runs):
    assert offline_runs["builtin"]["results"][checkpoints[arch]]["model_class"] == [VLLM_CLASS[arch]]


def _tokens(run, spec):
    tokens = run["results"][spec]["tokens"]
    assert len(tokens) == len(PROMPTS) and all(len(t) == 12 for t in tokens)
    return tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_vllm_builtin(arch, checkpoints, offline_runs):
    path = checkpoints[arch]
    assert _tokens(offline_runs["atom"], path) == _tokens(offline_runs["builtin"], path)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_compiled_greedy_tokens_match_vllm_builtin(arch, checkpoints, offline_runs):
    path = checkpoints[arch]
    assert _tokens(offline_runs["atom"], path + "@compile") == _tokens(offline_runs["builtin"], path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the eager-backend line is vLLM's CPU CI mode "
                    "(VLLM_CPU_CI_ENV); on a GPU Inductor compiles, and the compiled runs' tokens are "
                    "checked above")
def test_compile_traces_dense_and_moe_backbones(offline_runs):
    log = offline_runs["atom"]["log"]
    # vLLM says this once per model it compiles (Dynamo with the eager backend on CPU CI): both the dense and
    # the MoE model, whose torch-reference experts run as ATOM's custom op inside the graph.
    assert log.count("Detected eager backend, disabling AOT compile") == 2


def test_tensor_parallel_2_matches_vllm_builtin(checkpoints, offline_runs):
    path = checkpoints["qwen3_moe"]
    if ONE_GPU:
        pytest.skip("TP=2 needs two GPUs (conftest.py runs it on CPU or on two GPUs)")
    run = offline_runs["atom"]["results"][path + "@tp2"]
    assert run["model_class"] == [ATOM_CLASS["qwen3_moe"]] * 2
    assert _tokens(offline_runs["atom"], path + "@tp2") == _tokens(offline_runs["builtin"], path)


def test_atom_build_logged_and_disabled_run_silent(offline_runs):
    tp = 1 if ONE_GPU else 2
    assert f"ATOM built atom_vllm.models.Qwen3MoeForCausalLM (TP 1/{tp}" in offline_runs["atom"]["log"]
    assert "ATOM built" not in offline_runs["builtin"]["log"]
