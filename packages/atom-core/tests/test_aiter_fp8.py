"""AITER's FP8 bindings (fp8_linear, fp8_fused_experts, FP8 KV cache), as far as they can be checked here.

No ROCm GPU is reachable, so `aiter` never imports here and its bindings never run (the ROCm tests at the end
skip, with the platform's reason). What is checked on every machine:
- without AITER the FP8 ops resolve to another implementation and nothing imports aiter;
- the build-time guards of the bindings (atom.ops.aiter_support), and that their reasons reach the
  registry's fallback WARNING;
- the self-check rejects FP8 bindings with the mistakes an AITER binding can make (activations quantized by
  AITER's amax / 240 on e4m3fnuz, e4m3fn weight bytes read as e4m3fnuz, block scales read transposed, KV
  scales dropped, a kernel that does not read the weight layout it asked for), planted through the
  registry's public API as in test_kernel_fallback.py;
- an FP8 MoE layer hands its experts to the chosen implementation's prepare_weights once after loading;
- the layout helper the AITER attention binding uses (gather_context) and the e4m3fn -> e4m3fnuz conversion
  of checkpoint weights, against torch.
"""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch
import transformers
from paged_harness import PagedHarness

from atom import platform
from atom.loader import load_model
from atom.ops import aiter_support, registry
from atom.ops import attention as ref_attention
from atom.ops import quant_fp8 as Q
from atom.ops.registry import available_impls, impl_of, resolve
from atom.ops.self_check import CheckInputs
from atom.quantization.fp8 import Fp8MoEMethod

LOGGER = "atom.ops.registry"
FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
_AITER_OK, _AITER_REASON = platform.backend_status("aiter")


pytestmark = pytest.mark.usefixtures("kernel_env_cleared")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


LINEAR = {"block_size": (128, 128), "output_size": 256, "input_size": 256, "fp8_dtype": FN}
EXPERTS = {"activation": "silu", "hidden_size": 128, "intermediate_size": 128, "block_size": None, "fp8_dtype": FN}


# ---------------------------------------------------------------- without AITER


@pytest.mark.skipif(_AITER_OK, reason="checks a machine without AITER")
@pytest.mark.parametrize("op,static", [("fp8_linear", LINEAR), ("fp8_fused_experts", EXPERTS),
                                       ("reshape_and_cache", {"kv_cache_dtype": FN}),
                                       ("paged_attention", {"kv_cache_dtype": FN})])
def test_fp8_ops_resolve_without_aiter_and_never_import_it(op, static):
    fn = resolve(op, dtype=torch.bfloat16, device="cpu", static=static)
    assert impl_of(fn).backend == "torch"
    assert "aiter" not in available_impls(op)
    assert registry.implementation(op, "aiter") is None
    # the guards live outside the bindings: importing them never imports aiter
    assert "aiter" not in sys.modules and "atom.ops.aiter_bindings" not in sys.modules


# ---------------------------------------------------------------- guards


@pytest.mark.parametrize("static,native,reason", [
    (LINEAR, FN, None),
    ({**LINEAR, "block_size": None}, FN, None),  # per channel / per tensor: aiter.gemm_a8w8
    ({**LINEAR, "fp8_dtype": FNUZ}, FNUZ, None),  # MI300: ATOM's activation quantization, aiter's GEMM
    (LINEAR, FNUZ, "weights in float8_e4m3fn (aiter's FP8 GEMMs on this GPU read float8_e4m3fnuz)"),
    ({**LINEAR, "block_size": (1, 128)}, FN, "block size [1, 128] (aiter's blockscale GEMM reads 128 x 128"),
    ({**LINEAR, "block_size": (64, 64)}, FN, "block size [64, 64]"),
])
def test_fp8_linear_guard(static, native, reason):
    got = aiter_support.fp8_linear_supports(static, native)
    assert got == reason if reason is None else reason in got


