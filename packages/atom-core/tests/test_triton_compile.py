"""Triton kernels as torch.library custom ops, under Triton's CPU interpreter (run this module alone with
TRITON_INTERPRET=1, like test_triton_kernels.py): opcheck of every op's fake against the real kernel, and
torch.compile(fullgraph=True) of each op and of a tiny model forward with the Triton implementations."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run this module alone with TRITON_INTERPRET=1 (Triton's CPU interpreter)",
                allow_module_level=True)

pytest.importorskip("triton")

from compile_checks import (VARIANTS, check_custom_op, compiled_model_logits, opaque_ops,  # noqa: E402
                            write_tiny_deepseek_v3, write_tiny_qwen3_moe)
from gpt_oss_checkpoint import write_dense, write_mxfp4  # noqa: E402

from atom.ops import registry  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_every_model_op_has_a_triton_custom_op():
    # sampling runs on the host side; weight quantization at load time only
    assert set(opaque_ops("triton")) == set(registry._OP_FAMILY) - {"sample", "fp8_quantize_weight"}


@pytest.mark.parametrize("op", opaque_ops("triton"))
def test_triton_custom_op(op):
    check_custom_op(op, "triton", DEVICE)


@pytest.mark.parametrize("op,static", VARIANTS, ids=[f"{op}-{'-'.join(s)}" for op, s in VARIANTS])
def test_triton_custom_op_with_optional_arguments(op, static):
    check_custom_op(op, "triton", DEVICE, static=static)


def test_triton_experts_on_fragments_as_a_custom_op():
    """The MXFP4 experts in fragment order only (ATOM_MX_FRAG: the checkpoint-layout tensors empty): the custom
    op's fake takes its output width from the bias, and compiled equals eager (Triton only; the torch reference
    refuses this call)."""
    check_custom_op("fused_experts_swigluoai", "triton", DEVICE, static={"mxfp4": True, "frag": True})


@pytest.mark.parametrize("op", ["reshape_and_cache", "paged_attention", "qk_norm_rope_cache",
                                "mla_cache_write", "mla_norm_rope_cache", "mla_decode", "mla_prefill"])
def test_triton_custom_op_over_an_fp8_kv_cache(op):
    check_custom_op(op, "triton", DEVICE, static={"kv_cache_dtype": torch.float8_e4m3fn})


def test_tiny_model_compiles_in_one_graph_over_the_triton_ops(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)
    registry.forget_resolutions()
    write_tiny_qwen3_moe(tmp_path)
    eager, compiled, model = compiled_model_logits(tmp_path, DEVICE, "aot_eager")
    assert {i.backend for i in registry.resolved_impls(model)} == {"triton"}
    assert registry.cuda_graph_blockers(model) == []  # every op it runs can be captured
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_gpt_oss_mxfp4_compiles_in_one_graph_over_the_triton_ops(tmp_path, monkeypatch):
    """Sinks + windows in the Triton attention, MXFP4 experts in the Triton MoE: one graph, capturable."""
    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)
    registry.forget_resolutions()
    write_dense(tmp_path / "dense")
    write_mxfp4(tmp_path / "dense", tmp_path / "mxfp4")
    eager, compiled, model = compiled_model_logits(tmp_path / "mxfp4", DEVICE, "aot_eager")
    assert {i.backend for i in registry.resolved_impls(model)} == {"triton"}
    assert registry.cuda_graph_blockers(model) == []
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_deepseek_model_compiles_in_one_graph_over_the_triton_ops(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)
    registry.forget_resolutions()
    write_tiny_deepseek_v3(tmp_path)
    eager, compiled, model = compiled_model_logits(tmp_path, DEVICE, "aot_eager")
    used = {(i.op, i.backend) for i in registry.resolved_impls(model)}
    assert {("mla_decode", "triton"), ("mla_prefill", "triton"), ("moe_grouped_topk", "triton")} <= used
    assert registry.cuda_graph_blockers(model) == []  # every op it runs can be captured
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
