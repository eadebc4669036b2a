"""The Triton dense_linear (atom.ops.dense): bf16 / fp16 linears on the swap-AB kernel at decode, against the float
product, its split-K hand-off, the F.linear fallback, and a model's logits with every linear on it.

CPU: run alone with TRITON_INTERPRET=1 (the CI's triton-interpret lane); the interpreter dots in float32 (F32_DOT).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run this module alone with TRITON_INTERPRET=1 (Triton's CPU interpreter)",
                allow_module_level=True)

pytest.importorskip("triton")

from atom.ops import dense as dense_ref  # noqa: E402
from atom.ops.triton_kernels import dense as tk_dense  # noqa: E402
from atom.ops.triton_kernels import quant_fp8 as tk  # noqa: E402
from launch_spy import spy_launches  # noqa: E402
from split_spies import spy_activation_hand_offs, spy_attention_hand_offs, spy_norm_hand_offs  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # one unit in the last place, relative


@pytest.fixture
def swap_on(monkeypatch):
    """The op on up to 64 rows with a small tile (K steps of 64, split in two: the interpreter's pace)."""
    monkeypatch.setattr(dense_ref, "DENSE_SWAP_MAX_M", 64)
    monkeypatch.setattr(tk_dense, "TILE", dict(block_k=64, num_stages=2, split_k=2))
    return spy_launches(monkeypatch, tk, "_fp8_gemm_swap_kernel")


def _operands(m, n, k, dtype, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = (torch.randn(m, k, generator=g) * (0.2 + torch.rand(m, 1, generator=g))).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(DEVICE, dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(DEVICE, dtype) if bias else None
    return x, w, b


def _float_product(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 64, 200), (5, 96, 320), (16, 64, 256), (3, 130, 512)])
def test_dense_linear_is_the_float_product_rounded_once(m, n, k, dtype, bias, swap_on):
    """The swap-AB kernel (float32 sums of exact products, split in two and added in order) against the product in
    float64: within one unit in the last place of the output dtype (plus the float32 sums' own error, far below
    it at these K), at row counts padded to 16, K not a multiple of the K step, N not one of 64."""
    x, w, b = _operands(m, n, k, dtype, bias)
    y = tk_dense.dense_linear(x, w, b)
    assert swap_on and y.dtype == dtype and y.shape == (m, n)
    want = _float_product(x, w, b)
    err = (y.double() - want).abs()
    bound = EPS[dtype] * want.abs() + 1e-6 * k**0.5
    assert bool((err <= bound).all()), f"worst {float((err - bound).max()):.3g} over the bound"


def test_dense_linear_keeps_a_leading_shape_and_strided_rows(swap_on):
    x, w, _ = _operands(6, 64, 128, torch.bfloat16, False)
    x3 = x.view(2, 3, 128)
    assert torch.equal(tk_dense.dense_linear(x3, w), tk_dense.dense_linear(x, w).view(2, 3, 64))
    wide = torch.zeros(6, 256, dtype=torch.bfloat16, device=DEVICE)
    wide[:, :128] = x
    assert torch.equal(tk_dense.dense_linear(wide[:, :128], w), tk_dense.dense_linear(x, w))


def test_dense_linear_leaves_its_split_parts_to_the_caller(swap_on):
    """parts=[] on a call that splits: the float32 partials [2, M, N], whose sum in split order (quant_fp8's sum
    kernel) is the output of the same call without parts; with a bias the call adds them itself."""
    x, w, b = _operands(2, 64, 256, torch.bfloat16, True)
    want = tk_dense.dense_linear(x, w)
    parts: list = []
    tk_dense.dense_linear(x, w, parts=parts)
    assert len(parts) == 1 and parts[0].shape == (2, 2, 64) and parts[0].dtype == torch.float32
    out = torch.empty_like(want)
    tk.add_split_parts(parts[0], out)
    assert torch.equal(out, want)
    parts = []
    assert torch.equal(tk_dense.dense_linear(x, w, b, parts=parts), tk_dense.dense_linear(x, w, b)) and parts == []


@pytest.mark.parametrize("name,dtype,splits,rows,rowmax", [("silu_and_mul", torch.bfloat16, 2, 1, False),
                                                          ("silu_and_mul", torch.float16, 3, 5, True),
                                                          ("gelu_tanh_and_mul", torch.bfloat16, 4, 2, False),
                                                          ("silu_and_mul", torch.float32, 2, 3, True)])
def test_the_gated_activation_adds_split_parts_as_the_sum_kernel_does(name, dtype, splits, rows, rowmax):
    """gated_from_split_parts on a gate_up GEMM's float32 partials [S, rows, 2d]: the same bits as the sum kernel
    (quant_fp8.add_split_parts into the GEMM's output dtype) followed by the op, and for the rowmax form the same
    partial row maxima; d = 1,100 spans two of the kernel's 1,024-column programs. Partials of the wrong shape or
    dtype: an error naming both."""
    from atom.ops.registry import resolve
    from atom.ops.triton_kernels.activation import gated_from_split_parts

    g = torch.Generator().manual_seed(splits * 10 + rows)
    d = 1100
    parts = (torch.randn(splits, rows, 2 * d, generator=g) * 2).to(DEVICE)
    out = torch.empty(rows, 2 * d, dtype=dtype, device=DEVICE)
    summed = torch.empty_like(out)
    tk.add_split_parts(parts, summed)
    op = resolve("silu_and_mul_rowmax" if rowmax else name, "triton")
    want = op(summed)
    got = gated_from_split_parts(name, parts, out, rowmax=rowmax)
    for a, b in zip(got, want, strict=True) if rowmax else [(got, want)]:
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="contiguous float32"):
        gated_from_split_parts(name, parts.to(torch.bfloat16), out)
    with pytest.raises(ValueError, match=f"{rows}, {2 * d}"):
        gated_from_split_parts(name, parts[:, :, :-2], out)