@pytest.mark.parametrize("static,native,reason", [
    (EXPERTS, FN, None),
    ({**EXPERTS, "block_size": (128, 128)}, FN, None),
    ({**EXPERTS, "intermediate_size": 96}, FN, None),  # per channel: the (16, 16) shuffle needs 32
    ({**EXPERTS, "intermediate_size": 96, "block_size": (128, 128)}, FN,
     "hidden 128 / intermediate 96 are not multiples of 128"),
    ({**EXPERTS, "intermediate_size": 48}, FN, "hidden 128 / intermediate 48 are not multiples of 32"),
    ({**EXPERTS, "block_size": (128, 64)}, FN, "block size [128, 64]"),
    ({**EXPERTS, "fp8_dtype": FNUZ}, FNUZ, "e4m3fnuz experts: aiter's fused MoE quantizes activations as amax"),
    (EXPERTS, FNUZ, "experts in float8_e4m3fn (aiter's FP8 MoE kernels on this GPU read float8_e4m3fnuz)"),
    ({**EXPERTS, "activation": "gelu_tanh"}, FN, "activation 'gelu_tanh'"),
    ({**EXPERTS, "expert_parallel": True}, FN, "expert parallelism"),
])
def test_fp8_experts_guard(static, native, reason):
    got = aiter_support.fp8_experts_supports(static, native)
    assert got == reason if reason is None else reason in got


@pytest.mark.parametrize("static,native,reason", [
    ({}, FNUZ, None),
    ({"kv_cache_dtype": torch.bfloat16}, FNUZ, None),
    ({"kv_cache_dtype": FNUZ}, FNUZ, None),
    ({"kv_cache_dtype": FN}, FN, None),
    ({"kv_cache_dtype": FN}, FNUZ, "a float8_e4m3fn KV cache (aiter's FP8 cache kernels on this GPU store "
                                   "float8_e4m3fnuz)"),
    ({"kv_cache_dtype": torch.float32}, FN, "a float32 KV cache (aiter's cache kernels take"),
])
def test_kv_cache_guards(static, native, reason):
    for guard in (aiter_support.kv_cache_supports, aiter_support.attention_supports):
        got = guard(static, native)
        assert got == reason if reason is None else reason in got
    assert "attention sinks" in aiter_support.attention_supports({**static, "has_sinks": True}, native)


def test_guard_reason_reaches_the_fallback_warning(planted_backend, caplog):
    """A layer whose merged shards were expanded to [1, 128] block scales gets another implementation, and the
    WARNING says why; a 128 x 128 layer gets the binding (here the reference itself, which passes its check)."""
    planted_backend("fp8_linear", lambda *args: Q.fp8_linear(*args), verified=False, dtypes={torch.bfloat16},
                    supports=lambda static: aiter_support.fp8_linear_supports(static, FN))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        expanded = resolve("fp8_linear", dtype=torch.bfloat16, device="cpu", static={**LINEAR, "block_size": (1, 128)})
    assert impl_of(expanded).backend == "torch"
    assert any("op fp8_linear: not using the aiter implementation (block size [1, 128]" in w
               for w in _warnings(caplog)), _warnings(caplog)
    assert impl_of(resolve("fp8_linear", dtype=torch.bfloat16, device="cpu", static=LINEAR)).backend == "aiter"


# ---------------------------------------------------------------- the self-check of FP8 bindings


def _linear_with(fmax: float | None = None, weight_as: torch.dtype | None = None, transposed_scales: bool = False):
    """An fp8_linear for 1 x 128 activation groups built from explicit steps, with one of a binding's possible
    mistakes: activation scales amax / fmax, weight bytes read as another FP8 type, block scales transposed."""

    def linear(x, weight, weight_scale, bias=None, block_size=None):
        fp8 = weight.dtype
        top = fmax or Q.fp8_max(fp8)
        groups = x.float().reshape(x.shape[0], -1, 128)
        scale = (groups.abs().amax(-1, keepdim=True) / top).clamp_min(Q.fp8_min_scale(fp8))
        xq = ((groups / scale).clamp(-top, top).to(fp8).float() * scale).reshape(x.shape)
        w = weight.view(weight_as) if weight_as is not None else weight
        s = weight_scale.t().contiguous() if transposed_scales else weight_scale
        return (xq @ Q.dequantize_weight(w, s, block_size).t()).to(x.dtype)

    return linear


