"""Capabilities, the aiter -> triton -> torch fallback chain, and the self-check of unverified kernels.

AITER cannot run here, so the tests plant "aiter" implementations (conftest.planted_backend): failing,
numerically wrong, correct, or limited to some dtypes; the registry's own chain, self-check and
WARNINGs decide what a layer gets.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from paged_harness import PagedHarness

from atom.loader import load_model
from atom.ops import registry
from atom.ops.norm import rms_norm as torch_rms_norm
from atom.ops.registry import cuda_graph_blockers, impl_of, resolve

LOGGER = "atom.ops.registry"


pytestmark = pytest.mark.usefixtures("kernel_env_cleared")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_failing_backend_op_falls_back_with_a_warning(planted_backend, caplog):
    def broken(x, weight, eps):
        raise RuntimeError("hipErrorNoBinaryForGpu: planted failure")

    planted_backend("rms_norm", broken, verified=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fn = resolve("rms_norm", dtype=torch.float32, device="cpu")
    assert fn is torch_rms_norm
    warned = _warnings(caplog)
    assert any("op rms_norm: not using the aiter implementation" in w and "planted failure" in w
               and "falling back to triton" in w for w in warned), warned
    # triton cannot run on this machine either: the next fallback is logged with its own reason
    assert any("op rms_norm: not using the triton implementation" in w and "falling back to torch" in w
               for w in warned), warned


def test_wrong_numerics_fail_the_self_check_and_fall_back(planted_backend, caplog):
    planted_backend("rms_norm", lambda x, weight, eps: torch_rms_norm(x, weight, eps) * 1.05, verified=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve("rms_norm", dtype=torch.float32, device="cpu") is torch_rms_norm
    assert any("self-check against the torch reference failed" in w and "relative error" in w
               for w in _warnings(caplog)), _warnings(caplog)


def test_a_correct_unverified_op_passes_its_self_check_once(planted_backend, caplog):
    calls = []

    def good(x, weight, eps):
        calls.append(x.shape)
        return torch_rms_norm(x, weight, eps)

    planted_backend("rms_norm", good, verified=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(3):  # every layer of a model resolves it; one check per (op, dtype, device)
            fn = resolve("rms_norm", dtype=torch.float32, device="cpu")
    assert impl_of(fn).backend == "aiter" and len(calls) == 1
    assert not _warnings(caplog)
    assert any("passed its self-check" in r.getMessage() for r in caplog.records)


def test_verified_ops_are_checked_only_when_asked(planted_backend, monkeypatch):
    planted_backend("rms_norm", lambda x, weight, eps: torch_rms_norm(x, weight, eps) * 1.05, verified=True)
    assert impl_of(resolve("rms_norm", dtype=torch.float32, device="cpu")).backend == "aiter"
    monkeypatch.setenv("ATOM_KERNEL_SELF_CHECK", "all")
    registry.forget_resolutions()
    assert resolve("rms_norm", dtype=torch.float32, device="cpu") is torch_rms_norm
    monkeypatch.setenv("ATOM_KERNEL_SELF_CHECK", "sometimes")
    registry.forget_resolutions()
    with pytest.raises(ValueError, match="ATOM_KERNEL_SELF_CHECK='sometimes'"):
        resolve("rms_norm", dtype=torch.float32, device="cpu")


def test_the_check_compares_what_an_op_writes_in_place(planted_backend, caplog):
    from atom.ops.attention import reshape_and_cache

    def forgets_values(key, value, k_cache, v_cache, slot_mapping):
        reshape_and_cache(key, value, k_cache, v_cache.clone(), slot_mapping)  # the V write goes nowhere

    planted_backend("reshape_and_cache", forgets_values, verified=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert impl_of(resolve("reshape_and_cache", dtype=torch.float32, device="cpu")).backend == "torch"
    assert any("argument v_cache (written in place)" in w for w in _warnings(caplog)), _warnings(caplog)


def test_dtype_capability_picks_per_layer_dtype(planted_backend, caplog):
    planted_backend("silu_and_mul", lambda x: torch.nn.functional.silu(x[..., : x.shape[-1] // 2])
                    * x[..., x.shape[-1] // 2:], verified=False, dtypes={torch.bfloat16})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert impl_of(resolve("silu_and_mul", dtype=torch.float32, device="cpu")).backend == "torch"
        assert impl_of(resolve("silu_and_mul", dtype=torch.bfloat16, device="cpu")).backend == "aiter"
    assert any("it does not support torch.float32 (supports torch.bfloat16)" in w for w in _warnings(caplog))


def test_static_properties_of_a_layer_can_rule_an_implementation_out(planted_backend, caplog):
    from atom.ops.moe import fused_experts

    planted_backend("fused_experts", fused_experts, verified=False,
                    supports=lambda static: None if static.get("activation") == "silu" else "silu only")
    silu = resolve("fused_experts", dtype=torch.float32, device="cpu", static={"activation": "silu"})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        gelu = resolve("fused_experts", dtype=torch.float32, device="cpu", static={"activation": "gelu_tanh"})
    assert (impl_of(silu).backend, impl_of(gelu).backend) == ("aiter", "torch")
    assert any("(silu only)" in w for w in _warnings(caplog))


def _tiny_llama(path) -> None:
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def test_a_model_never_runs_a_kernel_that_failed_its_check(planted_backend, tmp_path):
    """Wrong numerics planted for the norm every layer uses: the model falls back and its logits are the
    reference model's, bit for bit."""
    _tiny_llama(tmp_path)
    prompt = [[3, 17, 5, 44, 9, 1]]

    def logits():
        model, _ = load_model(str(tmp_path), dtype="float32", progress=False)
        harness = PagedHarness(model, num_blocks=8)
        return model, harness.step(prompt, harness.add(1))

    reference_model, reference = logits()
    planted_backend("fused_add_rms_norm", lambda x, r, w, eps: (x, x + r), verified=False)
    model, got = logits()
    assert {impl_of(m._add_norm).backend for m in model.modules() if hasattr(m, "_add_norm")} == {"torch"}
    assert torch.equal(got, reference)


