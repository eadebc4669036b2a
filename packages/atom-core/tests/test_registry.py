"""Kernel backend selection: ATOM_KERNEL_BACKEND / ATOM_KERNEL_OVERRIDES, and what happens on CPU."""

from __future__ import annotations

import pytest
import torch

from atom import platform
from atom.ops import registry
from atom.ops.norm import rms_norm as torch_rms_norm
from atom.ops.registry import available_impls, backend_for, resolve

ON_ROCM = platform.device_kind() == "rocm"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("ATOM_KERNEL_BACKEND", raising=False)
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)


@pytest.mark.parametrize("value", ["torch", " TORCH ", "Torch", "auto", ""])
def test_backend_env_is_parsed_case_and_space_insensitively(monkeypatch, value):
    if platform.device_kind() != "cpu" and value in ("auto", ""):
        pytest.skip("auto picks a GPU backend here")
    monkeypatch.setenv("ATOM_KERNEL_BACKEND", value)
    assert platform.kernel_backend() == "torch"
    assert resolve("rms_norm") is torch_rms_norm


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "cudnn")
    with pytest.raises(ValueError, match=r"unknown kernel backend 'cudnn'.*torch, triton, aiter or auto"):
        resolve("rms_norm")


@pytest.mark.skipif(ON_ROCM, reason="checks the non-ROCm answer")
def test_aiter_off_rocm_is_unavailable_with_a_reason(monkeypatch):
    ok, reason = platform.backend_status("aiter")
    assert not ok
    assert "ROCm" in reason and platform.device_kind() in reason
    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "aiter")
    with pytest.raises(RuntimeError, match="ATOM_KERNEL_BACKEND=aiter is not usable here: AITER needs a ROCm GPU"):
        resolve("rms_norm")
    assert "aiter" not in available_impls("rms_norm")


@pytest.mark.skipif(ON_ROCM, reason="checks the non-ROCm answer")
def test_explicit_aiter_request_off_rocm_is_refused():
    with pytest.raises(RuntimeError, match="AITER needs a ROCm GPU"):
        resolve("rms_norm", "aiter")


def test_overrides_parse_per_op(monkeypatch):
    monkeypatch.setenv("ATOM_KERNEL_OVERRIDES", " rms_norm = torch ,paged_attention=torch,, ")
    assert registry._overrides() == {"rms_norm": "torch", "paged_attention": "torch"}
    assert backend_for("rms_norm") == "torch"
    assert resolve("rms_norm") is torch_rms_norm


@pytest.mark.parametrize("spec,error", [
    ("rms_norm", r"'rms_norm' is not of the form op=backend"),
    ("rms_nrom=torch", r"unknown op 'rms_nrom'.*fused_add_rms_norm.*rms_norm"),
])
def test_malformed_overrides_are_clear_errors(monkeypatch, spec, error):
    monkeypatch.setenv("ATOM_KERNEL_OVERRIDES", spec)
    with pytest.raises(ValueError, match=error):
        resolve("rms_norm")


def test_override_with_unknown_backend_names_the_op(monkeypatch):
    monkeypatch.setenv("ATOM_KERNEL_OVERRIDES", "silu_and_mul=fastest")
    with pytest.raises(ValueError, match="unknown kernel backend 'fastest'"):
        resolve("silu_and_mul")
    assert resolve("rms_norm", device="cpu") is torch_rms_norm  # other ops keep the default


@pytest.mark.skipif(ON_ROCM, reason="checks the non-ROCm answer")
def test_override_to_unavailable_backend_names_the_op(monkeypatch):
    monkeypatch.setenv("ATOM_KERNEL_OVERRIDES", "paged_attention=aiter")
    with pytest.raises(RuntimeError, match="'aiter' requested for op 'paged_attention' is not usable here"):
        resolve("paged_attention")


def test_every_op_has_a_torch_reference():
    for op in registry._OP_FAMILY:
        assert "torch" in available_impls(op)
        assert callable(resolve(op, "torch"))