@pytest.mark.parametrize("fp8,binding,passes", [
    (FNUZ, _linear_with(), True),  # ATOM's convention, computed step by step: the control
    (FNUZ, _linear_with(fmax=240.0), False),  # aiter's own quantization on MI300 (why the MoE guard refuses it)
    (FN, _linear_with(), True),
    (FN, _linear_with(weight_as=FNUZ), False),  # the e4m3fn -> e4m3fnuz conversion skipped: weights halved
    (FN, _linear_with(transposed_scales=True), False),  # [N/128, K/128] block scales read as [K/128, N/128]
], ids=["fnuz-224", "fnuz-240", "fn", "fn-bytes-as-fnuz", "scales-transposed"])
def test_self_check_judges_fp8_linear_bindings(planted_backend, caplog, fp8, binding, passes):
    planted_backend("fp8_linear", binding, verified=False, dtypes={torch.bfloat16})
    static = {**LINEAR, "fp8_dtype": fp8, "output_size": 512, "input_size": 512}  # square: transposable scales
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        chosen = impl_of(resolve("fp8_linear", dtype=torch.bfloat16, device="cpu", static=static)).backend
    assert chosen == ("aiter" if passes else "torch"), _warnings(caplog)
    if not passes:
        assert any("self-check against the torch reference failed" in w and "relative error" in w
                   for w in _warnings(caplog)), _warnings(caplog)


def _flip_experts(w: torch.Tensor) -> torch.Tensor:
    """A weight layout only a kernel that asked for it reads: experts in reverse order (as bytes: FP8 flip)."""
    return w.view(torch.uint8).flip(0).view(w.dtype)


def _experts_reading(layout_undone: bool):
    def experts(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, activation="silu", block_size=None):
        if layout_undone:
            w13, w2 = _flip_experts(w13), _flip_experts(w2)
        return Q.fp8_fused_experts(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, activation, block_size)

    return experts


@pytest.mark.parametrize("layout_undone", [True, False])
def test_self_check_hands_experts_their_own_layout(planted_backend, caplog, layout_undone):
    """fp8_fused_experts declares w13 / w2 as weight arguments: the self-check calls a binding on weights in the
    layout its prepare_weights makes (aiter's shuffled tiles), so a binding that does not read it is rejected."""
    planted_backend("fp8_fused_experts", _experts_reading(layout_undone), verified=False,
                    prepare_weights=lambda w13, w2: (_flip_experts(w13), _flip_experts(w2)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        chosen = impl_of(resolve("fp8_fused_experts", dtype=torch.float32, device="cpu", static=EXPERTS)).backend
    assert chosen == ("aiter" if layout_undone else "torch"), _warnings(caplog)


def _cache_writer(drop_scales: bool):
    def write(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        if drop_scales:  # the unit scales of the 16-bit path passed to an FP8 cache
            k_scale = v_scale = None
        ref_attention.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)

    return write


@pytest.mark.parametrize("drop_scales", [False, True])
def test_self_check_compares_fp8_cache_writes(planted_backend, caplog, drop_scales):
    planted_backend("reshape_and_cache", _cache_writer(drop_scales), verified=False, dtypes={torch.bfloat16})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        chosen = impl_of(resolve("reshape_and_cache", dtype=torch.bfloat16, device="cpu",
                                 static={"kv_cache_dtype": FN})).backend
    assert chosen == ("torch" if drop_scales else "aiter"), _warnings(caplog)
    if drop_scales:
        assert any("argument k_cache (written in place)" in w for w in _warnings(caplog)), _warnings(caplog)


def _attention_reading(v_scale_read: bool):
    def attend(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window=None,
               logit_softcap=None, max_query_len=None, max_seq_len=None, k_scale=None, v_scale=None, sinks=None):
        return ref_attention.paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                             sliding_window, logit_softcap, max_query_len, max_seq_len,
                                             k_scale=k_scale, v_scale=v_scale if v_scale_read else None, sinks=sinks)

    return attend


@pytest.mark.parametrize("v_scale_read", [True, False])
def test_self_check_compares_attention_over_fp8_caches(planted_backend, caplog, v_scale_read):
    planted_backend("paged_attention", _attention_reading(v_scale_read), verified=False, dtypes={torch.bfloat16})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        chosen = impl_of(resolve("paged_attention", dtype=torch.bfloat16, device="cpu",
                                 static={"kv_cache_dtype": FN})).backend
    assert chosen == ("aiter" if v_scale_read else "torch"), _warnings(caplog)


# ---------------------------------------------------------------- weight preparation at load


def _tiny_qwen3_moe(path) -> None:
    config = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                         moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                         max_position_embeddings=64, tie_word_embeddings=False)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(path)