def test_cuda_graph_blockers_name_the_host_syncing_implementations(tmp_path):
    _tiny_llama(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="float32", progress=False)  # CPU: the torch references
    assert sorted(cuda_graph_blockers(model)) == ["paged_attention (torch)", "qk_norm_rope_cache (torch)",
                                                  "reshape_and_cache (torch)"]
    used = {(i.op, i.backend) for i in registry.resolved_impls(model)}
    assert {("rms_norm", "torch"), ("fused_add_rms_norm", "torch"), ("silu_and_mul", "torch"),
            ("rotary_embedding", "torch")} <= used


def test_meta_device_builds_skip_the_check_and_are_not_cached(planted_backend):
    planted_backend("rms_norm", lambda x, weight, eps: torch_rms_norm(x, weight, eps) * 1.05, verified=False)
    with torch.device("meta"):
        assert impl_of(resolve("rms_norm", dtype=torch.float32)).backend == "aiter"  # never runs
    assert resolve("rms_norm", dtype=torch.float32, device="cpu") is torch_rms_norm


def test_every_op_example_runs_on_its_reference_and_agrees_with_itself():
    """The self-check inputs of every op: the reference runs on them and passes against itself."""
    from atom.ops.self_check import self_check

    for op in registry._OP_FAMILY:
        opdef = registry.op_def(op)
        assert opdef.example is not None, f"{op} has no self-check inputs"
        ref = registry.implementation(op, "torch")
        for dtype in (torch.float32, torch.bfloat16):
            assert self_check(opdef, ref, ref, ref.fn, dtype, torch.device("cpu"), {}) is None, (op, dtype)
