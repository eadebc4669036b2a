"""FP8 activation producers (RMSNorm / SiLU-and-mul emitting FP8 codes + scales) and fp8_linear_quantized:
bit-identical (torch.equal) to the unfused Triton path (float op, then the quantization kernel, then
fp8_linear) and to the torch references, under Triton's CPU interpreter (TRITON_INTERPRET=1, its own pytest
process) and on a GPU (the `gpu` cases: 8b shapes, the hardware FP8 conversion).

One exception, float32 on a GPU: the backend compiler may contract the norm's sum of squares into FMAs in one
kernel and not in the other (measured on the H200, 2026-12-02: one per-token scale of 3 differed), so the
float32 outputs can differ by an ulp there: scales within 4 float32 ulps, codes at most one e4m3 step apart.
bf16 / fp16 outputs (what models run) absorb it in the rounding to the float op's dtype and stay bit-identical.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run this module alone with TRITON_INTERPRET=1 (Triton's CPU interpreter)",
                allow_module_level=True)

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from launch_spy import spy_launches  # noqa: E402
from split_spies import spy_activation_hand_offs, spy_attention_hand_offs, spy_norm_hand_offs  # noqa: E402
from triton import jit as triton_jit  # noqa: E402

from atom.ops import quant_fp8 as Q  # noqa: E402
from atom.ops.registry import resolve  # noqa: E402
from atom.ops.triton_kernels.fp8_common import (  # noqa: E402
    dynamic_scale,
    quantize,
    quantize_by_reciprocal,
    reciprocal,
)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
FP8 = torch.float8_e4m3fn


def triton(op: str):
    return resolve(op, "triton")


def torch_ref(op: str):
    return resolve(op, "torch")


def unfused_quant(y: torch.Tensor, group: int | None, backend=triton):
    """The quantization kernel fp8_linear runs before its GEMM (or its torch reference)."""
    if group is None:
        return backend("fp8_quant_token")(y, FP8)
    return backend("fp8_quant_group")(y, group, FP8)


def check_fused(fused, float_out: torch.Tensor, group: int | None) -> None:
    """Equal to the Triton quantization kernel on the float kernel's output, and to the torch quantization
    reference on it. (Not to the torch references of the float ops themselves: their float32 sums run in
    another order, and the interpreter rounds float32 -> bfloat16 by truncation.)"""
    ulp_level = ON_GPU and float_out.dtype == torch.float32  # see the module docstring
    assert_same(fused[:2], unfused_quant(float_out, group), ulp_level)
    assert_same(fused[:2], unfused_quant(float_out, group, torch_ref), ulp_level)


def assert_same(got, want, ulp_level: bool = False) -> None:
    """torch.equal on every output (FP8 codes compared as bytes: e4m3fn has NaN and -0); with ulp_level,
    float32 values within 4 ulps and FP8 codes at most one step apart (same sign)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
        if g.dtype == FP8:
            g, w = g.view(torch.uint8), w.view(torch.uint8)
        if ulp_level and g.dtype == torch.uint8:
            step = ((g.int() - w.int()).abs() * ((g ^ w) < 128)).max().item() if g.numel() else 0
            assert bool(((g ^ w) < 128).all()) and step <= 1, f"FP8 codes differ by {step} steps or in sign"
        elif ulp_level and g.dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=4 * 2.0**-23, atol=0)
        else:
            assert torch.equal(g, w), f"{(g != w).sum().item()} of {g.numel()} elements differ"