def test_dense_linear_runs_f_linear_where_the_kernel_does_not_apply(swap_on):
    """Above DENSE_SWAP_MAX_M rows, float32 and no rows: F.linear itself, no kernel launch; a wrong width: an error
    naming both."""
    x, w, b = _operands(65, 64, 128, torch.bfloat16, True)
    assert torch.equal(tk_dense.dense_linear(x, w, b), F.linear(x, w, b))
    xf, wf = x[:3].float(), w.float()
    assert torch.equal(tk_dense.dense_linear(xf, wf), F.linear(xf, wf))
    assert tk_dense.dense_linear(x[:0], w).shape == (0, 64)
    assert not swap_on
    with pytest.raises(ValueError, match="expects 128"):
        tk_dense.dense_linear(x[:, :100], w)


@pytest.mark.parametrize("raw,why", [("x", "must be an integer"), ("65", "between 0 and 64"), ("-1", "between 0 and 64")])
def test_the_row_bound_from_the_environment_is_checked(raw, why, monkeypatch):
    monkeypatch.setenv("ATOM_DENSE_SWAP_MAX_M", raw)
    with pytest.raises(ValueError, match=why):
        dense_ref._env_swap_max_m()
    monkeypatch.setenv("ATOM_DENSE_SWAP_MAX_M", "16")
    assert dense_ref._env_swap_max_m() == 16
    monkeypatch.delenv("ATOM_DENSE_SWAP_MAX_M")
    assert dense_ref._env_swap_max_m() is None  # unset: the platform's default, asked at build time
    monkeypatch.setattr(dense_ref, "DENSE_SWAP_MAX_M", None)
    assert dense_ref.swap_max_m() == (32 if torch.cuda.is_available() and not torch.version.hip else 0)
    monkeypatch.setattr(dense_ref, "DENSE_SWAP_MAX_M", 0)
    assert dense_ref.swap_max_m() == 0 and dense_ref.dense_linear_for(torch.bfloat16, 64, 64) is None


def test_the_tile_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("ATOM_DENSE_SWAP_TILE", '{"block_k": 256, "num_stages": 3}')
    assert tk_dense._env_tile() == {"block_k": 256, "num_stages": 3}
    for raw in ('{"block_m": 32}', "[1]", "{"):
        monkeypatch.setenv("ATOM_DENSE_SWAP_TILE", raw)
        with pytest.raises(ValueError, match="ATOM_DENSE_SWAP_TILE"):
            tk_dense._env_tile()


def _tiny_qwen3(tmp_path) -> str:
    import transformers

    config = transformers.Qwen3Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                      max_position_embeddings=64, torch_dtype="bfloat16")
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    return str(tmp_path / "bf16")


