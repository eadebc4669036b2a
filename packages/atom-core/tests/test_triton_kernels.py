"""Triton kernels vs their torch references, on fresh random inputs, in the precision they run in.

Without a GPU the kernels run under Triton's interpreter, which must be switched on before triton is
imported, so this module runs as its own pytest process on CPU:
    TRITON_INTERPRET=1 pytest packages/atom-core/tests/test_triton_*.py
(setting the variable from here would leak into every other test of a shared session). The "large" cases
need a GPU and are skipped otherwise. Each check prints an `ERR` line (max abs / relative-norm error)
for the report (`pytest -s`).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run this module alone with TRITON_INTERPRET=1 (Triton's CPU interpreter)",
                allow_module_level=True)

triton = pytest.importorskip("triton")

from atom.ops import activation as ref_act  # noqa: E402
from atom.ops import attention as ref_attn  # noqa: E402
from atom.ops import moe as ref_moe  # noqa: E402
from atom.ops import norm as ref_norm  # noqa: E402
from atom.ops import rope as ref_rope  # noqa: E402
from atom.ops import sampling as ref_sampling  # noqa: E402
from atom.ops.registry import resolve  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from launch_spy import spy_launches  # noqa: E402

ON_GPU = torch.cuda.is_available()

DEVICE = "cuda" if ON_GPU else "cpu"
LARGE = pytest.param("large", marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")])
SIZES = ["tiny", LARGE]
# Relative-norm error bounds: bf16 rounding; fp32 is exact IEEE (the kernels' float32 dots do not use TF32:
# float32 is the correctness mode). The interpreter (triton 3.9) truncates fp32 -> bf16 instead of rounding
# to nearest, which about doubles bf16 errors.
TOL = {torch.bfloat16: 1.6e-2 if ON_GPU else 3e-2, torch.float32: 1e-5}


def triton_op(name: str):
    return resolve(name, "triton")


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    o, r = out.double(), ref.double()
    assert not torch.isnan(o).any(), f"{name}: NaN in output"
    max_abs = (o - r).abs().max().item() if o.numel() else 0.0
    rel = ((o - r).norm() / r.norm().clamp_min(1e-30)).item() if o.numel() else 0.0
    print(f"ERR {name}: max_abs={max_abs:.3e} rel={rel:.3e}")
    assert rel < tol, f"{name}: relative error {rel:.3e} >= {tol:.1e} (max abs {max_abs:.3e})"


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


DTYPES = [torch.float32, torch.bfloat16]


# ---------------------------------------------------------------- norm
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(size, dtype):
    rows, hidden = (5, 96) if size == "tiny" else (4096, 4096)
    x, w = rand(rows, hidden, dtype=dtype), rand(hidden, dtype=dtype)
    check(f"rms_norm {size} {dtype}", triton_op("rms_norm")(x, w, 1e-6), ref_norm.rms_norm(x, w, 1e-6), TOL[dtype])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(size, dtype):
    rows, hidden = (6, 80) if size == "tiny" else (4096, 4096)
    x, res, w = rand(rows, hidden, dtype=dtype), rand(rows, hidden, dtype=dtype), rand(hidden, dtype=dtype)
    res_before = res.clone()
    out, new_res = triton_op("fused_add_rms_norm")(x, res, w, 1e-5)
    ref_out, ref_res = ref_norm.fused_add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(res, res_before), "the residual input must not be modified (the reference returns a new one)"
    check(f"fused_add_rms_norm.out {size} {dtype}", out, ref_out, TOL[dtype])
    check(f"fused_add_rms_norm.residual {size} {dtype}", new_res, ref_res, TOL[dtype])


# ---------------------------------------------------------------- rope
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("partial", [False, True])
def test_rotary_embedding(size, is_neox, partial):
    if size == "tiny":
        tokens, hq, hk, head_dim, dtype = 5, 4, 2, 16, torch.float32
    else:
        tokens, hq, hk, head_dim, dtype = 4096, 32, 8, 128, torch.bfloat16
    rot_dim = head_dim // 2 if partial else head_dim
    max_pos = 64 if size == "tiny" else 8192
    cos_sin = rand(max_pos, rot_dim)
    positions = torch.randint(0, max_pos, (tokens,), device=DEVICE)
    # q and k as views of one fused qkv projection, as the attention layer produces them
    qkv = rand(tokens, (hq + 2 * hk) * head_dim, dtype=dtype)
    q, k = qkv[:, : hq * head_dim], qkv[:, hq * head_dim : (hq + hk) * head_dim]
    oq, ok = triton_op("rotary_embedding")(positions, q, k, head_dim, cos_sin, is_neox)
    rq, rk = ref_rope.rotary_embedding(positions, q, k, head_dim, cos_sin, is_neox)
    name = f"rotary_embedding {size} neox={is_neox} rot_dim={rot_dim}"
    check(name + " q", oq, rq, TOL[dtype])
    check(name + " k", ok, rk, TOL[dtype])


# ---------------------------------------------------------------- activation
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("op", ["silu_and_mul", "gelu_tanh_and_mul"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_activation(size, op, dtype):
    shape = (2, 3, 2 * 40) if size == "tiny" else (4096, 2 * 14336)
    x = rand(*shape, dtype=dtype, scale=2.0)
    check(f"{op} {size} {dtype}", triton_op(op)(x), getattr(ref_act, op)(x), TOL[dtype])


# ---------------------------------------------------------------- KV cache + attention
def _paged_case(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    """Random caches (never zeros), shuffled block tables, and the matching metadata."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    blocks_per_seq = [triton.cdiv(s, block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, device=DEVICE)
    width = max(blocks_per_seq)
    tables = torch.zeros(len(q_lens), width, dtype=torch.int32, device=DEVICE)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used : used + n].int()
        used += n
    k_cache = rand(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = rand(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    qsl = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).int()
    q = rand(int(qsl[-1]), num_heads, head_dim, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, tables, qsl, lens, max(q_lens), max(seq_lens)


@pytest.mark.parametrize("size", SIZES)
def test_reshape_and_cache(size):
    tokens, kv_heads, head_dim, block_size, num_blocks, dtype = (
        (7, 2, 16, 4, 5, torch.float32) if size == "tiny" else (4096, 8, 128, 16, 1024, torch.bfloat16))
    kv = rand(tokens, 2 * kv_heads, head_dim, dtype=dtype)
    key, value = kv[:, :kv_heads], kv[:, kv_heads:]  # strided views, as split from a fused projection
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    slots[::3] = -1  # padding tokens are not written
    k_cache = rand(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = rand(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    rk, rv = k_cache.clone(), v_cache.clone()
    triton_op("reshape_and_cache")(key, value, k_cache, v_cache, slots)
    ref_attn.reshape_and_cache(key, value, rk, rv, slots)
    assert torch.equal(k_cache, rk) and torch.equal(v_cache, rv)
    print(f"ERR reshape_and_cache {size}: exact")


ATTN_CASES = {
    # name: (q_lens, ctx_lens, Hq, Hkv, head_dim, block_size, window, softcap, num_splits)
    "decode": ([1, 1, 1], [9, 30, 2], 4, 2, 32, 4, None, None, None),
    "decode_split": ([1, 1], [37, 70], 4, 1, 32, 4, None, None, 4),
    "decode_window_softcap": ([1, 1], [20, 45], 6, 2, 32, 8, 16, 30.0, 2),
    "prefill_prefix": ([5, 19, 1], [0, 14, 33], 4, 2, 32, 4, None, None, None),
    "prefill_window_softcap": ([17, 6], [10, 0], 4, 4, 16, 4, 7, 20.0, None),
    # head_dim below its power-of-two tile (column masks), pages of 6 keys (not a power of two)
    "decode_head_dim_40_page_6": ([1, 1, 1], [9, 30, 2], 4, 2, 40, 6, None, None, 2),
    "prefill_head_dim_40_page_6": ([5, 11], [0, 14], 4, 2, 40, 6, None, None, None),
}
LARGE_ATTN_CASES = {
    "decode_bs128": ([1] * 128, None, 32, 8, 128, 16, None, None, None),
    "prefill_bs4": ([1024, 512, 300, 77], [0, 1536, 1000, 3000], 32, 8, 128, 16, None, None, None),
    "prefill_window": ([700, 256], [300, 2000], 32, 8, 128, 16, 512, 50.0, None),
}


def _run_attention(name, case, dtype):
    q_lens, ctx_lens, hq, hkv, head_dim, block_size, window, softcap, splits = case
    if ctx_lens is None:  # decode at realistic contexts, 1..4k
        ctx_lens = torch.randint(1, 4096, (len(q_lens),)).tolist()
    q, kc, vc, tables, qsl, lens, max_q, max_l = _paged_case(q_lens, ctx_lens, hq, hkv, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    from atom.ops.triton_kernels.attention import paged_attention_impl

    out = paged_attention_impl(q, kc, vc, tables, qsl, lens, scale, window, softcap, max_q, max_l, num_splits=splits)
    ref = ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, scale, window, softcap, max_q, max_l)
    check(f"paged_attention {name} {dtype}", out, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ATTN_CASES))
def test_paged_attention(name, dtype):
    _run_attention(name, ATTN_CASES[name], dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)  # float32: the tiles must shrink to fit shared memory
@pytest.mark.parametrize("name", sorted(LARGE_ATTN_CASES))
def test_paged_attention_large(name, dtype):
    _run_attention(name, LARGE_ATTN_CASES[name], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["decode", "decode_split", "prefill_prefix", "decode_head_dim_40_page_6",
                                  "prefill_head_dim_40_page_6"])
def test_paged_attention_stores_per_head_maxima(name, dtype):
    """maxima= (o_proj's per-head row maxima, fp8_linear_rowmax): every (token, head) gets the absolute maximum of
    its stored output row, from the unsplit kernel, the merge kernel and the prefill tiles alike; the output is
    the same bits as without it; a wrong buffer is refused."""
    from atom.ops.triton_kernels.attention import paged_attention_impl

    q_lens, ctx_lens, hq, hkv, head_dim, block_size, window, softcap, splits = ATTN_CASES[name]
    q, kc, vc, tables, qsl, lens, max_q, max_l = _paged_case(q_lens, ctx_lens, hq, hkv, head_dim, block_size, dtype)
    args = (q, kc, vc, tables, qsl, lens, head_dim**-0.5, window, softcap, max_q, max_l)
    want = paged_attention_impl(*args, num_splits=splits)
    maxima = torch.full((q.shape[0], hq), -1.0, device=DEVICE)
    got = paged_attention_impl(*args, num_splits=splits, maxima=maxima)
    assert torch.equal(got, want)
    assert torch.equal(maxima, want.float().abs().amax(-1))
    with pytest.raises(ValueError, match="maxima"):
        paged_attention_impl(*args, num_splits=splits, maxima=maxima[:, :1])


@pytest.mark.parametrize("name", ["decode_split", "prefill_prefix"])
def test_paged_attention_int64_offsets_equal_int32(monkeypatch, name):
    """Caches of 2^31 elements or more address keys with int64 offsets (OFF32_LIMIT); both give the same bits."""
    from atom.ops.triton_kernels import attention as tk_attn

    q_lens, ctx_lens, hq, hkv, head_dim, block_size, window, softcap, splits = ATTN_CASES[name]
    q, kc, vc, tables, qsl, lens, max_q, max_l = _paged_case(q_lens, ctx_lens, hq, hkv, head_dim, block_size,
                                                             torch.float32)
    outs = []
    for limit in (2**31, 0):
        monkeypatch.setattr(tk_attn, "OFF32_LIMIT", limit)
        outs.append(tk_attn.paged_attention_impl(q, kc, vc, tables, qsl, lens, head_dim**-0.5, window, softcap, max_q,
                                                 max_l, num_splits=splits))
    assert torch.equal(outs[0], outs[1])
    # the offsets' range counts a strided view's gaps: a view of every other block spans twice its elements
    both = torch.zeros(6, 2, 4, 2, 8)
    assert tk_attn._span(both[:, 0]) == 5 * 128 + 63 + 1 > both[:, 0].numel()


@pytest.mark.parametrize("per_sequence", [True, False])
def test_paged_attention_decode_splits_under_a_graph_span(monkeypatch, per_sequence):
    """A CUDA graph passes max_model_len as max_seq_len: the splits cut each sequence's own keys
    (SPLIT_PER_SEQUENCE) or the graph's span (the old rule); both must equal the reference, with contexts far
    below the span, one of them shorter than a key tile, and a sliding window. The programs' order on the grid
    (SPLIT_MAJOR or head-major) changes no bit: each program computes the same split of the same head."""
    from atom.ops.triton_kernels import attention as tk

    monkeypatch.setattr(tk, "SPLIT_PER_SEQUENCE", per_sequence)
    for window in (None, 24):
        q, kc, vc, tables, qsl, lens, max_q, _ = _paged_case([1, 1, 1], [5, 70, 200], 4, 2, 32, 4, torch.float32)
        outs = []
        for split_major in (True, False):
            monkeypatch.setattr(tk, "SPLIT_MAJOR", split_major)
            outs.append(tk.paged_attention_impl(q, kc, vc, tables, qsl, lens, 32**-0.5, window, None, 1, 4096,
                                                num_splits=8))
        ref = ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, 32**-0.5, window, None, 1, 4096)
        check(f"paged_attention graph span per_sequence={per_sequence} window={window}", outs[0], ref,
              TOL[torch.float32])
        assert torch.equal(outs[0], outs[1])


def prefill_graph_layout(queries, tables, qsl, lens, block_size: int, bucket: int, rows: int):
    """A step's attention inputs in the layout of atom-server's prefill graphs (prefill_graphs.py): `bucket` token
    entries and `rows` rows; the step's rows first, then one padding row whose random queries fill the remaining
    entries over its own keys (a zeroed table row: block 0), then rows without queries. Returns the padded query
    tensors (each [T, ...] -> [bucket, ...]), block tables, query_start_loc and seq_lens."""
    t, n = queries[0].shape[0], lens.shape[0]
    pad = bucket - t
    padded = [torch.cat([x, rand(pad, *x.shape[1:])]) for x in queries]
    g_tables = torch.zeros(rows, max(tables.shape[1], triton.cdiv(pad, block_size)), dtype=torch.int32,
                           device=DEVICE)
    g_tables[:n, :tables.shape[1]] = tables
    g_qsl = torch.full((rows + 1,), bucket, dtype=torch.int32, device=DEVICE)
    g_qsl[:n + 1] = qsl
    g_lens = torch.zeros(rows, dtype=torch.int32, device=DEVICE)
    g_lens[:n] = lens
    g_lens[n] = pad
    return padded, g_tables, g_qsl, g_lens


@pytest.mark.parametrize("name", ["prefill_prefix", "prefill_window_softcap", "prefill_head_dim_40_page_6"])
def test_paged_attention_in_a_prefill_graphs_layout(name):
    """The layout of atom-server's prefill graphs (prefill_graphs.py): the step's rows, then one padding row whose
    queries fill the bucket's token entries (its own keys over a zeroed table row: block 0, stale values), then rows
    without queries, and max_query_len the bucket's size. The step's tokens get the bits of the launch sized for the
    step (the (row, query tile) grid is the same work, whatever the rows and queries around it), and the reference."""
    from atom.ops.triton_kernels.attention import paged_attention_impl

    q_lens, ctx_lens, hq, hkv, head_dim, block_size, window, softcap, splits = ATTN_CASES[name]
    q, kc, vc, tables, qsl, lens, max_q, max_l = _paged_case(q_lens, ctx_lens, hq, hkv, head_dim, block_size,
                                                             torch.float32)
    scale = head_dim**-0.5
    want = paged_attention_impl(q, kc, vc, tables, qsl, lens, scale, window, softcap, max_q, max_l)
    t = q.shape[0]
    bucket = 64
    (g_q,), g_tables, g_qsl, g_lens = prefill_graph_layout([q], tables, qsl, lens, block_size, bucket, rows=9)
    got = paged_attention_impl(g_q, kc, vc, g_tables, g_qsl, g_lens, scale, window, softcap, bucket, 4096)
    assert torch.equal(got[:t], want)
    assert torch.isfinite(got[t:]).all()
    ref = ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, scale, window, softcap, max_q, max_l)
    check(f"paged_attention prefill graph layout {name}", got[:t], ref, TOL[torch.float32])


@pytest.mark.parametrize("dtype,kv_fp8", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("qk_norm,is_neox,partial", [(True, True, False), (False, False, True)])
@pytest.mark.parametrize("splits,window", [(1, None), (4, None), (2, 16)])
def test_decode_prep_inside_attention_equals_the_two_kernels(dtype, kv_fp8, qk_norm, is_neox, partial, splits,
                                                             window):
    """paged_attention_impl(prep=...) at decode: the attention kernel normalizes and rotates its queries and the
    program holding each sequence's new key stores it (and its value) first; the same outputs and caches as
    qk_norm_rope_cache followed by the attention (bit for bit under the interpreter, where neither the compiler's
    contractions nor reduction layouts differ; within the dtype's tolerance on a GPU), also against the torch
    references. A padding token (slot -1) stores nothing."""
    from atom.ops import qk_norm_rope_cache as ref_prep
    from atom.ops.triton_kernels.attention import DecodePrep, paged_attention_impl

    hq, hk, head_dim, block_size = 4, 2, 32, 4
    ctx = [9, 37, 70, 3]
    q_raw, kc, vc, tables, qsl, lens, _, _ = _paged_case([1] * len(ctx), ctx, hq, hk, head_dim, block_size, dtype)
    rot_dim = head_dim // 2 if partial else head_dim
    cos_sin = rand(128, rot_dim)
    positions = (lens - 1).long()
    new = lens.long() - 1
    slots = tables.long().gather(1, (new // block_size)[:, None])[:, 0] * block_size + new % block_size
    slots[3] = -1  # a padding entry of a captured batch
    kv = rand(len(ctx), 2 * hk * head_dim, dtype=dtype)
    k_raw, v_raw = kv.split(hk * head_dim, dim=-1)  # strided rows, as split from a fused projection
    qw, kw = (rand(head_dim, dtype=dtype), rand(head_dim, dtype=dtype)) if qk_norm else (None, None)
    scales = {}
    if kv_fp8:
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
        scales = dict(k_scale=torch.tensor([0.75], device=DEVICE), v_scale=torch.tensor([1.25], device=DEVICE))
    caches = [kc.clone(), vc.clone()]
    q_rot, _ = triton_op("qk_norm_rope_cache")(positions, q_raw.reshape(len(ctx), -1), k_raw, v_raw, qw, kw, 1e-6,
                                               head_dim, cos_sin, is_neox, *caches, slots, **scales)
    args = (tables, qsl, lens, head_dim**-0.5, window, None, 1, 4096)
    want = paged_attention_impl(q_rot.view(q_raw.shape), *caches, *args, num_splits=splits, **scales)
    fused = [kc.clone(), vc.clone()]
    got = paged_attention_impl(q_raw, *fused, *args, num_splits=splits, **scales,
                               prep=DecodePrep(positions, k_raw, v_raw, qw, kw, 1e-6, cos_sin, is_neox, slots))
    name = f"decode prep in attention {dtype} fp8={kv_fp8} norm={qk_norm} neox={is_neox} splits={splits}"
    if ON_GPU:
        check(name, got, want, TOL[dtype])
        for a, b in zip(fused, caches):
            check(name + " cache", a.float(), b.float(), TOL[dtype])
    else:
        assert torch.equal(got, want), name
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(fused, caches)), name
    if not kv_fp8:  # the torch references, each stage on the same inputs as the kernel's: prep, then attention
        ref_caches = [kc.clone(), vc.clone()]
        rq, _ = ref_prep.qk_norm_rope_cache(positions, q_raw.reshape(len(ctx), -1), k_raw, v_raw, qw, kw, 1e-6,
                                            head_dim, cos_sin, is_neox, *ref_caches, slots)
        check(name + " prep vs torch", q_rot.float(), rq.float(), TOL[dtype])
        for a, b in zip(fused, ref_caches, strict=True):
            check(name + " cache vs torch", a.float(), b.float(), TOL[dtype])
        # the attention on the queries and caches the kernel itself produced (got equals want, whose queries are
        # q_rot): in bf16 the two preps' roundings differ by an ulp or two, and a sharp softmax (qk-norm weights
        # ~N(0, 1)) amplifies that input difference to a few percent of the output (seed 1582937417: q 0.96%
        # apart, the outputs 3.2%), which is not the attention's error (0.4% on the same inputs there)
        ref = ref_attn.paged_attention(q_rot.view(q_raw.shape), *fused, *args)
        check(name + " vs torch", got, ref, TOL[dtype])


@pytest.mark.parametrize("splits,kv_fp8,head_dim,window", [(1, False, 32, None), (4, True, 32, None),
                                                            (2, False, 40, 24)])
def test_decode_prep_with_early_metadata_gives_the_same_bits(monkeypatch, splits, kv_fp8, head_dim, window):
    """EARLY_META (the rows' query start, sequence length, position and KV slot loaded before the PDL wait) and
    EARLY_KV with it (1: each program's first key tile asked into L2 before the wait, under the interpreter the same
    addresses loaded and dropped; 2: that tile loaded before the wait and the new key put in from registers): the
    outputs and caches of the same launch without them, bit for bit; they are passed only with the prep, EARLY_KV
    only with EARLY_META. The rows put the new key in a preloaded partial tile (9, 37; at 4 splits 70 too), after a
    whole preloaded tile (70, one split), and leave it unstored (slot -1); head_dim 40 masks columns, under a
    sliding window (the first tile starts inside the context)."""
    from atom.ops.triton_kernels import attention as tka
    from atom.ops.triton_kernels.attention import DecodePrep, paged_attention_impl

    hq, hk, block_size = 4, 2, 4
    ctx = [9, 37, 70, 3]
    q_raw, kc, vc, tables, qsl, lens, _, _ = _paged_case([1] * len(ctx), ctx, hq, hk, head_dim, block_size,
                                                         torch.bfloat16)
    cos_sin = rand(128, head_dim)
    positions = (lens - 1).long() + torch.tensor([0, 5, 2, 9], device=DEVICE)  # not the last key's index
    new = lens.long() - 1
    slots = tables.long().gather(1, (new // block_size)[:, None])[:, 0] * block_size + new % block_size
    slots[3] = -1
    k_raw, v_raw = rand(len(ctx), 2 * hk * head_dim, dtype=torch.bfloat16).split(hk * head_dim, dim=-1)
    qw, kw = rand(head_dim, dtype=torch.bfloat16), rand(head_dim, dtype=torch.bfloat16)
    scales = {}
    if kv_fp8:
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
        scales = dict(k_scale=torch.tensor([0.75], device=DEVICE), v_scale=torch.tensor([1.25], device=DEVICE))
    args = (tables, qsl, lens, head_dim**-0.5, window, None, 1, 4096)
    prep = DecodePrep(positions, k_raw, v_raw, qw, kw, 1e-6, cos_sin, True, slots)
    launches = spy_launches(monkeypatch, tka, "_attention_kernel")
    outs = []
    for meta, kv in ((False, 0), (True, 0), (True, 1), (False, 1), (True, 2)):
        monkeypatch.setattr(tka, "EARLY_META", meta)
        monkeypatch.setattr(tka, "EARLY_KV", kv)
        caches = [kc.clone(), vc.clone()]
        outs.append((paged_attention_impl(q_raw, *caches, *args, num_splits=splits, **scales, prep=prep), caches))
    monkeypatch.setattr(tka, "EARLY_META", True)
    paged_attention_impl(q_raw, kc.clone(), vc.clone(), *args, num_splits=splits, **scales)  # no prep
    assert [(la.kwargs["EARLY_META"], la.kwargs["EARLY_KV"]) for la in launches] == [
        (False, 0), (True, 0), (True, 1), (False, 0), (True, 2), (False, 0)]
    assert launches[2].kwargs["KV_ASM"] == (DEVICE != "cpu")  # the interpreter loads instead of prefetching
    (want, want_caches), *rest = outs
    for got, got_caches in rest:
        assert torch.equal(got, want)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for a, b in zip(got_caches, want_caches, strict=True))
    assert not torch.equal(want_caches[0].view(torch.uint8), kc.view(torch.uint8))  # the new keys were stored


def test_early_kv_loads_fall_back_to_the_prefetch_over_8_kb_a_tile(monkeypatch):
    """ATOM_ATTN_EARLY_KV=2 loads the first key tile into registers only where a cache's tile is at most
    EARLY_LOAD_MAX_BYTES (a head_dim 128 bf16 tile of 64 keys is 16 KB: the prefetch, 1, instead), with the same
    bits as without; the variable is read as 0-2 and anything else is refused naming it."""
    import subprocess

    from atom.ops.triton_kernels import attention as tka
    from atom.ops.triton_kernels.attention import DecodePrep, paged_attention_impl

    head_dim = 128
    q_raw, kc, vc, tables, qsl, lens, _, _ = _paged_case([1], [20], 4, 1, head_dim, 16, torch.bfloat16)
    new = lens.long() - 1
    slots = tables.long()[0, new // 16] * 16 + new % 16
    k_raw, v_raw = rand(1, 2 * head_dim, dtype=torch.bfloat16).split(head_dim, dim=-1)
    prep = DecodePrep(new, k_raw, v_raw, None, None, 1e-6, rand(64, head_dim), True, slots)
    launches = spy_launches(monkeypatch, tka, "_attention_kernel")
    outs = []
    for kv in (0, 2):
        monkeypatch.setattr(tka, "EARLY_META", kv > 0)
        monkeypatch.setattr(tka, "EARLY_KV", kv)
        outs.append(paged_attention_impl(q_raw, kc.clone(), vc.clone(), tables, qsl, lens, head_dim**-0.5, None,
                                         None, 1, 4096, num_splits=1, prep=prep))
    assert [la.kwargs["EARLY_KV"] for la in launches] == [0, 1]
    assert launches[1].kwargs["BLOCK_N"] * launches[1].kwargs["BLOCK_D"] * 2 > tka.EARLY_LOAD_MAX_BYTES
    assert torch.equal(outs[0], outs[1])
    probe = "import atom.ops.triton_kernels.attention as a; print(a.EARLY_KV)"
    for raw, code in (("2", 0), ("3", 1)):
        out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "ATOM_ATTN_EARLY_KV": raw},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == code, out.stderr[-500:]
        if code == 0:
            assert out.stdout.strip() == "2"
        else:
            assert "ATOM_ATTN_EARLY_KV must be between 0 and 2" in out.stderr


def test_qwen3_decode_with_the_prep_inside_attention(tmp_path, monkeypatch):
    """A tiny Qwen3 (qk-norm, rope; KV heads serving 4 query heads) on the Triton kernels through PagedHarness: under
    the default rule its decode steps take the fused prep (counted) and give the logits and KV caches of the model
    with qk_norm_rope_cache as its own kernel (ATOM_ATTN_FUSED_DECODE_PREP=0's path): bit for bit under the
    interpreter, within bf16 tolerance on a GPU."""
    import sys

    import transformers

    sys.path.insert(0, os.path.dirname(__file__))
    from paged_harness import PagedHarness

    from atom.layers import attention as layers_attn
    from atom.loader import load_model
    from atom.ops import registry
    from atom.ops.triton_kernels import attention as tk

    config = transformers.Qwen3Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)
    fused_calls = []
    impl = tk.paged_attention_impl

    def counting(*args, **kwargs):
        fused_calls.append(kwargs.get("prep") is not None)
        return impl(*args, **kwargs)

    monkeypatch.setattr(tk, "paged_attention_impl", counting)

    def run(fused: bool | None):
        monkeypatch.setattr(layers_attn, "FUSED_DECODE_PREP", fused)
        registry.forget_resolutions()
        model, _ = load_model(str(tmp_path), dtype="bfloat16", device=DEVICE, progress=False)
        harness = PagedHarness(model, num_blocks=16, block_size=4, device=DEVICE)
        seqs = harness.add(2)
        out = [harness.step([[5, 9, 2, 77, 3, 14, 8, 40, 41], [4, 4, 60, 1, 2]], seqs)]
        for token in (7, 8, 9):
            out.append(harness.step([[token], [token + 20]], seqs))
        caches = [m.kv_cache for m in model.modules() if isinstance(m, layers_attn.PagedAttention)]
        registry.forget_resolutions()
        return torch.cat(out).float().cpu(), [(c.k.float().cpu(), c.v.float().cpu()) for c in caches]

    want, want_caches = run(False)
    assert not any(fused_calls)
    got, got_caches = run(None)  # the default rule: KV heads serving 4 query heads, 2-row decode steps: fused
    assert sum(fused_calls) == 3 * 2, fused_calls  # every decode step, both layers; the prefill is not fused
    if ON_GPU:
        check("qwen3 decode prep fused", got, want, TOL[torch.bfloat16])
    else:
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for pa, pb in zip(got_caches, want_caches) for a, b in zip(pa, pb))


def test_fused_decode_prep_rule():
    """fuses_decode: by default (ATOM_ATTN_FUSED_DECODE_PREP unset) the prep runs inside the attention kernel at
    decode steps of at most 32 rows in layers whose KV heads serve 2+ query heads and that have no sinks (measured:
    qwen3-8b's groups of 4 gained at batch 1 / 32, batch 128 lost; qwen3-0.6b's groups of 2 gained at 1 / 32 on
    2026-12-07); =1 at every decode
    step, =0 never (no fused launcher at all); any other value is refused naming the variable."""
    import subprocess
    import sys

    from atom.layers import attention as layers_attn

    rule = layers_attn.fuses_decode
    assert rule(32, 8, 1) and rule(32, 4, 32)
    assert rule(16, 8, 1) and rule(16, 8, 32)
    assert not rule(32, 8, 33) and not rule(8, 8, 1) and not rule(64, 8, 1, sinks=True)
    assert rule(16, 8, 128, mode=True) and rule(64, 8, 1, sinks=True, mode=True)
    assert not rule(32, 8, 1, mode=False)
    probe = "import atom.layers.attention as a; print(a.FUSED_DECODE_PREP)"
    for raw, want in (("", "None"), ("1", "True"), ("0", "False")):
        env = {**os.environ, "ATOM_ATTN_FUSED_DECODE_PREP": raw}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == want, (raw, out.stderr[-500:])
    env = {**os.environ, "ATOM_ATTN_FUSED_DECODE_PREP": "yes"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "ATOM_ATTN_FUSED_DECODE_PREP" in out.stderr


def test_decode_split_count_follows_the_programs_an_sm_aims_for(monkeypatch):
    """_decode_splits: enough splits for DECODE_TILE["programs_per_sm"] programs an SM (a power of two, at most
    one key tile each, at most 64); 0 never splits. ATOM_ATTN_DECODE_PROGRAMS_PER_SM sets it at import, and a
    value that is not a count is refused naming the variable."""
    import subprocess
    import sys

    from atom.ops.triton_kernels import attention as tk

    sms = 132
    monkeypatch.setattr(tk, "num_sms", lambda device: sms)
    dev = torch.device("cpu")
    for per_sm, batch, kv_heads, span, want in [(2, 1, 8, 4096, 64), (2, 32, 8, 4096, 2), (2, 128, 8, 4096, 1),
                                                (2, 1, 8, 256, 4), (4, 32, 8, 4096, 4), (1, 32, 8, 4096, 1),
                                                (0, 1, 8, 4096, 1)]:
        monkeypatch.setitem(tk.DECODE_TILE, "programs_per_sm", per_sm)
        assert tk._decode_splits(dev, batch, kv_heads, span, 64) == want, (per_sm, batch, span)
    code = "from atom.ops.triton_kernels import attention as a; print(a.DECODE_TILE['programs_per_sm'])"
    env = {**os.environ, "ATOM_ATTN_DECODE_PROGRAMS_PER_SM": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "0", done.stderr[-2000:]
    env["ATOM_ATTN_DECODE_PROGRAMS_PER_SM"] = "two"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "ATOM_ATTN_DECODE_PROGRAMS_PER_SM" in done.stderr


def _host_layout_caches(kc: torch.Tensor, vc: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same K and V pages as views of one cache in a host's layout (what atom-vllm's backend gets):
    vLLM <= 0.29 [num_blocks, 2, block_size, H, D]; vLLM >= 0.30 [num_blocks, H, block_size, 2 * D] (K | V on
    the last axis). Both views are [num_blocks, block_size, H, D] with strided blocks (and, for the second,
    strided slots and heads)."""
    if layout == "halves":
        both = torch.stack((kc, vc), dim=1)
        return both[:, 0], both[:, 1]
    both = torch.cat((kc, vc), dim=-1).transpose(1, 2).contiguous()
    return both.transpose(1, 2).split(kc.shape[-1], dim=-1)


@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_paged_attention_and_cache_write_on_a_hosts_strided_cache(layout):
    """atom-vllm's attention backend runs ATOM's kernels on views of vLLM's cache: writes through the Triton
    kernel and the torch reference, and attention (decode and prefill over a cached prefix, Triton writing into a
    given output and the torch reference) on those views equal the same on contiguous caches."""
    from atom.ops.triton_kernels.attention import paged_attention_impl

    for name in ("decode_split", "prefill_prefix"):
        q_lens, ctx, hq, hkv, hd, bs, window, softcap, splits = ATTN_CASES[name]
        q, kc, vc, tables, qsl, lens, max_q, max_l = _paged_case(q_lens, ctx, hq, hkv, hd, bs, torch.float32)
        slots = torch.randperm(kc.shape[0] * bs, device=DEVICE)[:q.shape[0]]
        slots[::2] = -1
        key, value = rand(q.shape[0], hkv, hd), rand(q.shape[0], hkv, hd)
        for write in (triton_op("reshape_and_cache"), ref_attn.reshape_and_cache):
            hk, hv = _host_layout_caches(kc, vc, layout)
            assert not hk.is_contiguous()
            ck, cv = kc.clone(), vc.clone()
            write(key, value, hk, hv, slots)
            ref_attn.reshape_and_cache(key, value, ck, cv, slots)
            assert torch.equal(hk, ck) and torch.equal(hv, cv)
        hk, hv = _host_layout_caches(kc, vc, layout)
        ref = ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, hd**-0.5, window, softcap, max_q, max_l)
        out = torch.full_like(q, float("nan"))
        paged_attention_impl(q, hk, hv, tables, qsl, lens, hd**-0.5, window, softcap, max_q, max_l,
                             num_splits=splits, out=out)
        check(f"paged_attention {name} on a {layout} host cache, into out", out, ref, TOL[torch.float32])
        check(f"paged_attention reference {name} on a {layout} host cache",
              ref_attn.paged_attention(q, hk, hv, tables, qsl, lens, hd**-0.5, window, softcap, max_q, max_l), ref,
              TOL[torch.float32])


def test_paged_attention_registered_op_dispatches_decode_and_prefill():
    op = triton_op("paged_attention")
    for name in ("decode", "prefill_prefix"):
        q_lens, ctx, hq, hkv, hd, bs, *_ = ATTN_CASES[name]
        q, kc, vc, tables, qsl, lens, max_q, max_l = _paged_case(q_lens, ctx, hq, hkv, hd, bs, torch.float32)
        out = op(q, kc, vc, tables, qsl, lens, 0.3, None, None, max_q, max_l)
        check(f"paged_attention op {name}", out, ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, 0.3),
              TOL[torch.float32])


# ---------------------------------------------------------------- MoE
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_topk_softmax(size, renormalize):
    tokens, experts, top_k = (9, 8, 3) if size == "tiny" else (4096, 128, 8)
    logits = rand(tokens, experts, dtype=torch.bfloat16 if size == "large" else torch.float32, scale=3.0)
    w, ids = triton_op("moe_topk_softmax")(logits, top_k, renormalize)
    rw, rids = ref_moe.moe_topk_softmax(logits, top_k, renormalize)
    # bf16 logits tie often: the chosen probabilities must match; ids must match where a value is unique
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    probs = torch.softmax(logits.float(), -1)
    chosen = probs.gather(1, rids)
    assert torch.allclose(probs.gather(1, ids), chosen, rtol=0, atol=1e-6)
    unique = (probs[:, None, :] == chosen[:, :, None]).sum(-1) == 1
    assert torch.equal(ids[unique], rids[unique])
    check(f"moe_topk_softmax {size} renorm={renormalize}", w, rw, 1e-5)


@pytest.mark.parametrize("size", ["tiny_one_decode", "tiny_decode", "tiny_prefill"] + SIZES + [
    pytest.param(s, marks=LARGE.marks) for s in ("one_decode", "decode", "prefill")])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_experts(size, activation, dtype):
    from atom.ops.triton_kernels import moe as tk_moe

    # "decode" sizes take the per-pair GEMV path (no sort), the others the sorted grouped GEMM
    if size == "tiny_one_decode":  # one token: its own tile
        tokens, hidden, inter, experts, top_k = 1, 40, 24, 6, 2  # sizes off the block multiples
    elif size == "tiny_decode":
        tokens, hidden, inter, experts, top_k = 3, 40, 24, 6, 2
    elif size == "one_decode":
        tokens, hidden, inter, experts, top_k = 1, 2048, 768, 128, 8
    elif size == "decode":
        tokens, hidden, inter, experts, top_k = 2, 2048, 768, 128, 8
    elif size == "tiny":
        tokens, hidden, inter, experts, top_k = 20, 32, 48, 5, 2
    elif size == "tiny_prefill":  # > 128 pairs an expert: the prefill tile (128 rows, column blocks first)
        tokens, hidden, inter, experts, top_k = 300, 40, 24, 3, 2
        assert tk_moe._gemm_tile(tokens * top_k, experts).get("n_major")
    elif size == "large":
        tokens, hidden, inter, experts, top_k = 512, 2048, 768, 128, 8
    else:  # a 4k-token prefill takes the widest tile, which in float32 must shrink to fit shared memory
        tokens, hidden, inter, experts, top_k = 4096, 2048, 768, 128, 8
    x = rand(tokens, hidden, dtype=dtype)
    w13 = rand(experts, 2 * inter, hidden, dtype=dtype, scale=hidden**-0.5)
    w2 = rand(experts, hidden, inter, dtype=dtype, scale=inter**-0.5)
    weights, ids = ref_moe.moe_topk_softmax(rand(tokens, experts), top_k, True)
    assert (tokens * top_k <= tk_moe.PAIR_GEMV_MAX_PAIRS) == size.endswith("decode")
    out = triton_op("fused_experts")(x, w13, w2, weights, ids, activation)
    ref = ref_moe.fused_experts(x, w13, w2, weights, ids, activation)
    check(f"fused_experts {size} {activation} {dtype}", out, ref, TOL[dtype])


@pytest.mark.parametrize("path", ["per_pair", "align_kernel", "align_scan", "align_torch"])
def test_fused_experts_skips_pairs_of_other_ranks(path, monkeypatch):
    """Expert parallelism: a pair of id -1 (another rank's expert) contributes nothing, on every path. Checked
    against the reference and against the same routing with those pairs' weights zeroed on a real expert."""
    from atom.ops.triton_kernels import moe as tk_moe

    tokens = 3 if path == "per_pair" else 20
    hidden, inter, experts, top_k = 40, 24, 6, 2
    if path in ("align_scan", "align_torch"):
        monkeypatch.setattr(tk_moe, "ALIGN_PATH_OVERRIDE", path.removeprefix("align_"))
    x = rand(tokens, hidden)
    w13 = rand(experts, 2 * inter, hidden, scale=hidden**-0.5)
    w2 = rand(experts, hidden, inter, scale=inter**-0.5)
    weights, ids = ref_moe.moe_topk_softmax(rand(tokens, experts), top_k, True)
    skip = torch.rand(tokens, top_k, device=DEVICE) < 0.5
    skip[0] = True  # a token with no expert on this rank
    skip[1] = False
    local = ids.masked_fill(skip, -1)
    assert (tokens * top_k <= tk_moe.PAIR_GEMV_MAX_PAIRS) == (path == "per_pair")
    out = triton_op("fused_experts")(x, w13, w2, weights, local, "silu")
    check(f"fused_experts -1 ids {path}", out, ref_moe.fused_experts(x, w13, w2, weights, local, "silu"), 1e-5)
    zeroed = ref_moe.fused_experts(x, w13, w2, weights.masked_fill(skip, 0.0), ids, "silu")
    check(f"fused_experts -1 ids {path} vs zero weights", out, zeroed, 1e-5)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


# ---------------------------------------------------------------- sampling
def _allowed_probs(logits, temperature, top_k, top_p, min_p):
    """The distribution the reference samples from (per row)."""
    scaled = ref_sampling.apply_top_k_top_p_min_p(logits / temperature[:, None], top_k, top_p, min_p)
    return torch.softmax(scaled, -1)


SAMPLE_CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=1.3, top_k=4),
    "top_k_top_p": dict(temperature=1.0, top_k=6, top_p=0.7),
    "top_p_only": dict(temperature=0.9, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.1),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_CASES))
def test_sample_distribution(name):
    params = SAMPLE_CASES[name]
    # each row is one program: the interpreter runs ~1k of them in seconds; 5 sigma bounds on the gap
    rows, vocab = (20000, 10) if ON_GPU else (400, 10)
    bound = 0.02 if ON_GPU else 0.12
    base = rand(vocab, scale=1.5)
    logits = base.expand(rows, vocab).contiguous()
    full = lambda key, default, dt: torch.full((rows,), params.get(key, default), dtype=dt, device=DEVICE)  # noqa: E731
    temperature = full("temperature", 1.0, torch.float32)
    top_k = full("top_k", 0, torch.int64) if "top_k" in params else None
    top_p = full("top_p", 1.0, torch.float32) if "top_p" in params else None
    min_p = full("min_p", 0.0, torch.float32) if "min_p" in params else None
    tokens = triton_op("sample")(logits, temperature, top_k, top_p, min_p)
    probs = _allowed_probs(logits[:1], temperature[:1], *(t[:1] if t is not None else None for t in (top_k, top_p, min_p)))[0]
    assert tokens.dtype == torch.int64 and tokens.shape == (rows,)
    assert bool((probs[tokens] > 0).all()), f"{name}: sampled a filtered-out token"
    freq = torch.bincount(tokens, minlength=vocab).double() / rows
    gap = (freq - probs.double()).abs().max().item()
    print(f"ERR sample {name}: max |freq - p| = {gap:.3e} over {rows} draws")
    assert gap < bound, (freq, probs)


def test_sample_greedy_and_mixed_rows():
    rows, vocab = 6, 1000 if ON_GPU else 300
    logits = rand(rows, vocab, scale=3.0)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.8, 1.0, 0.5], device=DEVICE)
    top_k = torch.tensor([0, 1, 5, 0, 1, 3], device=DEVICE)
    tokens = triton_op("sample")(logits, temperature, top_k, None, None)
    argmax = logits.argmax(-1)
    # greedy rows and top_k == 1 rows are deterministic
    for i in (0, 1, 2, 4):
        assert tokens[i] == argmax[i]
    assert tokens[5] in logits[5].topk(3).indices
    assert torch.equal(triton_op("sample")(logits, torch.zeros(rows, device=DEVICE)), argmax)