def hidden_states(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(m, k, device=DEVICE) * (0.1 + torch.rand(m, 1, device=DEVICE)) * 4
    x[0, : k // 3] *= 1e-4  # a small slice next to normal ones
    return x.to(dtype)


# (M, K): M not a multiple of any tile, K not a multiple of 128, K below one group, K = several groups
SHAPES = [(1, 200), (5, 320), (17, 96), (3, 512)]
LAYOUTS = [128, 64, None]  # group sizes; None: per token
DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", LAYOUTS)
@pytest.mark.parametrize("m,k", SHAPES)
def test_rms_norm_quant_equals_norm_then_quant(m, k, group, dtype):
    x = hidden_states(m, k, dtype)
    w = (1 + 0.2 * torch.randn(k, device=DEVICE)).to(dtype)
    fused = triton("rms_norm_quant_fp8")(x, w, 1e-6, group, FP8)
    check_fused(fused, triton("rms_norm")(x, w, 1e-6), group)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", LAYOUTS)
@pytest.mark.parametrize("m,k", SHAPES)
def test_fused_add_rms_norm_quant_equals_add_norm_then_quant(m, k, group, dtype):
    x, res = hidden_states(m, k, dtype), hidden_states(m, k, dtype)
    w = (1 + 0.2 * torch.randn(k, device=DEVICE)).to(dtype)
    q, s, r = triton("fused_add_rms_norm_quant_fp8")(x, res, w, 1e-6, group, FP8)
    y, r_unfused = triton("fused_add_rms_norm")(x, res, w, 1e-6)
    check_fused((q, s), y, group)
    assert torch.equal(r, r_unfused)


def test_rms_norm_quant_with_a_float32_weight_quantizes_the_float32_output():
    """A bf16 input with a float32 weight: the norm's output (and so what is quantized) is float32."""
    x = hidden_states(4, 256, torch.bfloat16)
    w = 1 + 0.2 * torch.randn(256, device=DEVICE)
    assert_same(triton("rms_norm_quant_fp8")(x, w, 1e-6, 128, FP8),
                unfused_quant(triton("rms_norm")(x, w, 1e-6), 128))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", LAYOUTS)
@pytest.mark.parametrize("m,d", [(1, 200), (5, 1100), (17, 96)])
def test_silu_and_mul_quant_equals_act_then_quant(m, d, group, dtype):
    x = hidden_states(m, 2 * d, dtype)
    fused = triton("silu_and_mul_quant_fp8")(x, group, FP8)
    check_fused(fused, triton("silu_and_mul")(x), group)


@pytest.mark.parametrize("d", [200, 1100])
def test_silu_and_mul_quant_token_of_rows_longer_than_a_block(monkeypatch, d):
    """Per-token rows wider than ROW_BLOCK_MAX take the two-pass kernel (amax, then the codes, the product
    recomputed); the fused producer still equals SiLU-and-mul then the quantization."""
    from atom.ops.triton_kernels import quant_fp8 as tk

    monkeypatch.setattr(tk, "ROW_BLOCK_MAX", 64)
    x = hidden_states(3, 2 * d, torch.bfloat16)
    check_fused(triton("silu_and_mul_quant_fp8")(x, None, FP8), triton("silu_and_mul")(x), None)


def test_silu_and_mul_quant_token_with_the_large_row_launch(monkeypatch):
    """From ROW_TILE_LARGE's row count the fused producer takes that launch (here two passes of 64 columns over
    200): still SiLU-and-mul then the quantization."""
    from atom.ops.triton_kernels import quant_fp8 as tk

    monkeypatch.setattr(tk, "ROW_TILE_LARGE", (4, 64, 2))
    x = hidden_states(5, 400, torch.bfloat16)
    check_fused(triton("silu_and_mul_quant_fp8")(x, None, FP8), triton("silu_and_mul")(x), None)


def _weight(n: int, k: int, layout: str):
    w = torch.randn(n, k, device=DEVICE) / k**0.5
    if layout == "block":
        return (*Q.quantize_weight_fp8(w, "block", (128, 128), FP8), [128, 128])
    if layout == "block_rows":  # one row of K-block scales per output row (merged shards not multiples of bn)
        q, sc = Q.quantize_weight_fp8(w, "block", (128, 128), FP8)
        return q, sc.repeat_interleave(128, 0)[:n].contiguous(), [1, 128]
    if layout == "block64":
        return (*Q.quantize_weight_fp8(w, "block", (32, 64), FP8), [32, 64])
    q, s = Q.quantize_weight_fp8(w, "tensor" if layout == "tensor" else "channel", fp8_dtype=FP8)
    return q, s.float(), None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channel", "tensor"])
@pytest.mark.parametrize("m", [1, 3])
def test_fp8_linear_quantized_equals_fp8_linear_in_the_gemv(m, layout, dtype, monkeypatch):
    """Per-token layouts at the GEMV's rows (GEMV_MAX_M 4 here): fp8_linear runs the quantization kernel and the
    GEMV on its codes, fp8_linear_quantized the GEMV on the producer's: equal outputs."""
    from atom.ops.triton_kernels import quant_fp8 as tk

    monkeypatch.setattr(tk, "GEMV_MAX_M", 4)
    assert not tk.gemv_quantizes_input(m, False) and tk.gemv_quantizes_input(m, True)
    n, k = 96, 320
    w, ws, block = _weight(n, k, layout)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    x = hidden_states(m, k, dtype)
    q, s = Q.quantize_activations(x, block, FP8)
    assert torch.equal(triton("fp8_linear_quantized")(q, s, w, ws, bias, block, dtype),
                       triton("fp8_linear")(x, w, ws, bias, block))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["block", "block64", "block_rows", "channel", "tensor"])
@pytest.mark.parametrize("m", [17, 37])  # above any GEMV_MAX_M (at most 16)
def test_fp8_linear_quantized_equals_fp8_linear(m, layout, dtype):
    """At M above the GEMV's rows both run the same GEMM on the same codes: equal outputs; the torch
    references agree with each other exactly too."""
    n, k = 96, 320
    w, ws, block = _weight(n, k, layout)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    x = hidden_states(m, k, dtype)
    q, s = Q.quantize_activations(x, block, FP8)
    want = triton("fp8_linear")(x, w, ws, bias, block)
    assert torch.equal(triton("fp8_linear_quantized")(q, s, w, ws, bias, block, dtype), want)
    assert torch.equal(torch_ref("fp8_linear_quantized")(q, s, w, ws, bias, block, dtype),
                       torch_ref("fp8_linear")(x, w, ws, bias, block))


def test_fp8_linear_quantized_rejects_mismatched_inputs():
    w, ws, block = _weight(64, 256, "block")
    q, s = Q.quantize_activations(hidden_states(4, 256, torch.float32), block, FP8)
    op = triton("fp8_linear_quantized")
    with pytest.raises(ValueError, match="activation scales"):
        op(q, s[:, :1], w, ws, None, block, torch.float32)
    with pytest.raises(ValueError, match="features"):
        op(q[:, :128], s[:, :1], w, ws, None, block, torch.float32)
    with pytest.raises(ValueError, match="power-of-two group size"):
        triton("silu_and_mul_quant_fp8")(hidden_states(2, 192, torch.float32), 96, FP8)


# ---------------------------------------------------------------- the GEMM quantizing per-token rows itself


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [96, 1024, 2500])  # one block below 1,024, one whole block, three with a partial one
def test_silu_and_mul_rowmax_is_silu_and_mul_with_its_chunk_maxima(d, dtype):
    """The float output is silu_and_mul's, bit for bit; each 1,024-column chunk's absolute maximum equals the
    torch reference's, and their max is the row's."""
    x = hidden_states(3, 2 * d, dtype)
    y, parts = triton("silu_and_mul_rowmax")(x)
    assert torch.equal(y, triton("silu_and_mul")(x))
    assert parts.shape == (3, -(-d // 1024)) and parts.dtype == torch.float32
    want = torch.nn.functional.pad(y.float().abs(), (0, parts.shape[1] * 1024 - d)).view(3, -1, 1024).amax(-1)
    assert torch.equal(parts, want)
    assert torch.equal(parts.amax(-1), y.float().abs().amax(-1))
    ref_y, ref_parts = torch_ref("silu_and_mul_rowmax")(x)  # the reference's own silu_and_mul, chunked the same
    assert ref_parts.shape == parts.shape
    assert torch.equal(ref_parts, torch.nn.functional.pad(ref_y.float().abs(), (0, parts.shape[1] * 1024 - d))
                       .view(3, -1, 1024).amax(-1))


@triton_jit
def _both_quantizers(x_ptr, amax_ptr, div_ptr, rcp_ptr, n, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                     MIN_SCALE: tl.constexpr, MIN_EXP: tl.constexpr, EMULATE: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    s = dynamic_scale(tl.load(amax_ptr + tl.arange(0, 1)), FP8_MAX, MIN_SCALE)
    fp8 = div_ptr.dtype.element_ty
    tl.store(div_ptr + i, quantize(x, s, fp8, FP8_MAX, MIN_EXP, EMULATE), mask=i < n)
    tl.store(rcp_ptr + i, quantize_by_reciprocal(x, s, reciprocal(s), fp8, FP8_MAX, MIN_EXP, EMULATE), mask=i < n)


def test_quantize_by_reciprocal_gives_the_division_s_codes():
    """fp8_common.quantize_by_reciprocal against quantize on every finite bfloat16 value below a row maximum,
    under scales from a spread of maxima (the interpreter's fma is a true one; the codes compared as magnitudes,
    since a zero's sign may differ)."""
    import triton

    from atom.ops.triton_kernels.fp8_common import fp8_consts

    finite = (torch.arange(0, 0x7F80, dtype=torch.int32) << 16).view(torch.float32)  # every positive bf16
    for amax in (3e-7, 1e-3, 0.37, 1.0, 2.0 - 2**-23, 7.5, 448.0, 3.1e4, 2.0**100):
        x = finite[finite <= amax]
        x = torch.cat([x, -x]).to(DEVICE)
        div, rcp = (torch.empty(x.shape, dtype=FP8, device=DEVICE) for _ in range(2))
        _both_quantizers[(triton.cdiv(x.numel(), 4096),)](x, torch.tensor([amax], device=DEVICE), div, rcp, x.numel(),
                                              BLOCK=4096, **fp8_consts(FP8))
        assert torch.equal(div.view(torch.uint8) & 0x7F, rcp.view(torch.uint8) & 0x7F), amax
        assert torch.equal(div.float(), rcp.float()), amax


def _rowmax_on(monkeypatch, rows: int = 32):
    from atom.ops.triton_kernels import quant_fp8 as tk

    monkeypatch.setattr(tk, "ROWMAX_MAX_M", rows)
    monkeypatch.setattr(tk, "GEMV_MAX_M", 0)
    return tk


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channel", "tensor"])
@pytest.mark.parametrize("m", [1, 3, 16, 20])
def test_fp8_linear_rowmax_equals_the_quantized_path(m, layout, dtype, tma, monkeypatch):
    """The swap-AB kernel quantizing float rows itself (QUANT_A, by reciprocal) gives what the quantization
    kernel's codes through the same kernel give: equal outputs, with bias, K not a multiple of the K step, split
    K, TMA loads and pointer loads."""
    tk = _rowmax_on(monkeypatch)
    monkeypatch.setattr(tk, "TMA", tma)
    n, d = 96, 1296  # two row maxima, a partial last K step, rows 16-byte aligned for TMA
    w, ws, _ = _weight(n, d, layout)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    x = hidden_states(m, 2 * d, dtype)
    y, parts = triton("silu_and_mul_rowmax")(x)
    assert tk.gemm_quantizes_rows(m, w, None, dtype)
    launches = spy_launches(monkeypatch, tk, "_fp8_gemm_swap_kernel")
    got = triton("fp8_linear_rowmax")(y, parts, w, ws, bias, dtype)
    want = triton("fp8_linear_quantized")(*triton("silu_and_mul_quant_fp8")(x, None, FP8), w, ws, bias, None, dtype)
    calls = [(la.kwargs.get("QUANT_A", False), la.kwargs.get("TMA")) for la in launches]
    assert calls[0][0] and not calls[1][0], calls  # the rowmax call quantized in the kernel, the other did not
    assert calls[0][1] == tma, calls
    assert torch.equal(got, want)
    ref = torch_ref("fp8_linear_rowmax")(y, parts, w, ws, bias, dtype)
    assert torch.equal(ref, torch_ref("fp8_linear_quantized")(*torch_ref("fp8_quant_token")(y, FP8), w, ws, bias,
                                                              None, dtype))
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.float().abs().max()))


def test_fp8_linear_rowmax_outside_its_rows_quantizes_first(monkeypatch):
    """Rows past ROWMAX_MAX_M (or block layouts) take the quantization kernel and fp8_gemm_quantized: the same
    output; bad inputs are refused with the argument named."""
    tk = _rowmax_on(monkeypatch, rows=2)
    n, d = 64, 300
    w, ws, _ = _weight(n, d, "channel")
    x = hidden_states(5, 2 * d, torch.bfloat16)
    y, parts = triton("silu_and_mul_rowmax")(x)
    assert not tk.gemm_quantizes_rows(5, w, None, torch.bfloat16)
    want = triton("fp8_linear_quantized")(*triton("silu_and_mul_quant_fp8")(x, None, FP8), w, ws, None, None,
                                          torch.bfloat16)
    assert torch.equal(triton("fp8_linear_rowmax")(y, parts, w, ws, None, torch.bfloat16), want)
    assert not tk.gemm_quantizes_rows(1, w, [128, 128], torch.bfloat16)
    op = triton("fp8_linear_rowmax")
    with pytest.raises(ValueError, match="row maxima"):
        op(y, parts[:4], w, ws, None, torch.bfloat16)
    with pytest.raises(ValueError, match="features"):
        op(y[:, :128], parts, w, ws, None, torch.bfloat16)


@pytest.mark.parametrize("rowmax_max_m,fused_prep", [(2, False), (32, False), (2, True)])
def test_fp8_model_logits_are_identical_with_the_gemm_quantizing_rows(rowmax_max_m, fused_prep, tmp_path,
                                                                       monkeypatch):
    """A per-channel FP8 Qwen3 (per-token activations): down_proj fed SiLU-and-mul's float output and chunk
    maxima, o_proj the attention's output and per-head maxima, at the decode step (2 rows; with 32, the
    prefill's 14 rows too): the logits of the producers quantizing themselves and of o_proj's quantization
    kernel."""
    from atom.layers import attention as attention_layer

    tk = _rowmax_on(monkeypatch, rows=rowmax_max_m)
    monkeypatch.setattr(attention_layer, "FUSED_DECODE_PREP", fused_prep)  # decode: the prep inside attention
    path = _tiny_fp8_qwen3(tmp_path, "compressed-tensors")
    from atom.quantization.fp8 import Fp8LinearMethod

    calls = []
    inner = Fp8LinearMethod.apply

    def spy(self, layer, x, bias=None, **kw):
        calls.append((layer.prefix, type(x).__name__))
        return inner(self, layer, x, bias, **kw)

    monkeypatch.setattr(Fp8LinearMethod, "apply", spy)
    got, _ = _model_logits(path, True, monkeypatch)
    down = [kind for prefix, kind in calls if prefix.endswith("down_proj")]  # 2 layers x (prefill, decode)
    prefill = "Fp8RowMaxActivation" if rowmax_max_m >= 14 else "Fp8Activation"  # the prefill has 9 + 5 rows
    assert down == [prefill] * 2 + ["Fp8RowMaxActivation"] * 2, down
    o_proj = [kind for prefix, kind in calls if prefix.endswith("o_proj")]
    prefill = "Fp8RowMaxActivation" if rowmax_max_m >= 14 else "Tensor"
    assert o_proj == [prefill] * 2 + ["Fp8RowMaxActivation"] * 2, o_proj
    monkeypatch.setattr(tk, "ROWMAX_MAX_M", 0)
    want, _ = _model_logits(path, True, monkeypatch)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- GPU: qwen3-8b shapes


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("group", [128, None])
@pytest.mark.parametrize("m", [17, 128, 300])
@pytest.mark.parametrize("site", ["qkv", "gate_up", "down"])
def test_fused_path_equals_unfused_at_8b_shapes(site, m, group):
    """Producer + fp8_linear_quantized against producer's float op + fp8_linear on the GPU, bf16, 8b shapes."""
    hidden, inter = 4096, 12288
    k, n = {"qkv": (hidden, 6144), "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}[site]
    w, ws, block = _weight(n, k, "block" if group else "channel")
    dtype = torch.bfloat16
    if site == "down":
        x = hidden_states(m, 2 * inter, dtype)
        q, s = triton("silu_and_mul_quant_fp8")(x, group, FP8)
        want = triton("fp8_linear")(triton("silu_and_mul")(x), w, ws, None, block)
    else:
        x, res = hidden_states(m, hidden, dtype), hidden_states(m, hidden, dtype)
        nw = (1 + 0.2 * torch.randn(hidden, device=DEVICE)).to(dtype)
        q, s, r = triton("fused_add_rms_norm_quant_fp8")(x, res, nw, 1e-6, group, FP8)
        y, r_want = triton("fused_add_rms_norm")(x, res, nw, 1e-6)
        assert torch.equal(r, r_want)
        want = triton("fp8_linear")(y, w, ws, None, block)
    assert torch.equal(triton("fp8_linear_quantized")(q, s, w, ws, None, block, dtype), want)



@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("m", [1, 7, 16, 32])
def test_fp8_linear_rowmax_at_8b_shapes(m, monkeypatch):
    """down_proj of qwen3-8b (12,288 -> 4,096, per-channel), bf16, on the GPU: SiLU-and-mul's output and chunk
    maxima through the swap kernel quantizing the rows itself (hardware conversion, no clamp) give the output of
    the producer's codes through the same kernel (TMA from 2 rows, as the defaults choose)."""
    _rowmax_on(monkeypatch, rows=32)
    w, ws, _ = _weight(4096, 12288, "channel")
    x = hidden_states(m, 2 * 12288, torch.bfloat16)
    got = triton("fp8_linear_rowmax")(*triton("silu_and_mul_rowmax")(x), w, ws, None, torch.bfloat16)
    want = triton("fp8_linear_quantized")(*triton("silu_and_mul_quant_fp8")(x, None, FP8), w, ws, None, None,
                                          torch.bfloat16)
    assert torch.isfinite(want).all() and want.abs().max() > 0
    assert torch.equal(got, want)


# ---------------------------------------------------------------- a whole FP8 model, fused and not


def _tiny_fp8_qwen3(tmp_path, fmt: str) -> str:
    """A 2-layer dense Qwen3 (qk-norm, hidden 64: below one 128-group; block_k 32 groups: two per row),
    written in FP8 by tools/quantize_fp8.py: "fp8-block" (1 x 32 activation groups) or "compressed-tensors"
    (per-channel weights, per-token activations)."""
    import sys

    import transformers

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
    import quantize_fp8

    config = transformers.Qwen3Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / "float")
    quantize_fp8.quantize_checkpoint(str(tmp_path / "float"), str(tmp_path / fmt), fmt, (32, 32))
    return str(tmp_path / fmt)


def _model_logits(path: str, fused: bool, monkeypatch, dtype: str = "bfloat16", **load_kw):
    """Prefill of two prompts then a decode step (2 rows) on the Triton kernels; returns the logits and how
    many FP8 linear calls took producer-quantized activations."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from paged_harness import prefill_then_decode

    from atom.loader import load_model
    from atom.ops import registry
    from atom.quantization.fp8 import Fp8LinearMethod

    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)
    monkeypatch.setenv("ATOM_FP8_FUSED_PRODUCERS", "1" if fused else "0")
    registry.forget_resolutions()
    torch.manual_seed(0)  # the same dummy weights in both runs
    model, _ = load_model(path, dtype=dtype, device=DEVICE, progress=False, **load_kw)
    calls = []
    for m in model.modules():
        method = getattr(m, "quant_method", None)
        if isinstance(method, Fp8LinearMethod) and method.linear_quantized is not None:
            inner = method.linear_quantized
            method.linear_quantized = lambda *a, _f=inner, _p=m.prefix, **kw: (calls.append(_p), _f(*a, **kw))[1]
    logits = prefill_then_decode(model, DEVICE)
    registry.forget_resolutions()
    return logits, calls


@pytest.mark.parametrize("fmt,gemv_max_m", [("fp8-block", 0), ("compressed-tensors", 0), ("fp8-block", 2),
                                            ("compressed-tensors", 2)])
def test_fp8_model_logits_are_identical_with_and_without_fused_producers(fmt, gemv_max_m, tmp_path, monkeypatch):
    """qkv_proj, gate_up_proj and down_proj fed by their producers (bf16 activations) give the very logits of
    the unfused model; with GEMV_MAX_M 2 the decode steps (2 rows) of the block checkpoint take the float path
    into the GEMV (which quantizes 1 x 128 groups itself), those of the per-channel one (per-token
    activations) take the producers' codes into the GEMV."""
    from atom.ops.triton_kernels import quant_fp8 as tk

    monkeypatch.setattr(tk, "GEMV_MAX_M", gemv_max_m)
    # the producers' codes into every linear: down_proj's rows stay off the GEMM-quantizing path (on by default up
    # to 32 rows; test_fp8_model_logits_are_identical_with_the_gemm_quantizing_rows holds that one to this one)
    monkeypatch.setattr(tk, "ROWMAX_MAX_M", 0)
    path = _tiny_fp8_qwen3(tmp_path, fmt)
    want, none = _model_logits(path, False, monkeypatch)
    got, calls = _model_logits(path, True, monkeypatch)
    assert none == []
    steps = 1 if gemv_max_m >= 2 and fmt == "fp8-block" else 2  # forward passes handed FP8 by the producers
    per_step = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.qkv_proj", "mlp.gate_up_proj",
                                                                    "mlp.down_proj")]
    assert sorted(calls) == sorted(per_step * steps)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_fp8_model_at_8b_shapes_is_identical_with_and_without_fused_producers(tmp_path, monkeypatch):
    """Two Qwen3-8B layers (hidden 4096, intermediate 12288, 32 / 8 heads of 128), random weights quantized
    at load time (--quantization fp8: per-channel weights, per-token activations), bf16, on the GPU."""
    import transformers

    from atom.ops.triton_kernels import quant_fp8 as tk

    monkeypatch.setattr(tk, "GEMV_MAX_M", 1)  # decode steps of 2 rows take the fused path
    transformers.Qwen3Config(vocab_size=1024, hidden_size=4096, intermediate_size=12288, num_hidden_layers=2,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=256, architectures=["Qwen3ForCausalLM"]).save_pretrained(tmp_path)
    kw = dict(load_format="dummy", quantization="fp8")
    want, none = _model_logits(str(tmp_path), False, monkeypatch, **kw)
    got, calls = _model_logits(str(tmp_path), True, monkeypatch, **kw)
    assert none == [] and len(calls) == 2 * 3 * 2  # layers x sites x (prefill, decode of 2 rows)
    assert torch.isfinite(want).all() and want.abs().max() > 0
    assert torch.equal(got, want)