def _logits(path: str, monkeypatch):
    """Prefill of two prompts (14 rows) then a decode step (2 rows) on the Triton kernels; the logits, and the
    linears' dense_linear calls (prefix, rows)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from atom.loader import load_model
    from atom.ops import registry
    from atom.quantization.unquantized import UnquantizedLinearMethod
    from paged_harness import prefill_then_decode

    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)
    registry.forget_resolutions()
    model, _ = load_model(path, dtype="bfloat16", device=DEVICE, progress=False)
    calls = []
    for mod in model.modules():
        method = getattr(mod, "quant_method", None)
        if isinstance(method, UnquantizedLinearMethod) and method.linear is not None:
            inner = method.linear
            method.linear = lambda x, *a, _f=inner, _p=mod.prefix, **kw: (calls.append((_p, x.shape[0])),
                                                                          _f(x, *a, **kw))[1]
    logits = prefill_then_decode(model, DEVICE)
    registry.forget_resolutions()
    return logits, calls


def test_a_bf16_model_on_dense_linear_hands_its_splits_to_the_norms_and_keeps_its_logits(tmp_path, monkeypatch):
    """A 2-layer bf16 Qwen3 with every linear on dense_linear (its K split in two): o_proj and down_proj hand their
    partials to the next residual norm, and the logits of prefill + decode stay within bf16 rounding of F.linear's
    (cuBLAS / CPU) model: each linear's output is rounded once either way, from float32 sums in another order."""
    path = _tiny_qwen3(tmp_path)
    monkeypatch.setattr(dense_ref, "DENSE_SWAP_MAX_M", 0)
    want, calls = _logits(path, monkeypatch)
    assert calls == []  # off: the layers keep F.linear
    monkeypatch.setattr(dense_ref, "DENSE_SWAP_MAX_M", 16)
    monkeypatch.setattr(tk_dense, "TILE", dict(block_k=32, num_stages=2, split_k=2))
    monkeypatch.setattr(tk, "ATTN_SUMS_SPLITS", False)
    handed = spy_norm_hand_offs(monkeypatch)
    got, calls = _logits(path, monkeypatch)
    prefixes = {p.rsplit(".", 1)[-1] for p, _ in calls}
    assert prefixes == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, prefixes
    assert sorted({rows for _, rows in calls}) == [2, 14]
    # 2 layers x (o_proj, down_proj) x (prefill of 14 rows, decode of 2)
    assert sorted(handed) == sorted([(2, 14, 64)] * 4 + [(2, 2, 64)] * 4), handed
    err = (got - want).abs().max().item()
    assert err <= 0.05 * want.abs().max().item(), err
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_bf16_model_on_dense_linear_gives_the_same_bits_with_both_hand_offs(tmp_path, monkeypatch):
    """dense_linear split in two, the decode prep inside the attention kernel: with both hand-offs on
    (ATOM_FP8_ATTN_SUMS_SPLITS, ATOM_FP8_NORM_SUMS_SPLITS, which the dense linears follow too) qkv_proj's partials
    go to the attention kernel at the decode step, and the prefill's are added first (not a fused step); the
    logits are those of the sum kernel's path, bit for bit."""
    from atom.layers import attention as attention_layer

    path = _tiny_qwen3(tmp_path)
    monkeypatch.setattr(attention_layer, "FUSED_DECODE_PREP", True)
    monkeypatch.setattr(dense_ref, "DENSE_SWAP_MAX_M", 16)
    monkeypatch.setattr(tk_dense, "TILE", dict(block_k=32, num_stages=2, split_k=2))
    monkeypatch.setattr(tk, "ATTN_SUMS_SPLITS", False)
    monkeypatch.setattr(tk, "NORM_SUMS_SPLITS", False)
    want, _ = _logits(path, monkeypatch)
    prepped, summed = spy_attention_hand_offs(monkeypatch)
    monkeypatch.setattr(tk, "ATTN_SUMS_SPLITS", True)
    monkeypatch.setattr(tk, "NORM_SUMS_SPLITS", True)
    got, _ = _logits(path, monkeypatch)
    assert prepped == [False] * 2 + [True] * 2, prepped  # 2 layers: the prefill, then the decode step
    assert summed == [(2, 14, 128)] * 2, summed  # the prefill's qkv (64 q + 2 x 32 kv columns)
    assert torch.equal(got, want)


def test_a_bf16_model_gives_the_same_bits_with_the_activation_adding_gate_up_parts(tmp_path, monkeypatch):
    """dense_linear split in two, the norms' and the attention's hand-offs on: with ATOM_FP8_ACT_SUMS_SPLITS each
    dense MLP's gate_up_proj hands its partials to the gated activation (prefill and decode), and the logits are
    those of the sum kernel's path, bit for bit; off, no activation takes partials."""
    path = _tiny_qwen3(tmp_path)
    monkeypatch.setattr(dense_ref, "DENSE_SWAP_MAX_M", 16)
    monkeypatch.setattr(tk_dense, "TILE", dict(block_k=32, num_stages=2, split_k=2))
    handed = spy_activation_hand_offs(monkeypatch)
    monkeypatch.setattr(tk, "ACT_SUMS_SPLITS", False)
    want, _ = _logits(path, monkeypatch)
    assert handed == []
    monkeypatch.setattr(tk, "ACT_SUMS_SPLITS", True)
    got, _ = _logits(path, monkeypatch)
    # 2 layers x (prefill of 14 rows, decode of 2); gate | up = 2 x 96 columns
    assert sorted(handed) == sorted([(2, 14, 192)] * 2 + [(2, 2, 192)] * 2), handed
    assert torch.equal(got, want)