# The aiter implementations checked against the torch references. They only run where amd-aiter imports
# (ROCm); everywhere else they are skipped with the platform's reason, never faked.
_AITER_OK, _AITER_REASON = platform.backend_status("aiter")


@pytest.mark.skipif(not _AITER_OK, reason=f"aiter unavailable: {_AITER_REASON}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aiter_norm_and_activation_match_torch(dtype):  # pragma: no cover - needs ROCm
    dev = platform.default_device()
    x = torch.randn(37, 256, dtype=dtype, device=dev)
    res = torch.randn_like(x)
    w = torch.randn(256, dtype=dtype, device=dev)
    for op, args in [("rms_norm", (x, w, 1e-6)), ("fused_add_rms_norm", (x, res, w, 1e-6)),
                     ("silu_and_mul", (x,)), ("gelu_tanh_and_mul", (x,))]:
        if "aiter" not in available_impls(op):
            continue
        ref = resolve(op, "torch")(*[a.clone() if torch.is_tensor(a) else a for a in args])
        out = resolve(op, "aiter")(*[a.clone() if torch.is_tensor(a) else a for a in args])
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not _AITER_OK, reason=f"aiter unavailable: {_AITER_REASON}")
def test_aiter_rope_and_topk_match_torch():  # pragma: no cover - needs ROCm
    dev = platform.default_device()
    head_dim, n = 128, 29
    positions = torch.randint(0, 512, (n,), device=dev)
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=dev).float() / head_dim)
    ang = torch.arange(512, device=dev).float()[:, None] * inv
    cos_sin = torch.cat((ang.cos(), ang.sin()), -1)
    q = torch.randn(n, 8 * head_dim, dtype=torch.bfloat16, device=dev)
    k = torch.randn(n, 2 * head_dim, dtype=torch.bfloat16, device=dev)
    for neox in (True, False):
        ref = resolve("rotary_embedding", "torch")(positions, q.clone(), k.clone(), head_dim, cos_sin, neox)
        out = resolve("rotary_embedding", "aiter")(positions, q.clone(), k.clone(), head_dim, cos_sin, neox)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    logits = torch.randn(n, 16, dtype=torch.bfloat16, device=dev)
    for renorm in (True, False):
        w_ref, i_ref = resolve("moe_topk_softmax", "torch")(logits, 4, renorm)
        w, i = resolve("moe_topk_softmax", "aiter")(logits, 4, renorm)
        torch.testing.assert_close(w.float().sort(-1).values, w_ref.sort(-1).values, rtol=1e-2, atol=1e-2)
        assert torch.equal(i.long().sort(-1).values, i_ref.sort(-1).values)


def _aiter_wrappers() -> dict[str, "ast.FunctionDef"]:
    """@register(op, "aiter") functions of atom/ops/aiter_bindings.py, read without importing aiter."""
    import ast
    import importlib.util

    source = open(importlib.util.find_spec("atom.ops.aiter_bindings").origin).read()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "register"
                        and [getattr(a, "value", None) for a in dec.args][1:] == ["aiter"]):
                    found[dec.args[0].value] = node
    return found


def test_aiter_bindings_register_known_ops_with_the_reference_signature():
    import inspect

    wrappers = _aiter_wrappers()
    assert {"rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "gelu_tanh_and_mul",
            "moe_topk_softmax", "fused_experts", "reshape_and_cache", "paged_attention", "moe_grouped_topk",
            "fp8_linear", "fp8_fused_experts"} <= set(wrappers)
    for op, fn in wrappers.items():
        assert op in registry._OP_FAMILY, f"aiter binding for unknown op {op!r}"
        ref = inspect.signature(resolve(op, "torch"))
        names = [a.arg for a in fn.args.args]
        assert names == list(ref.parameters), f"{op}: aiter wrapper takes {names}, reference {list(ref.parameters)}"
        assert len(fn.args.defaults) == sum(p.default is not p.empty for p in ref.parameters.values()), op