def test_the_torch_path_has_no_fused_producers(tmp_path, monkeypatch):
    """The torch references (the CPU path) keep their float ops: no producer links to its linear."""
    from atom.loader import load_model
    from atom.ops import registry

    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "torch")
    registry.forget_resolutions()
    model, _ = load_model(_tiny_fp8_qwen3(tmp_path, "fp8-block"), dtype="bfloat16", device=DEVICE, progress=False)
    layer = model.model.layers[0]
    assert layer.input_layernorm._fp8 is None and layer.mlp.act._fp8 is None
    assert layer.self_attn.qkv_proj.quant_method.fused_input_format() is None
    registry.forget_resolutions()


def test_fp8_model_with_fused_producers_compiles_in_one_graph(tmp_path, monkeypatch):
    """Under torch.compile (atom-vllm compiles the backbone) the producers keep their float ops: the model
    traces into one graph (fullgraph) and gives the eager model's logits, which took the fused path."""
    import sys

    import torch._dynamo

    sys.path.insert(0, os.path.dirname(__file__))
    from compile_checks import compiled_model_logits

    from atom.ops import registry

    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)
    monkeypatch.setenv("ATOM_FP8_FUSED_PRODUCERS", "1")
    registry.forget_resolutions()
    eager, compiled, model = compiled_model_logits(_tiny_fp8_qwen3(tmp_path, "fp8-block"), DEVICE, "aot_eager",
                                                   dtype="bfloat16")
    assert model.model.layers[0].input_layernorm._fp8 is not None
    assert registry.cuda_graph_blockers(model) == []
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()
    registry.forget_resolutions()


