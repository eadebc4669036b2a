"""FP8 torch reference ops (atom.ops.quant_fp8, FP8 KV cache) against independent formulations.

The quantizer is checked against a nearest-value search over every e4m3 code (ties to the even code),
computed in numpy float32; the linear against a sum of per-group partial dots in float64; the experts
against a per-token composition of fp8_linear calls; the FP8 KV cache against the float path run on the
dequantized cache. Random inputs are fresh each run (conftest.py); deliberate edge rows (tiny values,
partial groups) are added on top.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

from atom.ops import attention as ref_attn
from atom.ops import moe as ref_moe
from atom.ops import quant_fp8 as Q
from atom.ops.qk_norm_rope_cache import qk_norm_rope_cache

sys.path.insert(0, os.path.dirname(__file__))
from fp8_helpers import make_fp8_experts  # noqa: E402

FP8 = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]


def _codes(dtype: torch.dtype) -> np.ndarray:
    """Every finite value of an FP8 dtype, sorted, with the code of each (for tie-breaking)."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float().numpy()
    codes = np.arange(256)
    keep = np.isfinite(values)
    values, codes = values[keep], codes[keep]
    order = np.lexsort((codes, values))
    return values[order], codes[order]


def nearest_e4m3(y: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Round-to-nearest onto the FP8 grid by search; ties go to the code with an even mantissa (even code)."""
    values, codes = _codes(dtype)
    flat = y.reshape(-1).astype(np.float64)
    dist = np.abs(flat[:, None] - values[None, :])
    best = dist.min(axis=1, keepdims=True)
    tie_ok = (dist == best) & ((codes[None, :] & 1) == 0)
    pick = np.where(tie_ok.any(axis=1), np.argmax(tie_ok, axis=1), np.argmin(dist, axis=1))
    out = values[pick]
    return np.where(flat == 0, flat, out).reshape(y.shape).astype(np.float32)


def loop_quantize(x: torch.Tensor, group: int | None, dtype: torch.dtype):
    """The documented convention, group by group, in numpy float32: (x_hat, scales)."""
    fmax, floor = np.float32(Q.fp8_max(dtype)), np.float32(Q.fp8_min_scale(dtype))
    rows = x.float().numpy()
    k = rows.shape[1]
    size = group or k
    xh = np.zeros_like(rows)
    scales = []
    for r in range(rows.shape[0]):
        row_scales = []
        for g0 in range(0, k, size):
            chunk = rows[r, g0:g0 + size]
            s = max(np.float32(np.abs(chunk).max()) / fmax, floor)
            q = nearest_e4m3(np.clip(chunk / s, -fmax, fmax), dtype)
            xh[r, g0:g0 + size] = q * s
            row_scales.append(s)
        scales.append(row_scales)
    return torch.from_numpy(xh), torch.tensor(scales, dtype=torch.float32)


def _activations(rows: int, k: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(rows, k) * torch.rand(rows, 1) * 8
    x[0, : k // 3] *= 1e-5  # a row whose first group is tiny next to the rest
    x[-1] *= 1e-5  # a row under the scale floor: amax / fp8_max < 1 / (fp8_max * 512), i.e. amax < 1/512
    return x.to(dtype)


@pytest.mark.parametrize("dtype", FP8)
def test_torch_cast_is_nearest_even_on_the_e4m3_grid(dtype):
    """The reference relies on torch's float32 -> FP8 cast rounding to nearest, ties to even."""
    values, _ = _codes(dtype)
    fmax = Q.fp8_max(dtype)
    mids = (values[1:] + values[:-1]) / 2  # exact ties
    y = np.concatenate([mids, np.random.uniform(-fmax, fmax, 3000), np.random.uniform(-0.05, 0.05, 1000)])
    y = np.clip(y, -fmax, fmax).astype(np.float32)
    got = torch.from_numpy(y).to(dtype).float().numpy()
    np.testing.assert_array_equal(got, nearest_e4m3(y, dtype))


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("group", [128, 32, None])
def test_activation_quantization_matches_the_convention(dtype, group):
    x = _activations(5, 300, torch.bfloat16)  # 300: the last 128-group is partial
    if group is None:
        q, s = Q.per_token_quant_fp8(x, dtype)
    else:
        q, s = Q.per_token_group_quant_fp8(x, group, dtype)
    assert q.dtype == dtype and s.dtype == torch.float32 and q.shape == x.shape
    assert s.shape == (5, 1 if group is None else math.ceil(300 / group))
    want_xh, want_s = loop_quantize(x, group, dtype)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    torch.testing.assert_close(Q.dequantize_activations(q, s, group), want_xh, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("block_size", [[128, 128], None])
def test_activation_error_within_the_derived_bound(dtype, block_size):
    x = _activations(7, 520)
    xh = Q.fake_quantize_activations(x, block_size, dtype)
    _, s = Q.quantize_activations(x, block_size, dtype)
    s_full = Q.dequantize_activations(torch.ones_like(x), s, None if block_size is None else block_size[1])
    err = (xh - x).abs()
    bound = 2.0**-4 * x.abs() + 2.0**-10 * s_full
    assert bool((err <= bound).all()), float((err / bound).max())
    # a group's largest element maps to +-fp8_max exactly (no range wasted), except under the scale floor
    q, s = Q.quantize_activations(x, block_size, dtype)
    top = q.float().abs()
    if block_size is not None:
        top = torch.nn.functional.pad(top, (0, s.shape[1] * block_size[1] - top.shape[1]))
        top = top.view(top.shape[0], s.shape[1], -1)
    top = top.amax(-1).view(s.shape)
    floored = s == Q.fp8_min_scale(dtype)
    assert floored[-1].all() and top[~floored].eq(Q.fp8_max(dtype)).all() and (top[floored] < Q.fp8_max(dtype)).all()


@pytest.mark.parametrize("scheme", ["channel", "tensor", "block"])
@pytest.mark.parametrize("dtype", FP8)
def test_weight_quantization_round_trip(scheme, dtype):
    w = torch.randn(200, 300) * (0.05 + torch.rand(200, 1))  # neither dim a multiple of 128: partial blocks
    q, s = Q.quantize_weight_fp8(w, scheme, (128, 128), dtype)
    want_shape = {"channel": (200, 1), "tensor": (), "block": (2, 3)}[scheme]
    assert q.dtype == dtype and tuple(s.shape) == want_shape and s.dtype == torch.float32
    block = [128, 128] if scheme == "block" else None
    wh = Q.dequantize_weight(q, s, block)
    full = Q.expand_weight_scale(s, 200, 300, block)
    assert bool(((wh - w).abs() <= 2.0**-4 * w.abs() + 2.0**-10 * full).all())
    # each scale group holds +-fp8_max (scale = amax / fp8_max)
    qa = q.float().abs()
    if scheme == "channel":
        assert qa.amax(1).eq(Q.fp8_max(dtype)).all()
    elif scheme == "tensor":
        assert qa.max() == Q.fp8_max(dtype)
    else:
        assert qa[:128, :128].max() == qa[128:, 256:].max() == Q.fp8_max(dtype)


def test_weight_quantization_matches_compressed_tensors():
    """llm-compressor's own FP8 channel quantization, given the same scale, gives the same codes."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    # in float32 (compressed-tensors divides in the weight's dtype; ATOM always divides in float32)
    w = torch.randn(96, 80) * torch.rand(96, 1)
    q, s = Q.quantize_weight_fp8(w, "channel")
    theirs = quantize(w, s, torch.zeros_like(s), args, dtype=torch.float8_e4m3fn)
    assert torch.equal(theirs.float(), q.float()), ct.__version__
    # a bf16 checkpoint stores its scales in bf16; both dequantize it the same way
    q, s = Q.quantize_weight_fp8(w.to(torch.bfloat16), "channel", scale_dtype=torch.bfloat16)
    assert s.dtype == torch.bfloat16 and s.shape == (96, 1)
    torch.testing.assert_close(dequantize(q, s, args=args).to(torch.bfloat16),
                               Q.dequantize_weight(q, s).to(torch.bfloat16), rtol=0, atol=0)


def test_e4m3fn_to_e4m3fnuz_keeps_dequantized_values():
    w = torch.randn(64, 96)
    q, s = Q.quantize_weight_fp8(w, "block", (32, 32))
    q.view(torch.uint8)[0, :4] = 0x80  # e4m3fn -0: NaN in e4m3fnuz unless converted
    qz, sz = Q.e4m3fn_to_e4m3fnuz(q, s)
    assert qz.dtype == torch.float8_e4m3fnuz and not torch.isnan(qz.float()).any()
    torch.testing.assert_close(Q.dequantize_weight(qz, sz, [32, 32]), Q.dequantize_weight(q, s, [32, 32]),
                               rtol=0, atol=0)


def _grouped_dot(x, q, s, block_size, dtype) -> torch.Tensor:
    """y[m, n] = sum over K groups of (xq . wq) * s_x * s_w, in float64 (the kernels' formula)."""
    n, k = q.shape
    bk = block_size[1] if block_size else k
    xq, xs = Q.quantize_activations(x, block_size, dtype)
    ws = Q.expand_weight_scale(s, n, k, block_size).double()
    y = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for g, k0 in enumerate(range(0, k, bk)):
        part = xq[:, k0:k0 + bk].double() @ q[:, k0:k0 + bk].double().t()
        y += part * xs[:, g if block_size else 0].double()[:, None] * ws[:, k0][None, :]
    return y


@pytest.mark.parametrize("layout", ["block", "channel", "tensor"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_grouped_dot_and_bound(layout, xdtype):
    dtype = torch.float8_e4m3fn
    w = torch.randn(200, 300) / 300**0.5
    q, s = Q.quantize_weight_fp8(w, layout, (128, 128), dtype)
    block = [128, 128] if layout == "block" else None
    x = _activations(6, 300, xdtype)
    bias = torch.randn(200).to(xdtype)
    y = Q.fp8_linear(x, q, s, bias, block)
    assert y.dtype == xdtype and y.shape == (6, 200)
    want = _grouped_dot(x, q, s, block, dtype) + bias.double()
    tol = 1e-5 if xdtype == torch.float32 else 8e-3
    torch.testing.assert_close(y.double(), want.to(xdtype).double(), rtol=tol, atol=tol * want.abs().max().item())
    # vs the unquantized matmul on the same (dequantized) weight: activation quantization error only
    wh = Q.dequantize_weight(q, s, block)
    exact = x.float() @ wh.t() + bias.float()
    bound = Q.activation_error_bound(x, wh, block, dtype) + 2.0**-8 * exact.abs() + 1e-6
    assert bool(((y.float() - exact).abs() <= bound).all())
    rel = ((y.float() - exact).norm() / exact.norm()).item()
    print(f"ERR fp8_linear {layout} {xdtype} vs unquantized activations: rel={rel:.3e}")
    assert rel < 0.05


def test_fp8_linear_row_expanded_block_scales_are_the_same_layout():
    from atom.loader.fp8_format import row_expanded_block_scale

    q, s = Q.quantize_weight_fp8(torch.randn(200, 256), "block", (128, 128))
    x = torch.randn(3, 256)
    rows = row_expanded_block_scale(s, 200, 128)
    assert rows.shape == (200, 2)
    torch.testing.assert_close(Q.fp8_linear(x, q, rows, None, [1, 128]), Q.fp8_linear(x, q, s, None, [128, 128]),
                               rtol=0, atol=0)


def test_fp8_linear_errors_name_the_problem():
    q, s = Q.quantize_weight_fp8(torch.randn(200, 256), "block", (128, 128))
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match=r"block scale has shape \(2, 2\).*\[128, 64\] needs \[2, 4\]"):
        Q.fp8_linear(x, q, s, None, [128, 64])
    with pytest.raises(ValueError, match="per-channel scale"):
        Q.fp8_linear(x, q, s, None, None)
    with pytest.raises(ValueError, match="input has 255 features"):
        Q.fp8_linear(torch.randn(2, 255), q, s, None, [128, 128])
    with pytest.raises(ValueError, match="must be float8_e4m3fn"):
        Q.fp8_linear(x, q.float(), s, None, [128, 128])
    with pytest.raises(ValueError, match="bias has shape"):
        Q.fp8_linear(x, q, s, torch.randn(3), [128, 128])
    with pytest.raises(ValueError, match="block_size must be two positive ints"):
        Q.fp8_linear(x, q, s, None, [128])


@pytest.mark.parametrize("skipped", [False, True])
@pytest.mark.parametrize("block_size", [[32, 32], None])
def test_fp8_fused_experts_is_the_per_token_composition_of_fp8_linear(block_size, skipped):
    from atom.ops.activation import silu_and_mul

    tokens, hidden, inter, e, k = 5, 80, 48, 4, 2  # inter 48: gate/up block rows do not align with 32
    w13, w2, s13, s2 = make_fp8_experts(e, hidden, inter, block_size)
    x = torch.randn(tokens, hidden)
    weights, ids = ref_moe.moe_topk_softmax(torch.randn(tokens, e), k, True)
    if skipped:  # expert parallelism: pairs routed to another rank's expert are -1 and contribute nothing
        ids[::2, 0] = -1
        ids[1, :] = -1
    out = Q.fp8_fused_experts(x, w13, w2, s13, s2, weights, ids, "silu", block_size)
    want = torch.zeros(tokens, hidden)
    # The fused path computes gate|up of an expert's tokens in one product, the composition one token and one
    # projection at a time: float sums that may differ in the last bit, which can send an element of h to the
    # neighbouring FP8 code when it sits at a rounding midpoint (seed 1982398286: one token's row, 1e-4). Each
    # token's difference is bounded by twice the hard activation-quantization bound of its down projections.
    bound = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(k):
            ex = int(ids[t, j])
            if ex < 0:
                continue
            half = s13[ex].shape[0] // 2
            gate = Q.fp8_linear(x[t:t + 1], w13[ex, :inter], s13[ex, :half], None, block_size)
            up = Q.fp8_linear(x[t:t + 1], w13[ex, inter:], s13[ex, half:], None, block_size)
            h = silu_and_mul(torch.cat([gate, up], -1))
            want[t] += weights[t, j] * Q.fp8_linear(h, w2[ex], s2[ex], None, block_size)[0]
            w2_hat = Q.dequantize_weight(w2[ex], s2[ex], block_size)
            bound[t] += weights[t, j] * 2 * Q.activation_error_bound(h, w2_hat, block_size, w2.dtype)[0]
    diff = (out - want).abs()
    assert (diff <= bound + 1e-5).all(), (diff - bound).max()
    # and where no code turned (nearly every draw: every token) the two agree to float rounding
    same_rows = (diff <= 1e-5 + 1e-5 * want.abs()).all(dim=1)
    assert same_rows.sum() >= tokens - 1, diff.max(dim=1).values
    # and near the float experts on the dequantized weights (activation quantization only)
    d13 = torch.stack([Q.dequantize_expert_w13(w13[i], s13[i], block_size) for i in range(e)])
    d2 = torch.stack([Q.dequantize_weight(w2[i], s2[i], block_size) for i in range(e)])
    ref = ref_moe.fused_experts(x, d13, d2, weights, ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"ERR fp8_fused_experts {block_size} vs float experts: rel={rel:.3e}")
    assert rel < 0.08


def test_fp8_fused_experts_errors():
    w13, w2, s13, s2 = make_fp8_experts(3, 64, 32, [32, 32])
    x = torch.randn(2, 64)
    weights, ids = ref_moe.moe_topk_softmax(torch.randn(2, 3), 2, True)
    with pytest.raises(ValueError, match=r"w13 block scale has shape \(3, 2, 2\), expected \(3, 4, 2\)"):
        Q.fp8_fused_experts(x, w13, w2, s13, s2, weights, ids, "silu", [16, 32])
    with pytest.raises(ValueError, match="per-channel scale"):
        Q.fp8_fused_experts(x, w13, w2, s13, s2, weights, ids, "silu", None)
    with pytest.raises(ValueError, match="share one FP8 dtype"):
        Q.fp8_fused_experts(x, w13, w2.view(torch.float8_e4m3fnuz), s13, s2, weights, ids, "silu", [32, 32])


# ---------------------------------------------------------------- FP8 KV cache


def _paged(ctx_lens, q_lens, heads, kv_heads, dim, block_size):
    """Random float caches behind shuffled block tables, with queries for the last q_lens tokens."""
    nblk = [-(-n // block_size) for n in ctx_lens]
    total = sum(nblk) + 2
    perm = torch.randperm(total)
    tables = torch.zeros(len(ctx_lens), max(nblk), dtype=torch.int32)
    used = 0
    for b, n in enumerate(nblk):
        tables[b, :n] = perm[used:used + n].int()
        used += n
    kc, vc = torch.randn(total, block_size, kv_heads, dim), torch.randn(total, block_size, kv_heads, dim)
    qsl = torch.tensor([0] + list(q_lens)).cumsum(0).int()
    q = torch.randn(int(qsl[-1]), heads, dim)
    return q, kc, vc, tables, qsl, torch.tensor(ctx_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("with_scale", [True, False])
def test_fp8_kv_write_stores_value_over_scale(dtype, with_scale):
    tokens, heads, dim, block_size, blocks = 9, 2, 16, 4, 6
    key, value = torch.randn(tokens, heads, dim) * 3, torch.randn(tokens, heads, dim) * 3
    slots = torch.randperm(blocks * block_size)[:tokens]
    slots[::4] = -1
    k_scale, v_scale = (torch.tensor(0.05 + torch.rand(()).item()), torch.tensor([1.5])) if with_scale else (None, None)
    k_cache = torch.randn(blocks, block_size, heads, dim).to(dtype)
    v_cache = torch.randn(blocks, block_size, heads, dim).to(dtype)
    before = k_cache.clone()
    ref_attn.reshape_and_cache(key, value, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    ks = 1.0 if k_scale is None else k_scale.item()
    flat = k_cache.view(-1, heads, dim).float()
    fmax = Q.fp8_max(dtype)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want = nearest_e4m3(np.clip((key[t] / ks).numpy(), -fmax, fmax), dtype)
            np.testing.assert_array_equal(flat[slot].numpy(), want)
    untouched = torch.ones(blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(k_cache.view(-1, heads, dim).view(torch.uint8)[untouched],
                       before.view(-1, heads, dim).view(torch.uint8)[untouched])


@pytest.mark.parametrize("dtype", FP8)
def test_paged_attention_reads_fp8_cache_as_entry_times_scale(dtype):
    q, kc, vc, tables, qsl, lens = _paged([5, 12, 2], [1, 4, 1], 4, 2, 16, 4)
    k8, v8 = (kc * 3).to(dtype), (vc * 3).to(dtype)
    ks, vs = torch.tensor(0.7), torch.tensor(1.3)
    got = ref_attn.paged_attention(q, k8, v8, tables, qsl, lens, 0.25, k_scale=ks, v_scale=vs)
    # FP8 caches take the padded formulation (float caches on CPU go row by row): compare within one formulation
    want = ref_attn.paged_attention_padded(q, k8.float() * ks, v8.float() * vs, tables, qsl, lens, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # scales are ignored for float caches (as vLLM's "auto" cache dtype)
    plain = ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, 0.25)
    torch.testing.assert_close(ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, 0.25, k_scale=ks, v_scale=vs),
                               plain, rtol=0, atol=0)


def test_fp8_kv_cache_attention_error_vs_float_cache():
    """Attention over an FP8 cache (scale 1, unit-size keys/values) stays within a few percent of the float
    cache: each key/value entry carries <= 2^-4 relative rounding error."""
    q, kc, vc, tables, qsl, lens = _paged([40, 7], [1, 1], 4, 2, 32, 8)
    out_f = ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, 32**-0.5)
    out_8 = ref_attn.paged_attention(q, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), tables, qsl, lens,
                                     32**-0.5)
    rel = ((out_8 - out_f).norm() / out_f.norm()).item()
    print(f"ERR paged_attention fp8 KV vs float KV: rel={rel:.3e}")
    assert rel < 2.0**-4


def test_qk_norm_rope_cache_writes_fp8_through_reshape_and_cache():
    t, hq, hk, d = 6, 4, 2, 16
    pos = torch.randint(0, 32, (t,))
    cs = torch.randn(32, d)
    q, k, v = torch.randn(t, hq * d), torch.randn(t, hk * d), torch.randn(t, hk * d)
    slots = torch.randperm(40)[:t]
    caches = [torch.zeros(10, 4, hk, d, dtype=torch.float8_e4m3fn) for _ in range(2)]
    ks, vs = torch.tensor(0.5), torch.tensor(2.0)
    _, rk = qk_norm_rope_cache(pos, q, k, v, None, None, 1e-6, d, cs, True, *caches, slots, ks, vs)
    fk = caches[0].view(-1, hk, d)[slots].float()
    fv = caches[1].view(-1, hk, d)[slots].float()
    assert torch.equal(fk, (rk.view(t, hk, d) / 0.5).to(torch.float8_e4m3fn).float())
    assert torch.equal(fv, (v.view(t, hk, d) / 2.0).to(torch.float8_e4m3fn).float())
