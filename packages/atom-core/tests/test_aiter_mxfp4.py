"""AITER's MXFP4 experts binding (GPT-OSS: fused_experts_swigluoai on aiter's a16w4 MoE), as far as it can be
checked here.

No ROCm GPU is reachable, so `aiter` never imports here and the binding never runs (the gfx950 test at the end
skips, with the platform's reason); on ROCm the registry uses it only after its self-check against the torch
reference passes (atom.ops.self_check). What is checked on every machine:
- the build-time guard (atom.ops.aiter_support.mxfp4_experts_supports): MXFP4 only, gfx950 only, no expert
  parallelism, and the SwiGLU constants aiter's kernels fix;
- the padding the binding applies before aiter's shuffles (pad_mxfp4_experts): the padded experts dequantize to
  the original ones plus zeros, and the torch reference on padded experts and a zero-padded x gives the original
  output;
- the seam the binding stands on, through the registry's public API (an "aiter" implementation planted as in
  test_aiter_fp8.py, computing what the binding computes, with the reference in place of aiter's kernel): the
  GPT-OSS layer hands its weights, biases and scales to the implementation's prepare_weights once after loading,
  its logits stay the reference's, and the self-check rejects an implementation whose call does not read the
  layout its prepare_weights made.
"""

from __future__ import annotations

import logging

import pytest
import torch
from gpt_oss_checkpoint import CONFIG, write_dense, write_mxfp4
from test_models_parity import _atom_logits

from atom import platform
from atom.loader import load_model
from atom.ops import aiter_support, registry
from atom.ops.moe_swigluoai import fused_experts_swigluoai as reference
from atom.ops.mxfp4 import dequantize_mxfp4
from atom.ops.registry import impl_of, resolve

LOGGER = "atom.ops.registry"
GPT_OSS = {"mxfp4": True, "alpha": 1.702, "limit": 7.0}


pytestmark = pytest.mark.usefixtures("kernel_env_cleared")


def test_guard():
    ok = aiter_support.mxfp4_experts_supports
    assert ok(GPT_OSS, "gfx950") is None
    assert "dense" in ok({**GPT_OSS, "mxfp4": False}, "gfx950")
    assert "gfx942" in ok(GPT_OSS, "gfx942")  # MI300: ATOM's Triton MXFP4 kernels
    assert "expert parallelism" in ok({**GPT_OSS, "expert_parallel": True}, "gfx950")
    assert "limit 1.2" in ok({**GPT_OSS, "limit": 1.2}, "gfx950")
    assert "alpha 1.5" in ok({**GPT_OSS, "alpha": 1.5}, "gfx950")
    assert "alpha None" in ok({"mxfp4": True}, "gfx950")  # a layer that does not say: not taken


def _experts(experts=3, hidden=64, inter=96, seed=0):
    g = torch.Generator().manual_seed(seed)

    def codes(*shape):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)

    def scales(*shape):
        return torch.randint(120, 126, shape, generator=g, dtype=torch.uint8)

    return dict(w13=codes(experts, 2 * inter, hidden // 2), w2=codes(experts, hidden, inter // 2),
                w13_bias=torch.randn(experts, 2 * inter, generator=g), w2_bias=torch.randn(experts, hidden, generator=g),
                w13_scale=scales(experts, 2 * inter, hidden // 32), w2_scale=scales(experts, hidden, inter // 32))


def test_padding_keeps_the_experts():
    """H 64 -> 256 and I 96 -> 256: each of gate and up padded on its own (aiter reads w13 as gate rows, then up
    rows), every padded weight and bias 0."""
    w = _experts()
    w13, w2, b13, b2, s13, s2 = aiter_support.pad_mxfp4_experts(**w)
    assert w13.shape == (3, 512, 128) and w2.shape == (3, 256, 128) and s13.shape == (3, 512, 8)
    assert s2.shape == (3, 256, 8) and b13.shape == (3, 512) and b2.shape == (3, 256)
    assert b13.dtype == b2.dtype == torch.float32
    for e in range(3):
        dense13 = dequantize_mxfp4(w13[e], s13[e])
        want13 = dequantize_mxfp4(w["w13"][e], w["w13_scale"][e])
        for half in range(2):
            rows = dense13[half * 256:(half + 1) * 256]
            assert torch.equal(rows[:96, :64], want13[half * 96:(half + 1) * 96])
            assert not rows[96:].any() and not rows[:, 64:].any()
            assert torch.equal(b13[e, half * 256:half * 256 + 96], w["w13_bias"][e, half * 96:(half + 1) * 96])
            assert not b13[e, half * 256 + 96:(half + 1) * 256].any()
        dense2 = dequantize_mxfp4(w2[e], s2[e])
        assert torch.equal(dense2[:64, :96], dequantize_mxfp4(w["w2"][e], w["w2_scale"][e]))
        assert not dense2[64:].any() and not dense2[:, 96:].any()
        assert torch.equal(b2[e, :64], w["w2_bias"][e]) and not b2[e, 64:].any()


def test_reference_on_padded_experts_is_the_original():
    """What the binding hands aiter (padded experts, x zero-padded) computes the original experts' output in its
    first H columns and zeros beyond: padded gate / up columns are SwiGLU(0, 0) = 0."""
    w = _experts()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=g)
    ids = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(6)])
    weights = torch.softmax(torch.randn(6, 2, generator=g), dim=-1)
    want = reference(x, w["w13"], w["w2"], w["w13_bias"], w["w2_bias"], weights, ids, 1.702, 1.2,
                     w["w13_scale"], w["w2_scale"])
    w13, w2, b13, b2, s13, s2 = aiter_support.pad_mxfp4_experts(**w)
    got = reference(torch.nn.functional.pad(x, (0, 192)), w13, w2, b13, b2, weights, ids, 1.702, 1.2, s13, s2)
    torch.testing.assert_close(got[:, :64], want, rtol=1e-5, atol=1e-5)
    assert not got[:, 64:].any()