# ---------------------------------------------------------------- split-K partials added by the norm


def _split_sum(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What fp8_linear stores after a split-K GEMM: quant_fp8's sum kernel on the partials (float32, added in split
    order, rounded to dtype by Triton's conversion)."""
    from atom.ops.triton_kernels import quant_fp8 as tk

    out = torch.empty(parts.shape[1:], dtype=dtype, device=parts.device)
    tk.add_split_parts(parts, out)
    return out


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("m,k", [(1, 200), (5, 320)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_adding_split_parts_equal_the_sum_kernel_then_the_norm(splits, m, k, dtype):
    """x handed over as a split-K GEMM's float32 partials: the float norm and the FP8-emitting one give the very
    outputs and residual of the partials summed (as _split_k_sum_kernel does) and then normed."""
    from atom.ops.triton_kernels.fp8_producers import fused_add_rms_norm_quant_fp8_parts
    from atom.ops.triton_kernels.norm import fused_add_rms_norm_parts

    parts = torch.stack([hidden_states(m, k, torch.float32) / splits for _ in range(splits)]).contiguous()
    res = hidden_states(m, k, dtype)
    w = (1 + 0.2 * torch.randn(k, device=DEVICE)).to(dtype)
    x = _split_sum(parts, dtype)
    y, r = fused_add_rms_norm_parts(parts, res, w, 1e-6)
    y_want, r_want = triton("fused_add_rms_norm")(x, res, w, 1e-6)
    assert torch.equal(y, y_want) and torch.equal(r, r_want)
    for group in (128, None):
        got = fused_add_rms_norm_quant_fp8_parts(parts, res, w, 1e-6, group, FP8)
        want = triton("fused_add_rms_norm_quant_fp8")(x, res, w, 1e-6, group, FP8)
        for g, t in zip(got, want, strict=True):
            assert torch.equal(g.view(torch.uint8) if g.dtype == FP8 else g,
                               t.view(torch.uint8) if t.dtype == FP8 else t)
    with pytest.raises(ValueError, match="partials"):
        fused_add_rms_norm_parts(parts.to(torch.bfloat16), res, w, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm_parts(parts[:, :, :-1].contiguous(), res, w, 1e-6)


@pytest.mark.parametrize("path", ["gemv", "swap", "gemm"])
def test_fp8_linear_leaves_its_split_parts_to_the_caller(path, monkeypatch):
    """fp8_linear(..., parts=[]) of a call that splits over K: the partials, whose sum in split order is the
    output of the same call without parts; a call that does not split, or has a bias, returns its output."""
    from atom.ops.triton_kernels import quant_fp8 as tk

    m, n, k = (1, 64, 256) if path != "gemm" else (80, 64, 256)
    monkeypatch.setattr(tk, "GEMV_MAX_M", 4 if path == "gemv" else 0)
    monkeypatch.setattr(tk, "SWAP_MAX_M", 64)
    monkeypatch.setattr(tk, "GEMV_TILE_OVERRIDE", {**tk._gemv_tile(n, k, 128, torch.device(DEVICE)), "block_k": 128,
                                                   "split_k": 2})
    monkeypatch.setattr(tk, "SWAP_TILE_OVERRIDE", dict(block_m=16, block_k=64, split_k=2))
    monkeypatch.setattr(tk, "GEMM_TILE_OVERRIDE", dict(block_m=16, block_n=64, block_k=64, num_warps=4,
                                                       num_stages=2, split_k=2, tma=False))
    monkeypatch.setattr(tk, "_rowwise_scaled_mm_device", lambda device: False)
    x = hidden_states(m, k, torch.bfloat16)
    w, ws, _ = _weight(n, k, "channel")
    want = tk.fp8_linear(x, w, ws)
    parts: list = []
    tk.fp8_linear(x, w, ws, parts=parts)
    assert len(parts) == 1 and parts[0].shape == (2, m, n) and parts[0].dtype == torch.float32
    assert torch.equal(_split_sum(parts[0], torch.bfloat16), want)
    bias = torch.randn(n, device=DEVICE).to(torch.bfloat16)
    parts = []
    assert torch.equal(tk.fp8_linear(x, w, ws, bias, parts=parts), tk.fp8_linear(x, w, ws, bias)) and parts == []


@pytest.mark.parametrize("fmt,gemv_max_m,rowmax_max_m", [("fp8-block", 0, 0), ("compressed-tensors", 0, 32),
                                                         ("fp8-block", 2, 0)])
def test_fp8_model_logits_are_identical_with_the_norms_adding_split_parts(fmt, gemv_max_m, rowmax_max_m, tmp_path,
                                                                         monkeypatch):
    """Every FP8 GEMM split in two over K: with ATOM_FP8_NORM_SUMS_SPLITS o_proj and the dense MLPs' down_proj
    hand their partials to the next residual norm (the last down_proj to the final norm), and the logits of
    prefill + decode are the very ones of the sum kernel's path."""
    from atom.ops.triton_kernels import quant_fp8 as tk

    monkeypatch.setattr(tk, "GEMV_MAX_M", gemv_max_m)
    monkeypatch.setattr(tk, "ROWMAX_MAX_M", rowmax_max_m)
    monkeypatch.setattr(tk, "SWAP_TILE_OVERRIDE", dict(block_m=16, block_k=32, split_k=2))
    monkeypatch.setattr(tk, "GEMV_TILE_OVERRIDE", dict(block_n=32, block_k=32, num_warps=4, num_stages=2,
                                                       split_k=2))
    path = _tiny_fp8_qwen3(tmp_path, fmt)
    monkeypatch.setattr(tk, "ATTN_SUMS_SPLITS", False)  # qkv_proj's hand-off: the next test
    monkeypatch.setattr(tk, "NORM_SUMS_SPLITS", False)
    want, _ = _model_logits(path, True, monkeypatch)
    handed = spy_norm_hand_offs(monkeypatch)
    monkeypatch.setattr(tk, "NORM_SUMS_SPLITS", True)
    got, _ = _model_logits(path, True, monkeypatch)
    # 2 layers x (o_proj, down_proj) x (prefill of 14 rows, decode of 2)
    assert sorted(handed) == sorted([(2, 14, 64)] * 4 + [(2, 2, 64)] * 4), handed
    assert torch.equal(got, want)


def test_the_norms_split_parts_hand_off_switch_and_its_exclusions(tmp_path, monkeypatch):
    """ATOM_FP8_NORM_SUMS_SPLITS off (qkv_proj's and gate_up_proj's own switches held off too): no linear hands
    partials on; on (the default): o_proj and the dense down_proj do, qkv_proj (not consumed by a norm:
    ATOM_FP8_ATTN_SUMS_SPLITS) and gate_up_proj (consumed by the activation: ATOM_FP8_ACT_SUMS_SPLITS) do not;
    the activation's switch alone: gate_up_proj alone."""
    from atom.loader import load_model
    from atom.ops import registry
    from atom.ops.triton_kernels import quant_fp8 as tk

    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "triton")
    monkeypatch.setattr(tk, "ATTN_SUMS_SPLITS", False)
    path = _tiny_fp8_qwen3(tmp_path, "fp8-block")
    for norm, act in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(tk, "NORM_SUMS_SPLITS", norm)
        monkeypatch.setattr(tk, "ACT_SUMS_SPLITS", act)
        registry.forget_resolutions()
        model, _ = load_model(path, dtype="bfloat16", device=DEVICE, progress=False)
        layer = model.model.layers[0]
        assert layer.self_attn.o_proj._leaves_splits is norm and layer.mlp.down_proj._leaves_splits is norm
        assert not layer.self_attn.qkv_proj._leaves_splits and layer.mlp.gate_up_proj._leaves_splits is act
    registry.forget_resolutions()


@pytest.mark.parametrize("fmt,rowmax_max_m", [("compressed-tensors", 32), ("fp8-block", 0)])
def test_fp8_model_logits_are_identical_with_the_activation_adding_gate_up_parts(fmt, rowmax_max_m, tmp_path,
                                                                              monkeypatch):
    """Every FP8 GEMM split in two over K: with ATOM_FP8_ACT_SUMS_SPLITS the dense MLPs' gate_up_proj hands its
    partials to the gated activation, whose rowmax form (per-token, down_proj quantizing its rows) adds them in its
    kernel and whose FP8 codes form (block layout) has the sum kernel add them first; the logits of prefill +
    decode are the sum kernel's path's, bit for bit."""
    from atom.ops.triton_kernels import quant_fp8 as tk

    monkeypatch.setattr(tk, "GEMV_MAX_M", 0)
    monkeypatch.setattr(tk, "ROWMAX_MAX_M", rowmax_max_m)
    monkeypatch.setattr(tk, "SWAP_TILE_OVERRIDE", dict(block_m=16, block_k=32, split_k=2))
    path = _tiny_fp8_qwen3(tmp_path, fmt)
    monkeypatch.setattr(tk, "ACT_SUMS_SPLITS", False)
    want, _ = _model_logits(path, True, monkeypatch)
    handed = spy_activation_hand_offs(monkeypatch)
    prepped, summed = spy_attention_hand_offs(monkeypatch)
    monkeypatch.setattr(tk, "ACT_SUMS_SPLITS", True)
    got, _ = _model_logits(path, True, monkeypatch)
    assert len(handed) == 4 and {h[0] for h in handed} == {2}, handed  # 2 layers x (prefill, decode)
    # the codes form has them summed first (every call); the rowmax form (14 and 2 rows, <= ROWMAX_MAX_M) never
    assert sum(1 for s in summed if s in handed) == (0 if rowmax_max_m else 4), (summed, handed)
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt,gemv_max_m", [("compressed-tensors", 0), ("fp8-block", 2)])
def test_fp8_model_logits_are_identical_with_the_attention_adding_qkv_parts(fmt, gemv_max_m, tmp_path,
                                                                             monkeypatch):
    """Every FP8 GEMM split in two over K, the decode prep inside the attention kernel, both hand-offs on
    (ATOM_FP8_ATTN_SUMS_SPLITS and ATOM_FP8_NORM_SUMS_SPLITS): at the decode step qkv_proj's partials go to the
    attention kernel (q / k / v read from them, k / v written to the cache from them), at the prefill (not a fused
    step) the sum kernel adds them first; the logits are the sum kernel's path's, bit for bit."""
    from atom.layers import attention as attention_layer
    from atom.ops.triton_kernels import quant_fp8 as tk

    monkeypatch.setattr(attention_layer, "FUSED_DECODE_PREP", True)
    monkeypatch.setattr(tk, "GEMV_MAX_M", gemv_max_m)
    monkeypatch.setattr(tk, "ROWMAX_MAX_M", 0)
    monkeypatch.setattr(tk, "SWAP_TILE_OVERRIDE", dict(block_m=16, block_k=32, split_k=2))
    monkeypatch.setattr(tk, "GEMV_TILE_OVERRIDE", dict(block_n=32, block_k=32, num_warps=4, num_stages=2,
                                                       split_k=2))
    path = _tiny_fp8_qwen3(tmp_path, fmt)
    monkeypatch.setattr(tk, "ATTN_SUMS_SPLITS", False)  # the reference: both sums in the sum kernel (both default on)
    monkeypatch.setattr(tk, "NORM_SUMS_SPLITS", False)
    monkeypatch.setattr(tk, "ACT_SUMS_SPLITS", False)  # gate_up's: its own test (the codes form sums them first)
    want, _ = _model_logits(path, True, monkeypatch)
    prepped, summed = spy_attention_hand_offs(monkeypatch)
    monkeypatch.setattr(tk, "ATTN_SUMS_SPLITS", True)
    monkeypatch.setattr(tk, "NORM_SUMS_SPLITS", True)
    got, _ = _model_logits(path, True, monkeypatch)
    assert prepped == [False] * 2 + [True] * 2, prepped  # 2 layers: the prefill, then the decode step
    assert summed == [(2, 14, 128)] * 2, summed  # the prefill's qkv (64 q + 2 x 32 kv columns)
    assert torch.equal(got, want)