def test_sample_seeded_rows_ignore_the_rest_of_the_batch():
    vocab = 50
    row = rand(vocab)

    def draw(batch_rows, pos, top_k):
        logits = rand(batch_rows, vocab)
        logits[pos] = row
        gens = [None] * batch_rows
        gens[pos] = torch.Generator(device=DEVICE).manual_seed(1234)
        temp = torch.ones(batch_rows, device=DEVICE)
        k = torch.full((batch_rows,), top_k, device=DEVICE)
        return [int(triton_op("sample")(logits, temp, k, None, None, gens)[pos]) for _ in range(1)][0]

    for top_k in (0, 8):
        first = [draw(4, 1, top_k) for _ in range(3)]
        assert len(set(first)) == 1
        assert draw(7, 5, top_k) == first[0]


@pytest.mark.parametrize("path", ["kernels", "scan"])
@pytest.mark.parametrize("experts,block_m,tokens,top_k", [(6, 16, 37, 3), (64, 16, 130, 6), (128, 64, 65, 8),
                                                          (8, 16, 9, 4), (66, 128, 700, 8)])
def test_moe_align_kernel_matches_the_torch_path(monkeypatch, experts, block_m, tokens, top_k, path):
    """The chunked sort (2-88 chunks of 64 pairs, a partial last chunk, padding rows spread over the programs;
    one chunk: a single kernel) gives the torch path's layout exactly: "kernels" (every place program reduces
    all chunks' counts), "scan" (a cumsum over the chunks first: what prefills above _ALIGN_KERNEL_MAX_PAIRS
    take)."""
    from atom.ops.triton_kernels import moe as tk_moe

    ids = torch.randint(0, experts, (tokens, top_k), device=DEVICE)
    ids[:, 0] = 2  # one crowded expert, some likely empty
    ids[::5, 1] = -1  # other ranks' experts (expert parallelism): left out
    monkeypatch.setattr(tk_moe, "ALIGN_PATH_OVERRIDE", path)
    got_ids, got_end = tk_moe._align_by_expert(ids, experts, block_m)
    monkeypatch.setattr(tk_moe, "ALIGN_PATH_OVERRIDE", "torch")
    ref_ids, ref_end = tk_moe._align_by_expert(ids, experts, block_m)
    assert torch.equal(got_end, ref_end)
    total = int(ref_end[-1])
    assert torch.equal(got_ids[:total], ref_ids[:total])
    # every pair of a real expert appears exactly once, in its expert's run, in order
    flat = ids.reshape(-1)
    real = ref_ids[:total][ref_ids[:total] < flat.numel()].long()
    assert torch.equal(real.sort().values, torch.nonzero(flat >= 0).reshape(-1))
    assert torch.equal(flat[real], flat[real].sort(stable=True).values)