@pytest.mark.skipif(not _AITER_OK, reason=f"aiter unavailable: {_AITER_REASON}")
@pytest.mark.parametrize("q_lens,head_dim,window", [([1, 1, 1], 128, None), ([1, 1, 1], 64, 32),
                                                    ([5, 1, 17], 128, None), ([5, 3, 17], 64, 16)])
def test_aiter_paged_attention_matches_torch(q_lens, head_dim, window):  # pragma: no cover - needs ROCm
    dev, dtype = platform.default_device(), torch.bfloat16
    ctx = [q + n for q, n in zip(q_lens, (40, 300, 7))]
    block_size, heads, kv_heads = 16, 8, 2
    blocks = [-(-n // block_size) for n in ctx]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(ctx), max(blocks), dtype=torch.int32)
    for b, nb in enumerate(blocks):
        tables[b, :nb] = torch.tensor([perm.pop() for _ in range(nb)])
    tables = tables.to(dev)
    q = torch.randn(sum(q_lens), heads, head_dim, dtype=dtype, device=dev)
    qsl = torch.tensor([0] + q_lens, device=dev).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
    args = (q, k_cache, v_cache, tables, qsl, seq_lens, head_dim**-0.5, window, None, max(q_lens), max(ctx))
    ref = resolve("paged_attention", "torch")(*args)
    out = resolve("paged_attention", "aiter")(*args)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not _AITER_OK, reason=f"aiter unavailable: {_AITER_REASON}")
def test_aiter_cache_write_and_fused_experts_match_torch():  # pragma: no cover - needs ROCm
    dev, dtype = platform.default_device(), torch.bfloat16
    k_ref = torch.randn(8, 16, 2, 64, dtype=dtype, device=dev)
    v_ref = torch.randn_like(k_ref)
    k_out, v_out = k_ref.clone(), v_ref.clone()
    slots = torch.randperm(8 * 16, device=dev)[:20]
    slots[4] = -1
    key, value = torch.randn(20, 2, 64, dtype=dtype, device=dev), torch.randn(20, 2, 64, dtype=dtype, device=dev)
    resolve("reshape_and_cache", "torch")(key, value, k_ref, v_ref, slots)
    resolve("reshape_and_cache", "aiter")(key, value, k_out, v_out, slots)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)

    tokens, experts, hidden, inter, top_k = 33, 8, 256, 128, 2
    x = torch.randn(tokens, hidden, dtype=dtype, device=dev)
    w13 = torch.randn(experts, 2 * inter, hidden, dtype=dtype, device=dev) / 16
    w2 = torch.randn(experts, hidden, inter, dtype=dtype, device=dev) / 16
    weights, ids = resolve("moe_topk_softmax", "torch")(torch.randn(tokens, experts, device=dev), top_k, True)
    ref = resolve("fused_experts", "torch")(x, w13, w2, weights, ids)
    shuffled = registry.implementation("fused_experts", "aiter").prepare_weights(w13, w2)  # as layers do after loading
    out = resolve("fused_experts", "aiter")(x, *shuffled, weights, ids)
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(not _AITER_OK, reason=f"aiter unavailable: {_AITER_REASON}")
@pytest.mark.parametrize("args", [("bias", 6, 8, 4, "sigmoid", "top2_sum", True, 2.5),  # V3 / GLM
                                  (None, 6, 8, 3, "softmax", "max", False, 1.0)])  # V2 group_limited_greedy
def test_aiter_grouped_topk_matches_torch(args):  # pragma: no cover - needs ROCm
    bias, *rest = args
    logits = torch.randn(37, 64, device="cuda", dtype=torch.float32)
    corr = 0.1 * torch.randn(64, device="cuda") if bias else None
    w, ids = resolve("moe_grouped_topk", "aiter")(logits, corr, *rest)
    rw, rids = resolve("moe_grouped_topk", "torch")(logits, corr, *rest)
    ids_s, order = ids.sort(-1)
    rids_s, rorder = rids.sort(-1)
    assert torch.equal(ids_s, rids_s)
    torch.testing.assert_close(w.gather(1, order), rw.gather(1, rorder), rtol=1e-5, atol=1e-6)
