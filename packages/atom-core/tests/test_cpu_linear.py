"""atom.ops.cpu_linear: CPU linear layers through a oneDNN-packed copy of the weight give F.linear's results,
and a weight (re)load drops the packed copy so it never serves stale weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atom.ops import cpu_linear
from atom.quantization.base import process_weights_after_loading

pytestmark = pytest.mark.skipif(not cpu_linear.enabled(), reason="torch built without mkldnn")
ONEDNN_BF16 = torch.bfloat16 in cpu_linear._ONEDNN_DTYPES
needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="this CPU's oneDNN has no bf16 linear (no AVX512)")


def test_onednn_dtypes_follow_the_cpu():
    """The dtypes packed are those torch's oneDNN runs on this CPU (bf16: AVX512 or AVX-NE-CONVERT)."""
    assert ONEDNN_BF16 == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (torch.float16 in cpu_linear._ONEDNN_DTYPES) == torch.ops.mkldnn._is_mkldnn_fp16_supported()


def test_a_cpu_without_onednn_bf16_keeps_f_linear(monkeypatch):
    """On an AVX2-only CPU `_reorder_linear_weight` raises for bf16: such weights keep F.linear (same results, no
    packed copy), eager and compiled, instead of failing the forward."""
    monkeypatch.setattr(cpu_linear, "_ONEDNN_DTYPES", ())
    layer = nn.Linear(96, 160).to(torch.bfloat16)
    x = torch.randn(3, 96).to(torch.bfloat16)
    want = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(cpu_linear.linear(x, layer.weight, layer.bias, layer), want)
    assert not cpu_linear.has_packed_copy(layer.weight)
    out, ops = _compiled_ops(layer, x)
    assert "atom.cpu_packed_linear" not in ops and torch.equal(out, want)


@needs_onednn_bf16
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 3, 96)])
def test_packed_linear_matches_f_linear_bf16(shape):
    gen = torch.Generator().manual_seed(0)
    owner = nn.Module()
    w = torch.randn(160, 96, generator=gen).to(torch.bfloat16)
    b = torch.randn(160, generator=gen).to(torch.bfloat16)
    x = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    out = cpu_linear.linear(x, w, b, owner)
    assert cpu_linear.has_packed_copy(w)  # the packed path ran
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=0, atol=0)


def test_float32_keeps_f_linear():
    owner = nn.Module()
    w, x = torch.randn(32, 16), torch.randn(4, 16)
    assert torch.equal(cpu_linear.linear(x, w, None, owner), F.linear(x, w))
    assert not cpu_linear.has_packed_copy(w)


@needs_onednn_bf16
def test_reload_drops_the_packed_weight():
    model = nn.Sequential(nn.Linear(16, 8, bias=False)).to(torch.bfloat16)
    layer = model[0]
    x = torch.randn(2, 16).to(torch.bfloat16)
    cpu_linear.linear(x, layer.weight, None, layer)
    layer.weight.data.copy_(torch.randn(8, 16))  # new weights in place (same storage)
    process_weights_after_loading(model)
    torch.testing.assert_close(cpu_linear.linear(x, layer.weight, None, layer), F.linear(x, layer.weight),
                               rtol=0, atol=0)


@needs_onednn_bf16
def test_compiled_linear_keeps_the_packed_weight():
    """Under torch.compile the packed GEMM is the custom op atom::cpu_packed_linear (Inductor cannot hold the
    packed tensor), fed the parameter itself, with the eager packed results."""
    layer = nn.Linear(96, 160).to(torch.bfloat16)
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    fn = torch.compile(lambda x: cpu_linear.linear(x, layer.weight, layer.bias, layer).relu(), backend=backend,
                       fullgraph=True)
    x = torch.randn(5, 96).to(torch.bfloat16)
    with torch.inference_mode():
        out = fn(x)
    assert "atom.cpu_packed_linear" in ops
    assert cpu_linear.has_packed_copy(layer.weight)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias).relu(), rtol=0, atol=0)


def _compiled_ops(layer, x):
    """(output, call_function targets) of `layer` through cpu_linear.linear under torch.compile."""
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    fn = torch.compile(lambda x: cpu_linear.linear(x, layer.weight, layer.bias, layer), backend=backend,
                       fullgraph=True)
    with torch.inference_mode():
        return fn(x), ops


def test_host_packer_serves_the_linears_and_can_be_taken_back():
    """A host's packer (atom-vllm hands vLLM's CPU GEMMs in) packs each 16-bit weight once and serves every call,
    eager and compiled; attached to its layer, a compiled forward traces the host's ops inline instead of the
    opaque atom::cpu_packed_linear; without the packer torch's oneDNN op serves again."""
    packed: list[torch.Tensor] = []

    def packer(weight):  # a host GEMM: float32 accumulation, rounded once, as oneDNN's
        packed.append(weight)
        return lambda x, bias: F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    layer = nn.Linear(96, 160).to(torch.bfloat16)
    x = torch.randn(3, 96).to(torch.bfloat16)
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16)
    cpu_linear.set_host_packer(packer, "test")
    try:
        assert cpu_linear.host_packer_name() == "test"
        assert torch.equal(cpu_linear.linear(x, layer.weight, layer.bias, layer), want)
        assert torch.equal(cpu_linear.linear(x, layer.weight, layer.bias, layer), want)
        out, ops = _compiled_ops(layer, x)
        assert "atom.cpu_packed_linear" in ops and torch.equal(out, want)
        assert cpu_linear.attach(layer, layer.weight)
        out, ops = _compiled_ops(layer, x)
        assert "atom.cpu_packed_linear" not in ops and torch.equal(out, want)
        assert [p.data_ptr() for p in packed] == [layer.weight.data_ptr()]  # one pack for every call
    finally:
        cpu_linear.set_host_packer(None)
    assert cpu_linear.host_packer_name() == ""
    process_weights_after_loading(layer)  # drops the host's copy and the attached GEMM
    assert not cpu_linear.has_packed_copy(layer.weight) and not cpu_linear.attach(layer, layer.weight)
    torch.testing.assert_close(cpu_linear.linear(x, layer.weight, layer.bias, layer),
                               F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    _, ops = _compiled_ops(layer, x)
    assert ("atom.cpu_packed_linear" in ops) == ONEDNN_BF16 and len(packed) == 1
