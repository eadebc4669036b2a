"""FP8 in atom-server's engine (CPU): `LLM(quantization="fp8")` on a float checkpoint, FP8 checkpoints
auto-detected, `LLM(kv_cache_dtype="fp8")` doubling the KV blocks of a bf16 model, and bad FP8 inputs named.

The numerics of each format against transformers are atom-core's (tests/test_fp8_models.py,
tests/test_fp8_kv_cache.py); here the engine's plumbing: the scheme and the cache dtype reach the runner, the
block count follows the spec bytes, generation runs through the scheduler, and greedy tokens equal ATOM's own
FP8 model run outside the engine (the same weights, the same reference ops).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tiny_checkpoint import write_tiny_llama

from atom.layers.attention import PagedAttention
from atom.quantization.fp8 import Fp8LinearMethod
from atom_server import LLM, SamplingParams

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import quantize_fp8  # noqa: E402

BLOCK = 4
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # the tiny llama
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 9, 2, 77, 3, 14, 8]}, {"prompt_token_ids": [4, 4, 60, 1, 2]}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_fp8_kv_cache_doubles_the_blocks_of_a_bf16_model(ckpt):
    bf16_block = LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 2
    budget = 40 * bf16_block
    args = dict(dtype="bfloat16", block_size=BLOCK, max_model_len=64, kv_cache_memory_bytes=budget, device="cpu")
    plain = LLM(ckpt, **args)
    fp8 = LLM(ckpt, kv_cache_dtype="fp8", **args)
    assert plain.llm_engine.runner.num_blocks == 40
    assert fp8.llm_engine.runner.num_blocks == 80
    assert fp8.llm_engine.kv_capacity_tokens == 2 * plain.llm_engine.kv_capacity_tokens
    caches = fp8.llm_engine.runner.kv_caches
    assert {c.k.dtype for c in caches} == {torch.float8_e4m3fn} and all(float(c.k_scale) == 1.0 for c in caches)
    for out in fp8.generate(PROMPTS, GREEDY, use_tqdm=False):
        assert len(out.outputs[0].token_ids) == 8


def test_quantization_fp8_on_a_float_checkpoint_matches_the_fp8_model(ckpt, tmp_path):
    """--quantization fp8 quantizes at load time; the engine's greedy tokens equal ATOM's FP8 model driven
    directly (paged harness, teacher-forced with the engine's tokens), and the same weights written as a
    compressed-tensors checkpoint (auto-detected) give the same tokens."""
    online = LLM(ckpt, quantization="fp8", dtype="float32", block_size=BLOCK, max_model_len=64, device="cpu",
                 enable_prefix_caching=False)
    runner = online.llm_engine.runner
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.quant_method, Fp8LinearMethod) and qkv.weight.dtype == torch.float8_e4m3fn
    got = _tokens(online.generate(PROMPTS, GREEDY, use_tqdm=False))

    fp8_dir = tmp_path / "ct"
    quantize_fp8.quantize_checkpoint(ckpt, str(fp8_dir), "compressed-tensors")
    stored = LLM(str(fp8_dir), dtype="float32", block_size=BLOCK, max_model_len=64, device="cpu")
    assert _tokens(stored.generate(PROMPTS, GREEDY, use_tqdm=False)) == got

    from atom.loader import load_model

    sys.path.insert(0, os.path.join(ROOT, "packages", "atom-core", "tests"))
    from paged_harness import PagedHarness

    model, _ = load_model(ckpt, dtype="float32", quantization="fp8", progress=False)
    harness = PagedHarness(model, num_blocks=32, block_size=BLOCK)
    for prompt, tokens in zip(PROMPTS, got):
        seq = harness.add(1)
        logits = [harness.step([prompt["prompt_token_ids"]], seq)]
        for t in tokens[:-1]:
            logits.append(harness.step([[t]], seq))
        assert torch.cat(logits).argmax(-1).tolist() == tokens


def test_bad_fp8_arguments_and_checkpoints_are_named(ckpt, tmp_path):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3 .*e4m3"):
        LLM(ckpt, kv_cache_dtype="fp8_e5m2", device="cpu")
    with pytest.raises(ValueError, match="quantization must be one of compressed-tensors, fp8"):
        LLM(ckpt, quantization="awq", device="cpu")
    fp8_dir = tmp_path / "ct"
    quantize_fp8.quantize_checkpoint(ckpt, str(fp8_dir), "compressed-tensors")
    with pytest.raises(ValueError, match="--quantization fp8 does not match the checkpoint's "
                                         "quantization_config.quant_method 'compressed-tensors'"):
        LLM(str(fp8_dir), quantization="fp8", device="cpu")


def test_checkpoint_kv_scales_reach_the_engine_cache(ckpt, tmp_path):
    fp8_dir = tmp_path / "ct_kv"
    quantize_fp8.quantize_checkpoint(ckpt, str(fp8_dir), "compressed-tensors", kv_cache_scales=True)
    llm = LLM(str(fp8_dir), dtype="float32", block_size=BLOCK, max_model_len=64, device="cpu")  # auto -> fp8
    runner = llm.llm_engine.runner
    layers = sorted((m for m in runner.model.modules() if isinstance(m, PagedAttention)),
                    key=lambda m: m.spec.layer_idx)
    assert [float(c.k_scale) for c in runner.kv_caches] == pytest.approx([m.kv_cache_spec.k_scale for m in layers])
    assert all(float(c.k_scale) != 1.0 and c.k.dtype == torch.float8_e4m3fn for c in runner.kv_caches)
    assert len(llm.generate(PROMPTS, GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


def _serve(*args: str) -> subprocess.CompletedProcess:
    from server_harness import free_port

    return subprocess.run([sys.executable, "-m", "atom_server", "serve", *args, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags,needle", [
    (["--kv-cache-dtype", "fp8_e5m2"], "--kv-cache-dtype"),
    (["--quantization", "awq"], "--quantization"),
])
def test_atom_serve_bad_fp8_flags_exit_2(ckpt, flags, needle):
    out = _serve(ckpt, *flags)
    assert out.returncode == 2 and needle in out.stderr and "invalid choice" in out.stderr, out.stderr


def test_atom_serve_names_a_missing_scale_and_exits_1(ckpt, tmp_path):
    """A checkpoint missing one FP8 scale: the engine fails to start and the log names the tensor."""
    from safetensors.torch import load_file, save_file

    fp8_dir = tmp_path / "block"
    quantize_fp8.quantize_checkpoint(ckpt, str(fp8_dir), "fp8-block", (32, 32))
    file = str(fp8_dir / "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.0.self_attn.v_proj.weight_scale_inv"]
    save_file(tensors, file)
    out = _serve(str(fp8_dir), "--device", "cpu")
    log = out.stdout + out.stderr
    assert out.returncode == 1, log[-3000:]
    assert "model.layers.0.self_attn.v_proj.weight_scale_inv" in log, log[-3000:]