def test_fp8_moe_applies_the_kernels_weight_layout_once(planted_backend, tmp_path):
    """An FP8 experts implementation that reads its own layout (as AITER's shuffled tiles) gets the experts
    converted once after loading, in place (no second copy), and resolves with the weights' FP8 type; the
    logits are the reference's, bit for bit."""
    _tiny_qwen3_moe(tmp_path)
    prompt = [[3, 17, 5, 44, 9, 1]]

    def logits():
        model, _ = load_model(str(tmp_path), dtype="float32", progress=False, quantization="fp8")
        harness = PagedHarness(model, num_blocks=8)
        return model, harness.step(prompt, harness.add(1))

    reference_model, reference = logits()
    expected_w13 = reference_model.model.layers[0].mlp.experts.w13
    prepared, statics = [], []

    def prepare(w13, w2):
        prepared.append(w13.shape)
        return _flip_experts(w13), _flip_experts(w2)

    planted_backend("fp8_fused_experts", _experts_reading(layout_undone=True), verified=False,
                    prepare_weights=prepare, supports=lambda static: statics.append(dict(static)))
    model, got = logits()
    moe = model.model.layers[0].mlp.experts
    assert isinstance(moe.quant_method, Fp8MoEMethod)
    assert impl_of(moe.quant_method.experts).backend == "aiter"
    assert len(prepared) == 2  # the self-check's call, then the one layer's
    assert {s["fp8_dtype"] for s in statics} == {FN}  # what the weights are kept in on this device
    assert torch.equal(moe.w13.view(torch.uint8), _flip_experts(expected_w13).view(torch.uint8))
    torch.testing.assert_close(got, reference, rtol=0, atol=0)


# ---------------------------------------------------------------- helpers, against torch