def test_attention_merge_warps_from_the_environment(monkeypatch):
    """ATOM_ATTN_MERGE_WARPS: the split-decode merge's warps (4 unless set); anything but 1 / 2 / 4 / 8 is refused
    naming the variable."""
    from atom.ops.triton_kernels import attention as tk_attn

    monkeypatch.delenv("ATOM_ATTN_MERGE_WARPS", raising=False)
    assert tk_attn._env_merge_warps() == 4
    monkeypatch.setenv("ATOM_ATTN_MERGE_WARPS", "1")
    assert tk_attn._env_merge_warps() == 1
    for bad in ("3", "16", "x"):
        monkeypatch.setenv("ATOM_ATTN_MERGE_WARPS", bad)
        with pytest.raises(ValueError, match="ATOM_ATTN_MERGE_WARPS"):
            tk_attn._env_merge_warps()


def test_moe_sum_topk_over_several_column_blocks():
    """The top-k sum's programs, one token's column blocks after another: each token's rows weighted and summed in
    float32 into its own output row, every column of a hidden size that is two 256-column blocks and a part, and
    pairs of id -1 left out."""
    from atom.ops.triton_kernels import moe as tk_moe

    tokens, top_k, hidden = 5, 3, 600
    y = rand(tokens * top_k, hidden, dtype=torch.bfloat16)
    ids = torch.randint(0, 4, (tokens, top_k), device=DEVICE)
    ids[1, 2] = -1
    weights = torch.rand(tokens * top_k, device=DEVICE)
    got = tk_moe._sum_topk(y, ids.reshape(-1).contiguous(), tokens, top_k, torch.float32, weights)
    keep = (ids.reshape(-1) >= 0).float()[:, None]
    ref = (y.float() * (weights[:, None] * keep)).reshape(tokens, top_k, hidden).sum(1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunks,e_pad", [(2, 8), (600, 256)])
def test_moe_align_scan_kernel_matches_torch_cumsum(chunks, e_pad):
    """The chunk scan of the "scan" path: an exclusive prefix over the chunks (row 0 zeros, the totals last) equal
    to torch.cumsum's, across several 256-chunk tiles (the running total carried between them) and one."""
    from atom.ops.triton_kernels import moe as tk_moe

    counts = torch.randint(0, 65, (chunks, e_pad), dtype=torch.int32, device=DEVICE)
    scan = torch.full((chunks + 1, e_pad), -7, dtype=torch.int32, device=DEVICE)
    block_e = min(e_pad, 16)
    tk_moe._align_scan_kernel[(e_pad // block_e,)](counts, scan, chunks, E_PAD=e_pad, BLOCK_E=block_e, ROWS=256,
                                                   PDL=False)
    ref = torch.cat([torch.zeros(1, e_pad, dtype=torch.int64, device=DEVICE), counts.long().cumsum(0)])
    assert torch.equal(scan.long(), ref)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("is_neox,partial", [(True, False), (False, True)])
def test_qk_norm_rope_cache(size, qk_norm, is_neox, partial):
    from atom.ops import qk_norm_rope_cache as ref_fused

    if size == "tiny":
        tokens, hq, hk, head_dim, block_size, num_blocks, dtype = 6, 4, 2, 16, 4, 5, torch.float32
    else:
        tokens, hq, hk, head_dim, block_size, num_blocks, dtype = 4096, 32, 8, 128, 16, 1024, torch.bfloat16
    rot_dim = head_dim // 2 if partial else head_dim
    cos_sin = rand(64, rot_dim)
    positions = torch.randint(0, 64, (tokens,), device=DEVICE)
    qkv = rand(tokens, (hq + 2 * hk) * head_dim, dtype=dtype)
    q, k, v = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    qw, kw = (rand(head_dim, dtype=dtype), rand(head_dim, dtype=dtype)) if qk_norm else (None, None)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    slots[1::4] = -1
    caches = [rand(num_blocks, block_size, hk, head_dim, dtype=dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    args = (positions, q, k, v, qw, kw, 1e-6, head_dim, cos_sin, is_neox)
    oq, ok = triton_op("qk_norm_rope_cache")(*args, *caches, slots)
    rq, rk = ref_fused.qk_norm_rope_cache(*args, *ref_caches, slots)
    name = f"qk_norm_rope_cache {size} norm={qk_norm} neox={is_neox} rot_dim={rot_dim}"
    check(name + " q", oq, rq, TOL[dtype])
    check(name + " k", ok, rk, TOL[dtype])
    check(name + " k_cache", caches[0], ref_caches[0], TOL[dtype])
    assert torch.equal(caches[1], ref_caches[1]), "v is copied into the cache unchanged"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("tokens", [1, 64])  # per-pair GEMV path, sorted grouped GEMM path
def test_fused_experts_traces_under_torch_compile(tokens):
    """vLLM compiles ATOM's model with torch.compile (fullgraph): the host-side code around the kernels
    (tile choice, shared-memory fit) must be traceable, not only the kernels."""
    x = rand(tokens, 256, dtype=torch.bfloat16)
    w13 = rand(16, 2 * 128, 256, dtype=torch.bfloat16, scale=256**-0.5)
    w2 = rand(16, 256, 128, dtype=torch.bfloat16, scale=128**-0.5)
    weights, ids = ref_moe.moe_topk_softmax(rand(tokens, 16), 4, True)
    op = triton_op("fused_experts")
    torch._dynamo.reset()
    compiled = torch.compile(op, fullgraph=True)
    torch.testing.assert_close(compiled(x, w13, w2, weights, ids, "silu"), op(x, w13, w2, weights, ids, "silu"))
