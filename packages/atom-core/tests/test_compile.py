"""ATOM's kernels as torch.library custom ops: torch.compile traces models and ops without graph breaks.

On CPU the torch references that read tensors on the host (the MoE expert loop, paged attention, the
KV-cache writes) are the custom ops; Triton's are checked under the interpreter in test_triton_compile.py.
On a GPU, Inductor compiles a model over the Triton custom ops (marked gpu).
"""

from __future__ import annotations

import pytest
import torch
from compile_checks import (VARIANTS, check_custom_op, compiled_model_logits, opaque_ops, write_tiny_deepseek_v3,
                            write_tiny_qwen3_moe)
from gpt_oss_checkpoint import write_dense, write_mxfp4

from atom.ops import registry


@pytest.fixture(autouse=True)
def torch_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)
    if not torch.cuda.is_available():
        monkeypatch.setenv("ATOM_KERNEL_BACKEND", "torch")


def test_the_host_reading_references_are_custom_ops():
    assert set(opaque_ops("torch")) == {"fused_experts", "fused_experts_swigluoai", "fp8_fused_experts",
                                        "paged_attention", "reshape_and_cache", "qk_norm_rope_cache",
                                        "mla_cache_write", "mla_norm_rope_cache", "mla_prefill"}


@pytest.mark.parametrize("op", opaque_ops("torch"))
def test_torch_reference_custom_op(op):
    check_custom_op(op, "torch", "cpu")


@pytest.mark.parametrize("op,static", VARIANTS, ids=[f"{op}-{'-'.join(s)}" for op, s in VARIANTS])
def test_torch_reference_custom_op_with_optional_arguments(op, static):
    """Attention sinks (over an FP8 KV cache too) and MXFP4 scales: optional tensor arguments of the schema, set."""
    check_custom_op(op, "torch", "cpu", static=static)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU torch references")
@pytest.mark.parametrize("experts", ["dense", "mxfp4"])
def test_gpt_oss_compiles_in_one_graph_on_the_torch_references(experts, tmp_path):
    """Sinks, windows and the swigluoai experts (MXFP4 too) trace without a graph break."""
    write_dense(tmp_path / "dense")
    if experts == "mxfp4":
        write_mxfp4(tmp_path / "dense", tmp_path / "mxfp4")
    eager, compiled, model = compiled_model_logits(tmp_path / experts, "cpu", "aot_eager", decode_steps=2)
    assert {i.op for i in registry.resolved_impls(model)} >= {"fused_experts_swigluoai", "paged_attention"}
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["reshape_and_cache", "paged_attention", "qk_norm_rope_cache",
                                "mla_cache_write", "mla_norm_rope_cache", "mla_prefill"])
def test_torch_reference_custom_op_over_an_fp8_kv_cache(op):
    """The schemas carry the optional k_scale / v_scale (MLA: kv_scale); fakes and compiled calls match eager
    on FP8 caches."""
    check_custom_op(op, "torch", "cpu", static={"kv_cache_dtype": torch.float8_e4m3fn})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU torch references (the GPU test below covers GPUs)")
def test_moe_model_compiles_in_one_graph_on_the_torch_references(tmp_path):
    """Before the custom ops, the MoE loop's .tolist() broke the graph (vLLM ran such models eagerly)."""
    write_tiny_qwen3_moe(tmp_path)
    eager, compiled, model = compiled_model_logits(tmp_path, "cpu", "aot_eager")
    assert {i.backend for i in registry.resolved_impls(model)} == {"torch"}
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU torch references (the GPU test below covers GPUs)")
def test_deepseek_model_compiles_in_one_graph_on_the_torch_references(tmp_path):
    """MLA (latent cache write, expanded prefill over the cache, absorbed decode), grouped routing and the
    experts: one graph, as vLLM's compile of the DeepSeek backbone needs."""
    write_tiny_deepseek_v3(tmp_path)
    eager, compiled, model = compiled_model_logits(tmp_path, "cpu", "aot_eager", decode_steps=2)
    assert {i.backend for i in registry.resolved_impls(model)} == {"torch"}
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_inductor_compiles_a_model_over_the_triton_custom_ops(tmp_path):  # pragma: no cover - GPU
    write_tiny_qwen3_moe(tmp_path)
    eager, compiled, model = compiled_model_logits(tmp_path, "cuda", "inductor", decode_steps=3)
    assert {i.backend for i in registry.resolved_impls(model)} == {"triton"}
    assert registry.cuda_graph_blockers(model) == []
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("op", opaque_ops("triton") if torch.cuda.is_available() else [])
def test_inductor_compiles_each_triton_custom_op(op):  # pragma: no cover - GPU
    check_custom_op(op, "triton", "cuda", dtype=torch.bfloat16, compile_backend="inductor")