@pytest.mark.parametrize("cache_dtype", [FN, FNUZ, torch.bfloat16])
def test_gather_context_reads_each_sequences_slots(cache_dtype):
    """The packed K / V of the AITER varlen path: token j of sequence b is cache slot
    block_tables[b, j // block_size] * block_size + j % block_size, dequantized with the cache's scale."""
    block_size, heads, dim = 4, 2, 8
    k_cache = torch.randn(10, block_size, heads, dim).to(cache_dtype)
    v_cache = torch.randn(10, block_size, heads, dim).to(cache_dtype)
    scales = (torch.tensor(0.75), torch.tensor(3.0)) if cache_dtype in (FN, FNUZ) else (None, None)
    tables = torch.randperm(10)[:6].view(2, 3).to(torch.int32)
    seq_lens = torch.tensor([9, 5], dtype=torch.int32)
    k, v, cu = aiter_support.gather_context(k_cache, v_cache, tables, seq_lens, *scales, torch.bfloat16)
    assert cu.tolist() == [0, 9, 14] and k.dtype == v.dtype == torch.bfloat16
    rows = [int(tables[b, j // block_size]) * block_size + j % block_size
            for b, n in enumerate(seq_lens.tolist()) for j in range(n)]
    for got, cache, scale in ((k, k_cache, scales[0]), (v, v_cache, scales[1])):
        want = torch.stack([ref_attention.from_cache(cache.flatten(0, 1)[r], scale) for r in rows])
        torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)


def test_e4m3fn_to_e4m3fnuz_against_torch_casts_every_code():
    """Every finite e4m3fn code: the converted byte is torch's own e4m3fnuz cast of half the value (so scale
    * 2 dequantizes to the same number); e4m3fn's -0 (0x80, e4m3fnuz's NaN) becomes 0."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    w = codes.view(FN)
    finite = ~torch.isnan(w.float())
    qz, sz = Q.e4m3fn_to_e4m3fnuz(w[finite].reshape(1, -1), torch.tensor(1.5))
    assert float(sz) == 3.0
    want = (w[finite].float() / 2).to(FNUZ)
    assert torch.equal(qz.view(torch.uint8).flatten(), want.view(torch.uint8))
    torch.testing.assert_close(qz.float().flatten() * 3.0, w[finite].float() * 1.5, rtol=0, atol=0)
    assert not torch.isnan(qz.float()).any()


# ---------------------------------------------------------------- on ROCm: the bindings against the references


_NEEDS_AITER = pytest.mark.skipif(not _AITER_OK, reason=f"aiter unavailable: {_AITER_REASON}")


def _native() -> torch.dtype:
    return Q.default_fp8_dtype()


@_NEEDS_AITER
@pytest.mark.gpu
@pytest.mark.parametrize("block", [(128, 128), None])
@pytest.mark.parametrize("m", [1, 7, 200])
def test_aiter_fp8_linear_matches_torch(block, m):  # pragma: no cover - needs ROCm
    dev, fp8 = platform.default_device(), _native()
    n, k = 512, 1024
    q, s = Q.quantize_weight_fp8(torch.randn(n, k, device=dev) / k**0.5, "block" if block else "channel",
                                 block or (128, 128), fp8)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
    bias = torch.randn(n, dtype=torch.bfloat16, device=dev)
    ref = resolve("fp8_linear", "torch")(x, q, s.float(), bias, block)
    out = resolve("fp8_linear", "aiter")(x, q, s.float(), bias, block)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 1e-2, rel  # same quantized activations: accumulation order and bf16 rounding only


@_NEEDS_AITER
@pytest.mark.gpu
@pytest.mark.parametrize("block", [(128, 128), None])
def test_aiter_fp8_fused_experts_matches_torch(block):  # pragma: no cover - needs ROCm
    if _native() == FNUZ:
        pytest.skip("the binding refuses e4m3fnuz experts (aiter's activation quantization: atom.ops.aiter_support)")
    dev = platform.default_device()
    static = {**EXPERTS, "hidden_size": 256, "intermediate_size": 256, "block_size": block}
    args = list(Q._experts_example(CheckInputs(torch.bfloat16, dev), static))
    ref = resolve("fp8_fused_experts", "torch")(*args)
    args[1], args[2] = registry.implementation("fp8_fused_experts", "aiter").prepare_weights(args[1], args[2])
    out = resolve("fp8_fused_experts", "aiter")(*args)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 3e-2, rel


@_NEEDS_AITER
@pytest.mark.gpu
@pytest.mark.parametrize("q_lens", [[1, 1, 1], [5, 1, 17]])
def test_aiter_fp8_kv_cache_matches_torch(q_lens):  # pragma: no cover - needs ROCm
    dev, fp8, dtype = platform.default_device(), _native(), torch.bfloat16
    block_size, heads, kv_heads, head_dim = 16, 8, 2, 128
    ctx = [q + n for q, n in zip(q_lens, (40, 300, 7))]
    blocks = [-(-c // block_size) for c in ctx]
    num_blocks = sum(blocks) + 3
    k_scale, v_scale = torch.tensor(0.5, device=dev), torch.tensor(2.0, device=dev)
    caches = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=dev).to(fp8) for _ in range(4)]
    slots = torch.randperm(num_blocks * block_size, device=dev)[:sum(ctx)]
    key = torch.randn(sum(ctx), kv_heads, head_dim, dtype=dtype, device=dev)
    value = torch.randn_like(key)
    resolve("reshape_and_cache", "torch")(key, value, caches[0], caches[1], slots, k_scale, v_scale)
    resolve("reshape_and_cache", "aiter")(key, value, caches[2], caches[3], slots, k_scale, v_scale)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))  # power-of-two scales: exact
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    k_cache, v_cache = caches[0], caches[1]
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(ctx), max(blocks), dtype=torch.int32)
    for b, nb in enumerate(blocks):
        tables[b, :nb] = torch.tensor([perm.pop() for _ in range(nb)])
    tables = tables.to(dev)
    q = torch.randn(sum(q_lens), heads, head_dim, dtype=dtype, device=dev)
    qsl = torch.tensor([0] + q_lens, device=dev).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
    args = (q, k_cache, v_cache, tables, qsl, seq_lens, head_dim**-0.5, None, None, max(q_lens), max(ctx))
    ref = resolve("paged_attention", "torch")(*args, k_scale=k_scale, v_scale=v_scale)
    out = resolve("paged_attention", "aiter")(*args, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