def _binding(layout_read: bool):
    """What aiter_bindings.fused_experts_swigluoai computes around aiter's kernel, with the reference in its place;
    layout_read False: a call that reads w13's rows as interleaved gate / up (the checkpoint's order), not as the
    padded gate half, then the padded up half."""

    def experts(x, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, alpha, limit, w13_scale=None,
                w2_scale=None, w13_frag=None, w2_frag=None):
        hidden = x.shape[1]
        pad = w2.shape[1] - hidden
        if not layout_read:
            half = w13.shape[1] // 2
            order = torch.cat([torch.arange(0, 2 * half, 2), torch.arange(1, 2 * half, 2)])
            w13, w13_scale, w13_bias = w13[:, order], w13_scale[:, order], w13_bias[:, order]
        out = reference(torch.nn.functional.pad(x, (0, pad)), w13, w2, w13_bias, w2_bias, topk_weights, topk_ids,
                        alpha, limit, w13_scale, w2_scale)
        return out[:, :hidden].contiguous()

    return experts


def _mxfp4_only(static):
    return None if static.get("mxfp4") else "dense experts"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    dense, mxfp4 = tmp_path_factory.mktemp("gpt_oss_dense"), tmp_path_factory.mktemp("gpt_oss_mxfp4")
    write_dense(dense)
    write_mxfp4(dense, mxfp4)
    return str(mxfp4)


PROMPTS = [[5, 9, 2, 77, 3, 14, 8], [4, 4, 60, 1, 2, 11, 90, 7, 33]]
TOKENS = [[7, 8, 9], [10, 11, 12]]


def _logits(path):
    model, _ = load_model(path, dtype="float32", progress=False)
    return model, torch.cat(_atom_logits(model, PROMPTS, TOKENS, None))


def test_layer_hands_its_experts_to_prepare_weights(planted_backend, checkpoint, monkeypatch, caplog):
    """A float32 GPT-OSS model with MXFP4 experts on a planted binding: prepare_weights runs once per layer, on the
    loaded weights, biases and scales (the layer then holds the padded tensors), the self-check passes, and the
    logits are the torch reference's."""
    monkeypatch.setenv("ATOM_KERNEL_OVERRIDES", "fused_experts_swigluoai=torch")
    _, want = _logits(checkpoint)
    calls = []

    def prepare(*tensors):
        calls.append([tuple(t.shape) for t in tensors])
        return aiter_support.pad_mxfp4_experts(*tensors)

    planted_backend("fused_experts_swigluoai", _binding(True), verified=False, supports=_mxfp4_only,
                    prepare_weights=prepare)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model, got = _logits(checkpoint)
    experts = model.model.layers[0].mlp.experts
    assert impl_of(experts.quant_method.experts).backend == "aiter", caplog.text
    h, i, e = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_local_experts"]
    loaded = [(e, 2 * i, h // 2), (e, h, i // 2), (e, 2 * i), (e, h), (e, 2 * i, h // 32), (e, h, i // 32)]
    assert calls[1:] == [loaded] * CONFIG["num_hidden_layers"]  # calls[0]: the self-check's example
    assert experts.w13_weight.shape == (e, 512, 128) and experts.w2_bias.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_self_check_rejects_a_call_that_misreads_the_padded_layout(planted_backend, caplog):
    planted_backend("fused_experts_swigluoai", _binding(False), verified=False, supports=_mxfp4_only,
                    prepare_weights=aiter_support.pad_mxfp4_experts)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        chosen = resolve("fused_experts_swigluoai", dtype=torch.float32, device="cpu", static=GPT_OSS)
    assert impl_of(chosen).backend != "aiter"
    assert any("fused_experts_swigluoai" in r.getMessage() and "relative error" in r.getMessage()
               for r in caplog.records if r.name == LOGGER), caplog.text


_AITER_OK, _AITER_REASON = platform.backend_status("aiter")


@pytest.mark.skipif(not _AITER_OK, reason=f"aiter unavailable: {_AITER_REASON}")
@pytest.mark.parametrize("tokens", [1, 33, 300])
def test_aiter_mxfp4_experts_match_torch(tokens):  # pragma: no cover - needs ROCm
    """The real binding on a gfx950 GPU against the torch reference, at sizes that need padding (H 320, I 192)."""
    from atom.ops.aiter_bindings import _gfx

    if (why := aiter_support.mxfp4_experts_supports(GPT_OSS, _gfx())) is not None:
        pytest.skip(why)
    w = {k: v.cuda() for k, v in _experts(experts=8, hidden=320, inter=192).items()}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 320, generator=g).to("cuda", torch.bfloat16)
    ids = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(tokens)]).cuda()
    weights = torch.softmax(torch.randn(tokens, 4, generator=g), dim=-1).cuda()
    b13, b2 = w["w13_bias"].bfloat16(), w["w2_bias"].bfloat16()
    want = reference(x, w["w13"], w["w2"], b13, b2, weights, ids, *aiter_support.AITER_SWIGLU, w["w13_scale"],
                     w["w2_scale"])
    impl = registry.implementation("fused_experts_swigluoai", "aiter")
    prepared = impl.prepare_weights(w["w13"], w["w2"], b13, b2, w["w13_scale"], w["w2_scale"])  # as the layer does
    w13, w2, pb13, pb2, s13, s2 = prepared
    got = resolve("fused_experts_swigluoai", "aiter")(x, w13, w2, pb13, pb2, weights, ids, *aiter_support.AITER_SWIGLU,
                                                      s13, s2)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
