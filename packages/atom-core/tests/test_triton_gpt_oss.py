"""GPT-OSS's Triton kernels vs their torch references: paged attention with sinks and sliding windows, and
fused_experts_swigluoai with dense and MXFP4 experts.

As test_triton_kernels.py (whose helpers this module uses): without a GPU it runs alone under Triton's
interpreter (TRITON_INTERPRET=1, tiny shapes); the "large" cases are gpt-oss-20b shapes on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run this module alone with TRITON_INTERPRET=1 (Triton's CPU interpreter)",
                allow_module_level=True)

pytest.importorskip("triton")

from launch_spy import spy_launches  # noqa: E402
from test_triton_kernels import DEVICE, LARGE, ON_GPU, TOL, _paged_case, check, rand, triton_op  # noqa: E402

from atom.ops import attention as ref_attn  # noqa: E402
from atom.ops import moe as ref_moe  # noqa: E402
from atom.ops.moe_swigluoai import fused_experts_swigluoai as ref_experts  # noqa: E402
from atom.ops.mxfp4 import pack_fragments, quantize_mxfp4  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
GPU = LARGE.marks  # gpu marker + skip without one

ATTN_CASES = {
    # name: (q_lens, ctx_lens, Hq, Hkv, head_dim, block_size, window, num_splits); every case has sinks
    "decode": ([1, 1, 1], [9, 30, 2], 4, 2, 32, 4, None, None),
    "decode_split": ([1, 1], [37, 70], 4, 1, 32, 4, None, 4),  # sinks joined in the merge kernel
    "decode_window_inside_block": ([1, 1, 1], [20, 45, 3], 4, 2, 32, 4, 7, None),
    "decode_window_split": ([1, 1], [40, 70], 8, 2, 16, 8, 13, 2),
    "prefill_prefix_window": ([5, 19, 1], [0, 14, 33], 4, 2, 32, 4, 6, None),
    "prefill_long_prompt_window": ([30], [0], 4, 4, 16, 4, 5, None),
}
LARGE_ATTN_CASES = {  # gpt-oss-20b attention: 64 query heads, 8 KV heads, head dim 64, window 128
    "decode_bs1_window": ([1], [4095], 64, 8, 64, 16, 128, None),
    "decode_bs32_full": ([1] * 32, None, 64, 8, 64, 16, None, None),
    "decode_bs128_window": ([1] * 128, None, 64, 8, 64, 16, 128, None),
    "prefill_bs4_window": ([1024, 512, 300, 77], [0, 1536, 1000, 3000], 64, 8, 64, 16, 128, None),
    "prefill_bs2_full": ([700, 256], [300, 2000], 64, 8, 64, 16, None, None),
}


def _run_attention(name, case, dtype):
    from atom.ops.triton_kernels.attention import paged_attention_impl

    q_lens, ctx_lens, hq, hkv, head_dim, block_size, window, splits = case
    if ctx_lens is None:  # decode at realistic contexts, 1..4k
        ctx_lens = torch.randint(1, 4096, (len(q_lens),)).tolist()
    q, kc, vc, tables, qsl, lens, max_q, max_l = _paged_case(q_lens, ctx_lens, hq, hkv, head_dim, block_size, dtype)
    sinks = rand(hq, dtype=dtype, scale=2.0)
    scale = head_dim**-0.5
    out = paged_attention_impl(q, kc, vc, tables, qsl, lens, scale, window, None, max_q, max_l, num_splits=splits,
                               sinks=sinks)
    ref = ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, scale, window, None, max_q, max_l, sinks=sinks)
    check(f"paged_attention sinks {name} {dtype}", out, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ATTN_CASES))
def test_paged_attention_sinks(name, dtype):
    _run_attention(name, ATTN_CASES[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(LARGE_ATTN_CASES))
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_paged_attention_sinks_large(name, dtype):
    _run_attention(name, LARGE_ATTN_CASES[name], dtype)


def test_registered_attention_op_passes_sinks():
    q, kc, vc, tables, qsl, lens, max_q, max_l = _paged_case([1, 4], [6, 3], 4, 2, 16, 4, torch.float32)
    sinks = rand(4, scale=3.0)
    out = triton_op("paged_attention")(q, kc, vc, tables, qsl, lens, 0.3, 5, None, max_q, max_l, sinks=sinks)
    ref = ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, 0.3, 5, None, max_q, max_l, sinks=sinks)
    check("paged_attention op sinks", out, ref, TOL[torch.float32])
    without = ref_attn.paged_attention(q, kc, vc, tables, qsl, lens, 0.3, 5, None, max_q, max_l)
    assert (out - without).abs().max() > 1e-3  # the sinks are not a no-op


@pytest.mark.parametrize("name", ["decode_split", "decode_window_split", "prefill_prefix_window"])
def test_paged_attention_sinks_over_an_fp8_kv_cache(name):
    """Sinks and FP8 KV scales together (k_scale, v_scale, sinks by keyword): Triton and the torch reference
    on the e4m3 cache both equal the torch reference on the dequantized float cache with the same sinks."""
    from atom.ops.triton_kernels.attention import paged_attention_impl

    q_lens, ctx_lens, hq, hkv, head_dim, block_size, window, splits = ATTN_CASES[name]
    q, kc, vc, tables, qsl, lens, max_q, max_l = _paged_case(q_lens, ctx_lens, hq, hkv, head_dim, block_size,
                                                             torch.float32)
    ks = torch.tensor(0.5, device=DEVICE)
    vs = torch.tensor(2.0, device=DEVICE)
    k8, v8 = (kc / ks).to(torch.float8_e4m3fn), (vc / vs).to(torch.float8_e4m3fn)
    sinks = rand(hq, scale=2.0)
    scale = head_dim**-0.5
    args = (tables, qsl, lens, scale, window, None, max_q, max_l)
    want = ref_attn.paged_attention(q, k8.float() * ks, v8.float() * vs, *args, sinks=sinks)
    out = paged_attention_impl(q, k8, v8, *args, num_splits=splits, k_scale=ks, v_scale=vs, sinks=sinks)
    check(f"paged_attention sinks fp8 KV {name}", out, want, TOL[torch.float32])
    ref = ref_attn.paged_attention(q, k8, v8, *args, k_scale=ks, v_scale=vs, sinks=sinks)
    check(f"paged_attention sinks fp8 KV {name} (torch)", ref, want, TOL[torch.float32])
    no_sinks = ref_attn.paged_attention(q, k8, v8, *args, k_scale=ks, v_scale=vs)
    assert (out - no_sinks).abs().max() > 1e-3  # the sinks are not dropped on the FP8 path


# ---------------------------------------------------------------- GPT-OSS experts
def _mxfp4_weights(experts: int, rows: int, cols: int, scale_range: tuple[int, int]):
    """Random packed codes (all 16 E2M1 values) with random E8M0 scales: the kernels' decoding is checked
    on every code and many exponents, independently of the quantizer."""
    blocks = torch.randint(0, 256, (experts, rows, cols // 2), dtype=torch.uint8, device=DEVICE)
    scales = torch.randint(*scale_range, (experts, rows, cols // 32), dtype=torch.uint8, device=DEVICE)
    return blocks, scales


EXPERT_SIZES = {
    # name: (tokens, hidden, inter, experts, top_k); "decode" sizes take the per-pair GEMV path
    "tiny_one_decode": (1, 64, 96, 6, 2),
    "tiny_decode": (3, 64, 64, 6, 2),
    "tiny": (20, 64, 96, 5, 2),
}
K_CHUNK_SIZES = {  # K over several chunks, the last one partial (hidden 320 = 10 scale blocks, intermediate 160)
    "k_chunks_decode": (2, 320, 160, 4, 2),
    "k_chunks": (17, 320, 160, 4, 2),  # 34 pairs: past the PTX GEMV's 32 too
}
LARGE_EXPERT_SIZES = {  # gpt-oss-20b experts: hidden 2880, intermediate 2880, 32 experts, top-4
    "one_decode": (1, 2880, 2880, 32, 4),
    "decode": (4, 2880, 2880, 32, 4),
    "batch32": (32, 2880, 2880, 32, 4),
    "prefill": (1024, 2880, 2880, 32, 4),
}


def _run_experts(name, size, weights_format, dtype, mx_gemm=None, dequant=False, concentrated=False, frag=False):
    """mx_gemm ("regdot" / "scaled_dot"): that MXFP4 grouped kernel at every size, decode sizes
    too (by default they take the GEMV); dequant: MXFP4 dequantized + the dense grouped GEMM at every size (by
    default from 2,720 pairs); neither: the default paths without the MXFP4 GEMM (the GEMV, the register-decode
    grouped kernel). concentrated: every token routed to the same top_k experts (what random-weight engines
    see: the router's bias decides), so each of them gets all the tokens. frag: the weights in fragment order
    only (atom.ops.mxfp4.pack_fragments, ATOM_MX_FRAG; the checkpoint-layout tensors passed empty), which regdot's
    fragment kernel reads at every size (with dequant: their dequantization)."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    tokens, hidden, inter, experts, top_k = size
    x = rand(tokens, hidden, dtype=dtype)
    if weights_format == "mxfp4_random_codes":
        # about unit-gain weights: E2M1 magnitudes average 2.25, so scale ~ 1 / (2.25 sqrt(fan-in))
        w13, s13 = _mxfp4_weights(experts, 2 * inter, hidden, (118, 125) if hidden > 256 else (121, 126))
        w2, s2 = _mxfp4_weights(experts, hidden, inter, (118, 125) if inter > 256 else (121, 126))
    elif weights_format == "mxfp4_quantized":
        (w13, s13), (w2, s2) = (quantize_mxfp4(rand(experts, 2 * inter, hidden, scale=hidden**-0.5)),
                                quantize_mxfp4(rand(experts, hidden, inter, scale=inter**-0.5)))
    else:
        w13 = rand(experts, 2 * inter, hidden, dtype=dtype, scale=hidden**-0.5)
        w2 = rand(experts, hidden, inter, dtype=dtype, scale=inter**-0.5)
        s13 = s2 = None
    b13, b2 = rand(experts, 2 * inter, dtype=dtype, scale=0.3), rand(experts, hidden, dtype=dtype, scale=0.3)
    weights, ids = ref_moe.moe_topk_softmax(rand(tokens, experts), top_k, True)
    if concentrated:
        ids = torch.randperm(experts)[:top_k].to(ids).expand(tokens, top_k).contiguous()
    # "decode" sizes take the GEMV with either decode's limit, the others neither
    assert (tokens * top_k <= tk.PAIR_GEMV_MAX_PAIRS) == name.endswith("decode") == (
        tokens * top_k <= tk.MX_PTX_GEMV_MAX_PAIRS)
    args = (x, w13, w2, b13, b2, weights, ids, 1.702, 7.0, s13, s2)
    op_args = args
    if frag:  # the fragments alone, as the layer keeps them: the checkpoint-layout tensors emptied
        empty = w13.new_empty(0)
        op_args = (*args[:1], empty, empty, *args[3:9], empty, empty, pack_fragments(w13, s13, halves=2),
                   pack_fragments(w2, s2))
    saved = tk.MXFP4_SCALED_DOT, tk.MX_GEMM_MIN_PAIRS, tk.MX_DEQUANT_MIN_PAIRS, tk.MX_GEMM
    tk.MXFP4_SCALED_DOT, tk.MX_GEMM_MIN_PAIRS = mx_gemm is not None, 1 if mx_gemm else saved[1]
    tk.MX_DEQUANT_MIN_PAIRS, tk.MX_GEMM = 1 if dequant else 0, mx_gemm or saved[3]
    try:
        # the path under test is the one that runs
        mxfp4 = s13 is not None
        ptx = mxfp4 and tk._ptx_decode(x)
        gemv_max = tk.MX_PTX_GEMV_MAX_PAIRS if ptx else tk.PAIR_GEMV_MAX_PAIRS
        want = ("dequant" if dequant and mxfp4 else "mx_gemm" if mx_gemm and mxfp4 and dtype == torch.bfloat16
                else "per_pair" if tokens * top_k <= gemv_max else "grouped")
        assert tk.experts_path(dtype, mxfp4, tokens * top_k, ptx) == want
        out = triton_op("fused_experts_swigluoai")(*op_args)
    finally:
        tk.MXFP4_SCALED_DOT, tk.MX_GEMM_MIN_PAIRS, tk.MX_DEQUANT_MIN_PAIRS, tk.MX_GEMM = saved
    path = (f" {mx_gemm}" if mx_gemm else " dequant" if dequant else "") + (" concentrated" if concentrated else "")
    path += " frag" if frag else ""
    check(f"fused_experts_swigluoai {name} {weights_format} {dtype}{path}", out, ref_experts(*args), TOL[dtype])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights_format", ["dense", "mxfp4_random_codes", "mxfp4_quantized"])
@pytest.mark.parametrize("name", sorted(EXPERT_SIZES))
def test_fused_experts_swigluoai(name, weights_format, dtype):
    _run_experts(name, EXPERT_SIZES[name], weights_format, dtype)


@pytest.mark.parametrize("weights_format", ["dense", "mxfp4_random_codes"])
@pytest.mark.parametrize("name", sorted(K_CHUNK_SIZES))
def test_fused_experts_swigluoai_k_chunks(name, weights_format):
    _run_experts(name, K_CHUNK_SIZES[name], weights_format, torch.float32)


@pytest.mark.parametrize("mx_gemm", ["regdot", "scaled_dot"])
@pytest.mark.parametrize("weights_format", ["mxfp4_random_codes", "mxfp4_quantized"])
@pytest.mark.parametrize("name", sorted(EXPERT_SIZES) + sorted(K_CHUNK_SIZES))
def test_fused_experts_swigluoai_mx_gemm(name, weights_format, mx_gemm):
    """The MXFP4 grouped kernels (ATOM_MX_GEMM=regdot: scaled weights decoded in registers, one accumulator over
    K; scaled_dot: tl.dot_scaled) at every size, decode sizes and partial K chunks included: every code and many exponents;
    the reference's tolerance for bf16."""
    _run_experts(name, {**EXPERT_SIZES, **K_CHUNK_SIZES}[name], weights_format, torch.bfloat16, mx_gemm=mx_gemm)


CROWDED_SIZES = {  # experts with several tiles of pairs
    "crowded": (70, 64, 96, 3, 2),  # ~47 pairs an expert
    "k_chunks_crowded": (40, 320, 160, 4, 2),  # 10 / 5 scale blocks of K: splits that end inside a K step
}


@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("concentrated", [False, True])
@pytest.mark.parametrize("name", sorted(CROWDED_SIZES) + ["tiny"])
def test_fused_experts_swigluoai_regdot_split_k(name, concentrated, split_k, monkeypatch):
    """regdot with K split over 1-3 programs a tile (partial sums added by _split_k_finish_kernel), routed at
    random and concentrated (every token on the same experts, as in a random-weight engine), K ranges that end
    inside the last step and splits left with no K step at all (320 / 128 = 3 steps over 3 splits, 160: 2)."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    monkeypatch.setattr(tk, "MX_SPLIT_K", str(split_k))
    _run_experts(name, {**CROWDED_SIZES, **EXPERT_SIZES}[name], "mxfp4_random_codes", torch.bfloat16,
                 mx_gemm="regdot", concentrated=concentrated)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("name", sorted(CROWDED_SIZES) + ["tiny", "tiny_decode", "k_chunks"])
def test_fused_experts_swigluoai_regdot_on_fragments(name, split_k, monkeypatch):
    """regdot on the fragment order alone (ATOM_MX_FRAG, _expert_gemm_mxf_kernel): the reference's sums, and the
    same output as regdot on the checkpoint layout up to the dot's accumulation order. Rows that do not fill a
    64-row tile (intermediate 96, 160), K that ends inside a 128-column step (320, 160) and splits left with no
    step, the GEMV's sizes too; random codes over all 16 values and many exponents."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    monkeypatch.setattr(tk, "MX_SPLIT_K", str(split_k))
    size = {**CROWDED_SIZES, **EXPERT_SIZES, **K_CHUNK_SIZES}[name]
    torch.manual_seed(7)
    on_frags = _run_experts(name, size, "mxfp4_random_codes", torch.bfloat16, mx_gemm="regdot", frag=True)
    torch.manual_seed(7)
    plain = _run_experts(name, size, "mxfp4_random_codes", torch.bfloat16, mx_gemm="regdot")
    check(f"regdot on fragments against regdot {name}", on_frags, plain, TOL[torch.bfloat16])


@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("size", [(20, 320, 128, 5, 2), (17, 256, 64, 4, 2), (1, 256, 128, 4, 2)],
                         ids=["k_partial", "one_tile", "one_token"])
def test_fragments_gate_and_up_as_one_plain_matrix(size, split_k, monkeypatch):
    """ATOM_MX_FRAG_UNGATED: with K split, the gate / up matrix runs as one plain matrix of 2 x intermediate rows
    (the fragment kernel's GATED=False: a 64-row tile a program), and its float32 split sums land where the gated
    kernel's do, so the layer's output is the gated kernel's bit for bit; without a split the gated kernel runs.
    Intermediate 128 (two gate tiles, then two up tiles) with K ending inside a step, one 64-row tile each, and one
    token (the per-pair programs without the expert sort)."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    launches = spy_launches(monkeypatch, tk, "_expert_gemm_mxf_kernel")  # the gate / up launch's column blocks
    monkeypatch.setattr(tk, "MX_SPLIT_K", str(split_k))
    inter, outs = size[2], []
    for ungated in (False, True):
        monkeypatch.setattr(tk, "MX_FRAG_UNGATED", ungated)
        torch.manual_seed(11)
        launches.clear()
        name = "plain_gate_up_decode" if size[0] * size[4] <= tk.PAIR_GEMV_MAX_PAIRS else "plain_gate_up"
        outs.append(_run_experts(name, size, "mxfp4_random_codes", torch.bfloat16, mx_gemm="regdot", frag=True))
        assert launches[0].grid[1] == (2 if ungated and split_k > 1 else 1) * inter // 64
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("split_k", [1, 3])
def test_fragments_in_either_code_layout(split_k, monkeypatch):
    """The fragment kernel reads pack_fragments' default layout (a thread's words 0-3 and 4-7 in two 512-byte runs a
    warp) and stop 41-43's (a thread's 32 bytes together; MX_FRAG_WORDS_SPLIT off, kept for timings): the same
    output from the same weights."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    monkeypatch.setattr(tk, "MX_SPLIT_K", str(split_k))
    tokens, hidden, inter, experts, top_k = 20, 320, 96, 5, 2
    torch.manual_seed(5)
    x = rand(tokens, hidden, dtype=torch.bfloat16)
    w13, s13 = _mxfp4_weights(experts, 2 * inter, hidden, (121, 126))
    w2, s2 = _mxfp4_weights(experts, hidden, inter, (121, 126))
    b13, b2 = rand(experts, 2 * inter, dtype=torch.bfloat16), rand(experts, hidden, dtype=torch.bfloat16)
    weights, ids = ref_moe.moe_topk_softmax(rand(tokens, experts), top_k, True)
    empty = w13.new_empty(0)
    monkeypatch.setattr(tk, "MXFP4_SCALED_DOT", True)
    monkeypatch.setattr(tk, "MX_GEMM_MIN_PAIRS", 1)
    outs = []
    for split in (True, False):
        monkeypatch.setattr(tk, "MX_FRAG_WORDS_SPLIT", split)
        frags = (pack_fragments(w13, s13, halves=2, split_words=split), pack_fragments(w2, s2, split_words=split))
        outs.append(triton_op("fused_experts_swigluoai")(x, empty, empty, b13, b2, weights, ids, 1.702, 7.0, empty,
                                                         empty, *frags))
    assert torch.equal(outs[0], outs[1])
    check("fragments, either layout", outs[0], ref_experts(x, w13, w2, b13, b2, weights, ids, 1.702, 7.0, s13, s2),
          TOL[torch.bfloat16])


@pytest.fixture
def triton_experts(monkeypatch):
    """GPT-OSS experts layers built with the Triton fused_experts_swigluoai (CPU: under the interpreter)."""
    from atom.ops.registry import forget_resolutions

    monkeypatch.setenv("ATOM_KERNEL_OVERRIDES", "fused_experts_swigluoai=triton")
    forget_resolutions("fused_experts_swigluoai")
    yield
    forget_resolutions("fused_experts_swigluoai")


def _mxfp4_experts_layer(dtype=torch.bfloat16):
    from atom.layers.gpt_oss_moe import SwigluOaiExperts
    from atom.quantization.mxfp4 import Mxfp4Config

    layer = SwigluOaiExperts(4, 64, 96, 1.702, 7.0, params_dtype=dtype, quant_config=Mxfp4Config())
    (layer.w13_weight.data, layer.w13_weight_scale.data) = _mxfp4_weights(4, 192, 64, (120, 125))
    (layer.w2_weight.data, layer.w2_weight_scale.data) = _mxfp4_weights(4, 64, 96, (120, 125))
    layer.w13_bias.data, layer.w2_bias.data = rand(4, 192, dtype=dtype), rand(4, 64, dtype=dtype)
    return layer


def test_gpt_oss_experts_layer_keeps_and_reads_fragments(triton_experts, monkeypatch):
    """ATOM_MX_FRAG=1: the MXFP4 experts' process_weights_after_loading repacks them in fragment order (the Triton
    backend, bf16 models) and empties the checkpoint layout, forward passes the fragments to the kernels, and the
    layer's output is the reference's on the original weights; off, or for a float32 model, nothing changes."""
    from atom.ops.registry import impl_of
    from atom.ops.triton_kernels import moe_swigluoai as tk

    monkeypatch.setattr(tk, "MX_GEMM_MIN_PAIRS", 1)  # the grouped kernel at 24 pairs
    monkeypatch.setattr(tk, "MX_FRAG", False)
    off = _mxfp4_experts_layer()
    assert impl_of(off.quant_method.experts).backend == "triton"
    off.quant_method.process_weights_after_loading(off)
    assert off.w13_frag is None and off.w2_frag is None
    monkeypatch.setattr(tk, "MX_FRAG", True)
    on = _mxfp4_experts_layer()
    checkpoint = [getattr(on, n).detach().clone() for n in ("w13_weight", "w2_weight", "w13_weight_scale",
                                                            "w2_weight_scale")]
    on.quant_method.process_weights_after_loading(on)
    assert on.w13_frag.shape == (4, 2 * 2, 1, tk.FRAG_STEP_BYTES) and on.w2_frag.shape == (4, 1, 1,
                                                                                           tk.FRAG_STEP_BYTES)
    assert on.w13_weight.numel() == on.w2_weight_scale.numel() == 0  # one copy of the experts, not two
    float32 = _mxfp4_experts_layer(torch.float32)  # exact float32 dots would spill at the fragment tiles
    float32.quant_method.process_weights_after_loading(float32)
    assert float32.w13_frag is None and float32.w13_weight.numel() > 0
    x = rand(12, 64, dtype=torch.bfloat16)
    weights, ids = ref_moe.moe_topk_softmax(rand(12, 4), 2, True)
    launches = spy_launches(monkeypatch, tk, "_expert_gemm_mxf_kernel")
    got = on(x, weights, ids)
    assert len(launches) == 2  # gate / up, then down, from the fragments
    w13, w2, s13, s2 = checkpoint
    want = ref_experts(x, w13, w2, on.w13_bias, on.w2_bias, weights, ids, 1.702, 7.0, s13, s2)
    check("GPT-OSS experts layer on fragments", got, want, TOL[torch.bfloat16])


@pytest.mark.parametrize("frag", [False, True])
@pytest.mark.parametrize("concentrated", [False, True])
def test_split_down_projection_ends_in_the_top_k_sum(frag, concentrated, monkeypatch):
    """MX_SPLIT_SUM_TOPK: the split-K down projection's partial sums, its bias and rounding, and the weighted top-k
    sum in one kernel give the bits of _split_k_finish_kernel followed by moe._sum_topk (interpreter: 3 splits of
    a 160-wide K; the GPU runs the gpt-oss-20b shape, test_regdot_on_fragments_large's weights)."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    name, size = ("k_chunks_crowded", CROWDED_SIZES["k_chunks_crowded"]) if not ON_GPU else (
        "batch32", LARGE_EXPERT_SIZES["batch32"])
    monkeypatch.setattr(tk, "MX_SPLIT_K", "3")
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(tk, "MX_SPLIT_SUM_TOPK", fused)
        torch.manual_seed(11)
        outs.append(_run_experts(name, size, "mxfp4_random_codes", torch.bfloat16, mx_gemm="regdot",
                                 concentrated=concentrated, frag=frag))
    assert torch.equal(*outs), (outs[0].float() - outs[1].float()).abs().max()


@pytest.mark.parametrize("split", ["1", "3"])
@pytest.mark.parametrize("name", ["tiny_one_decode", "tiny_decode"])
def test_fragments_per_pair_without_the_sort(name, split, monkeypatch):
    """MX_FRAG_PER_PAIR_MAX_PAIRS: up to that many pairs the fragment kernel takes one program per pair (no expert
    sort): the reference's sums, and the same bits as the sorted tiles (each output column is its own dot), whole
    and split; 6 pairs of 3 tokens share experts, which only costs a second decode."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    monkeypatch.setattr(tk, "MX_SPLIT_K", split)
    outs = []
    for bound in (8, 0):
        monkeypatch.setattr(tk, "MX_FRAG_PER_PAIR_MAX_PAIRS", bound)
        torch.manual_seed(5)
        outs.append(_run_experts(name, EXPERT_SIZES[name], "mxfp4_random_codes", torch.bfloat16, frag=True))
    assert torch.equal(*outs), (outs[0].float() - outs[1].float()).abs().max()


@pytest.mark.parametrize("block_m", [32, 64])
@pytest.mark.parametrize("concentrated", [False, True])
def test_fragments_with_larger_token_tiles(block_m, concentrated, monkeypatch):
    """ATOM_MX_FRAG_BLOCK_M: 32 or 64 tokens a tile of the fragment kernel (one tile an expert when a batch goes to
    few experts), split and whole."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    monkeypatch.setattr(tk, "MX_FRAG_BLOCK_M", block_m)
    for split in ("1", "2"):
        monkeypatch.setattr(tk, "MX_SPLIT_K", split)
        _run_experts("crowded", CROWDED_SIZES["crowded"], "mxfp4_random_codes", torch.bfloat16, mx_gemm="regdot",
                     concentrated=concentrated, frag=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["tiny_decode", "k_chunks"])
def test_fused_experts_swigluoai_fragments_in_float32_and_prefill(name, dtype):
    """The fragment order alone serves float32 activations (exact float32 dots) and the prefill's path (its
    dequantization, _mx_frag_dequant_kernel, then the dense grouped GEMM)."""
    size = {**EXPERT_SIZES, **K_CHUNK_SIZES}[name]
    _run_experts(name, size, "mxfp4_random_codes", dtype, frag=True)
    _run_experts(name, size, "mxfp4_quantized", dtype, dequant=True, frag=True)


def test_fused_experts_swigluoai_refuses_mismatched_fragments():
    from atom.ops.triton_kernels import moe_swigluoai as tk

    x = rand(4, 64, dtype=torch.bfloat16)
    (w13, s13), (w2, s2) = _mxfp4_weights(2, 192, 64, (120, 125)), _mxfp4_weights(2, 64, 96, (120, 125))
    b13, b2 = rand(2, 192, dtype=torch.bfloat16), rand(2, 64, dtype=torch.bfloat16)
    weights, ids = ref_moe.moe_topk_softmax(rand(4, 2), 2, True)
    args = (x, w13, w2, b13, b2, weights, ids, 1.702, 7.0, s13, s2)
    f13, f2 = pack_fragments(w13, s13, halves=2), pack_fragments(w2, s2)
    with pytest.raises(ValueError, match="both or not at all"):
        tk.fused_experts_swigluoai(*args, f13, None)
    with pytest.raises(ValueError, match="w13_frag is"):
        tk.fused_experts_swigluoai(*args, pack_fragments(w13, s13), f2)  # 3 tiles of 192 rows, not 2 x 2 of 96
    empty = w13.new_empty(0)
    with pytest.raises(ValueError, match="fragment order only"):
        ref_experts(x, empty, empty, b13, b2, weights, ids, 1.702, 7.0, empty, empty, f13, f2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights_format", ["mxfp4_random_codes", "mxfp4_quantized"])
@pytest.mark.parametrize("name", ["tiny_decode", "tiny", "k_chunks"])
def test_fused_experts_swigluoai_dequant(name, weights_format, dtype):
    """Prefill's path (MX_DEQUANT_MIN_PAIRS): the MXFP4 experts dequantized by _mx_dequant_kernel, then the dense
    grouped GEMM; exact to the dequantized reference like the other paths."""
    _run_experts(name, {**EXPERT_SIZES, **K_CHUNK_SIZES}[name], weights_format, dtype, dequant=True)


def test_mxfp4_dequantize_matches_the_reference():
    """Every code and E8M0 scales over a wide range (2^-125 .. 2^72: no value falls below float32's normal range,
    which a GPU may flush), odd row counts and a K that ends inside a kernel block: bit for bit the reference
    dequantization, in float32 and bfloat16."""
    from atom.ops import mxfp4 as ref_mx
    from atom.ops.triton_kernels import moe_swigluoai as tk

    blocks, scales = _mxfp4_weights(3, 37, 320, (2, 200))
    want = ref_mx.dequantize_mxfp4(blocks, scales, torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        got = tk.mxfp4_dequantize(blocks, scales, dtype)
        assert got.dtype == dtype and got.shape == (3, 37, 320)
        assert torch.equal(got, want.to(dtype)), (got.float() - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weights_format", ["dense", "mxfp4_random_codes"])
@pytest.mark.parametrize("name", sorted(LARGE_EXPERT_SIZES))
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_fused_experts_swigluoai_large(name, weights_format, dtype):
    _run_experts(name, LARGE_EXPERT_SIZES[name], weights_format, dtype)


@pytest.mark.parametrize("name", sorted(LARGE_EXPERT_SIZES))
@pytest.mark.parametrize("mx_gemm", ["regdot", "scaled_dot"])
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_fused_experts_swigluoai_mx_gemm_large(name, mx_gemm):
    _run_experts(name, LARGE_EXPERT_SIZES[name], "mxfp4_random_codes", torch.bfloat16, mx_gemm=mx_gemm)


@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("tokens", [32, 128])
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_regdot_large_concentrated(tokens, split_k, monkeypatch):
    """gpt-oss-20b experts with every token on the same 4 experts (the random-weight engine's routing), K whole
    and split in 4, the compiled decode (PTX on CUDA)."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    monkeypatch.setattr(tk, "MX_SPLIT_K", str(split_k))
    _run_experts(f"batch{tokens}", (tokens, 2880, 2880, 32, 4), "mxfp4_random_codes", torch.bfloat16,
                 mx_gemm="regdot", concentrated=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU or torch.version.hip is not None, reason="needs an NVIDIA GPU (inline PTX)")
@pytest.mark.parametrize("tokens", [1, 4, 8, 64])
def test_mxfp4_ptx_decode_is_bit_identical(tokens, monkeypatch):
    """ATOM_MX_PTX: the inline-PTX decodes give the element-wise decode's bits at the gpt-oss-20b expert shapes,
    every code and many exponents, scales beyond 2^1 included (regdot's bf16 decode splits those over its two
    multiplies): the per-pair GEMV at 1-8 tokens, regdot's float32 and bf16 PTX decodes at 64; and they match
    the reference."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    x = rand(tokens, 2880, dtype=torch.bfloat16)
    w13, s13 = _mxfp4_weights(32, 2 * 2880, 2880, (116, 131))
    w2, s2 = _mxfp4_weights(32, 2880, 2880, (118, 125))
    b13, b2 = rand(32, 2 * 2880, dtype=torch.bfloat16), rand(32, 2880, dtype=torch.bfloat16)
    weights, ids = ref_moe.moe_topk_softmax(rand(tokens, 32), 4, True)
    args = (x, w13, w2, b13, b2, weights, ids, 1.702, 7.0, s13, s2)
    op = triton_op("fused_experts_swigluoai")
    monkeypatch.setattr(tk, "MX_GEMM", "regdot")
    monkeypatch.setattr(tk, "PAIR_GEMV_MAX_PAIRS", tk.MX_PTX_GEMV_MAX_PAIRS)  # the same kernel without PTX too
    for ptx in (False, True):
        assert tk.experts_path(x.dtype, True, tokens * 4, ptx) == ("per_pair" if tokens <= 8 else "mx_gemm")
    bf16_ok = tk._has_bf16x2_mul(x.device.index)  # sm_90+; otherwise regdot takes the float32 PTX decode
    for split in ("1", "3") if tokens > 8 else ("1",):  # regdot whole and split (the same sums both ways)
        monkeypatch.setattr(tk, "MX_SPLIT_K", split)
        monkeypatch.setattr(tk, "MX_PTX", False)
        plain = op(*args)
        monkeypatch.setattr(tk, "MX_PTX", True)
        assert tk._ptx_decode(x)  # not the element-wise decode against itself (e.g. under TRITON_INTERPRET)
        for bf16 in (False, True) if tokens > 8 and bf16_ok else (False,):
            monkeypatch.setattr(tk, "MX_REGDOT_BF16", bf16)
            ptx = op(*args)
            assert torch.equal(plain, ptx), (split, bf16, (plain.float() - ptx.float()).abs().max())
        check(f"fused_experts_swigluoai ptx decode T{tokens} split {split}", ptx, ref_experts(*args),
              TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU or torch.version.hip is not None, reason="needs an NVIDIA GPU (inline PTX)")
@pytest.mark.parametrize("concentrated", [False, True])
@pytest.mark.parametrize("tokens", [1, 8, 32, 128, 1024])
def test_regdot_on_fragments_large(tokens, concentrated, monkeypatch):
    """The fragment order at the gpt-oss-20b expert shapes (every code, scales up to 2^1, the single-multiply
    limit): regdot's fragment kernel at 1-128 tokens (the GEMV's sizes too), their dequantization at 1,024 (the
    prefill's path): the PTX decode gives the Triton integer decode's bits, whole and split over K, and both match
    the reference and the checkpoint layout's paths."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    if not tk._has_bf16x2_mul(None):
        pytest.skip("the fragment decode's bf16x2 multiply needs sm_90")
    x = rand(tokens, 2880, dtype=torch.bfloat16)
    w13, s13 = _mxfp4_weights(32, 2 * 2880, 2880, (116, 129))
    w2, s2 = _mxfp4_weights(32, 2880, 2880, (118, 125))
    b13, b2 = rand(32, 2 * 2880, dtype=torch.bfloat16), rand(32, 2880, dtype=torch.bfloat16)
    weights, ids = ref_moe.moe_topk_softmax(rand(tokens, 32), 4, True)
    if concentrated:
        ids = torch.tensor([1, 9, 17, 25], device=DEVICE).to(ids).expand(tokens, 4).contiguous()
    args = (x, w13, w2, b13, b2, weights, ids, 1.702, 7.0, s13, s2)
    frags = (pack_fragments(w13, s13, halves=2), pack_fragments(w2, s2))
    op = triton_op("fused_experts_swigluoai")
    monkeypatch.setattr(tk, "MX_GEMM", "regdot")
    monkeypatch.setattr(tk, "MX_GEMM_MIN_PAIRS", 1)  # the grouped kernel from one token
    want = ref_experts(*args)
    plain = op(*args)
    for split in ("1", "3"):
        monkeypatch.setattr(tk, "MX_SPLIT_K", split)
        monkeypatch.setattr(tk, "MX_PTX", False)  # _frag_decode_tl on the GPU
        integer = op(*args, *frags)
        monkeypatch.setattr(tk, "MX_PTX", True)
        ptx = op(*args, *frags)
        assert torch.equal(integer, ptx), (split, (integer.float() - ptx.float()).abs().max())
        check(f"regdot on fragments T{tokens} split {split}", ptx, want, TOL[torch.bfloat16])
        check(f"regdot on fragments against regdot T{tokens} split {split}", ptx, plain, TOL[torch.bfloat16])


def test_split_k_rule(monkeypatch):
    """ATOM_MX_SPLIT_K: a number, or "T:S,...,S" (up to T tokens split S, the last S beyond); anything else is
    refused with the variable's name; scaled-dot never splits."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    assert tk._split_rule("48:4,192:2,1") == ((48, 4), (192, 2), (2**62, 1))
    for bad in ("0", "four", "48:", "48:0,1", "", "48:4"):  # "48:4": no split beyond 48 tokens
        with pytest.raises(ValueError, match="ATOM_MX_SPLIT_K"):
            tk._split_rule(bad)
    monkeypatch.setattr(tk, "MX_SPLIT_K", "auto")  # each kernel its own rule
    monkeypatch.setattr(tk, "MX_SPLIT_K_RULE", "64:3,1")
    monkeypatch.setattr(tk, "MX_FRAG_SPLIT_K_RULE", "8:2,1")
    assert [tk._mx_split_k(t, "regdot") for t in (1, 64, 65)] == [3, 3, 1]
    assert [tk._mx_split_k(t, "regdot", frag=True) for t in (1, 8, 9, 64)] == [2, 2, 1, 1]
    monkeypatch.setattr(tk, "MX_SPLIT_K", "48:4,192:2,1")  # a set rule: both kernels
    assert [tk._mx_split_k(t, "regdot") for t in (1, 48, 49, 192, 193)] == [4, 4, 2, 2, 1]
    assert [tk._mx_split_k(t, "regdot", frag=True) for t in (1, 48, 49, 192, 193)] == [4, 4, 2, 2, 1]
    assert tk._mx_split_k(32, "scaled_dot") == 1
    monkeypatch.setattr(tk, "MX_SPLIT_K", "3")
    assert tk._mx_split_k(1000, "regdot") == 3


def test_mxfp4_default_paths():
    """By default (the H200 timings in moe_swigluoai): MXFP4 with bf16 / fp16 activations runs the per-pair
    GEMV up to PAIR_GEMV_MAX_PAIRS pairs (MX_PTX_GEMV_MAX_PAIRS with the PTX decode), regdot beyond and the
    dequantized weights from MX_DEQUANT_MIN_PAIRS; float32 activations and dense weights never take the MXFP4
    GEMM."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    assert tk.MXFP4_SCALED_DOT == (os.environ.get("ATOM_MXFP4_SCALED_DOT", "1") == "1")
    assert tk.MX_GEMM == os.environ.get("ATOM_MX_GEMM", "regdot")
    assert tk.MX_PTX == (os.environ.get("ATOM_MX_PTX", "1") == "1")
    dequant = tk.MX_DEQUANT_MIN_PAIRS
    assert dequant == int(os.environ.get("ATOM_MX_DEQUANT_MIN_PAIRS", "2720"))
    for ptx, limit in ((False, tk.PAIR_GEMV_MAX_PAIRS), (True, tk.MX_PTX_GEMV_MAX_PAIRS)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert tk.experts_path(dtype, True, limit, ptx) == "per_pair"
            assert tk.experts_path(dtype, False, tk.PAIR_GEMV_MAX_PAIRS, ptx) == "per_pair"
            assert tk.experts_path(dtype, False, tk.PAIR_GEMV_MAX_PAIRS + 1, ptx) == "grouped"
            mid = tk.experts_path(dtype, True, limit + 1, ptx)
            assert mid == ("mx_gemm" if tk.MXFP4_SCALED_DOT and dtype != torch.float32 else "grouped")
            if dequant > limit + 1:
                assert tk.experts_path(dtype, True, dequant - 1, ptx) == mid
            if dequant > 0:
                assert tk.experts_path(dtype, True, dequant, ptx) == "dequant"
            assert tk.experts_path(dtype, False, 1 << 20, ptx) == "grouped"


def test_fused_experts_swigluoai_refuses_half_mxfp4():
    x = rand(2, 64)
    w13, s13 = _mxfp4_weights(4, 64, 64, (120, 125))
    with pytest.raises(ValueError, match="both MXFP4 scales"):
        triton_op("fused_experts_swigluoai")(x, w13, w13, rand(4, 64), rand(4, 64), torch.ones(2, 1),
                                             torch.zeros(2, 1, dtype=torch.long), 1.702, 7.0, s13, None)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("tokens, mx_gemm", [(1, None), (64, None), (64, "regdot"), (64, "scaled_dot"),
                                            (64, "regdot_frag")])
# one token: the per-pair GEMV; 64: the register-decode grouped GEMM or an MXFP4 grouped kernel (regdot_frag: on
# the fragment-order copy)
def test_mxfp4_experts_capture_in_a_cuda_graph(tokens, mx_gemm, monkeypatch):
    """Decode runs as CUDA-graph replays: no host sync may hide in the MXFP4 path (tile choice, sort)."""
    from atom.ops.triton_kernels import moe_swigluoai as tk

    frag = mx_gemm == "regdot_frag"
    mx_gemm = "regdot" if frag else mx_gemm
    monkeypatch.setattr(tk, "MXFP4_SCALED_DOT", mx_gemm is not None)
    monkeypatch.setattr(tk, "MX_GEMM", mx_gemm or tk.MX_GEMM)
    x = rand(tokens, 2880, dtype=torch.bfloat16)
    w13, s13 = _mxfp4_weights(32, 2 * 2880, 2880, (118, 125))
    w2, s2 = _mxfp4_weights(32, 2880, 2880, (118, 125))
    b13, b2 = rand(32, 2 * 2880, dtype=torch.bfloat16), rand(32, 2880, dtype=torch.bfloat16)
    weights, ids = ref_moe.moe_topk_softmax(rand(tokens, 32), 4, True)
    op = triton_op("fused_experts_swigluoai")
    args = (x, w13, w2, b13, b2, weights, ids, 1.702, 7.0, s13, s2)
    if frag:
        args += (pack_fragments(w13, s13, halves=2), pack_fragments(w2, s2))
    eager = op(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(*args)
    x.copy_(rand(tokens, 2880, dtype=torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(out, op(*args))
    assert not torch.equal(out, eager)


def _as_kernel_casts(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 t cast to dtype as the kernels' final cast does: round to nearest on a GPU; the interpreter (Triton
    3.9) truncates float32 -> bf16 (see TOL)."""
    if ON_GPU or dtype == torch.float32:
        return t.to(dtype)
    return (t.view(torch.int32) & -65536).view(torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights_format", ["dense", "mxfp4_random_codes"])
def test_fused_experts_swigluoai_weights_each_pair_row_in_float32(weights_format, dtype):
    """The per-pair GEMV path: each pair's down projection (+ bias) is rounded to the activation dtype and the
    top-k sum is sum_k w_k * row_k.float(), each product rounded to float32 (the reference's rounding points): the
    top-2 output equals that composition of the rows the op gives at top-1 with weight 1 (then its output is the
    row itself), bit for bit (two terms: the sum's order does not matter)."""
    tokens, hidden, inter, experts = 5, 64, 96, 6
    x = rand(tokens, hidden, dtype=dtype)
    if weights_format == "dense":
        w13 = rand(experts, 2 * inter, hidden, dtype=dtype, scale=hidden**-0.5)
        w2 = rand(experts, hidden, inter, dtype=dtype, scale=inter**-0.5)
        s13 = s2 = None
    else:
        (w13, s13), (w2, s2) = _mxfp4_weights(experts, 2 * inter, hidden, (121, 126)), _mxfp4_weights(
            experts, hidden, inter, (121, 126))
    b13, b2 = rand(experts, 2 * inter, dtype=dtype, scale=0.3), rand(experts, hidden, dtype=dtype, scale=0.3)
    ids = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)]).to(DEVICE)
    weights = torch.rand(tokens, 2, device=DEVICE) + 0.1  # not normalized: every product rounds
    op = triton_op("fused_experts_swigluoai")
    from atom.ops.triton_kernels import moe_swigluoai as tk

    assert tokens * 2 <= tk.PAIR_GEMV_MAX_PAIRS  # both calls take the GEMV: each pair's row computed alone
    common = (x, w13, w2, b13, b2)
    rows = [op(*common, torch.ones(tokens, 1, device=DEVICE), ids[:, k:k + 1].contiguous(), 1.702, 7.0, s13, s2)
            for k in range(2)]
    out = op(*common, weights, ids, 1.702, 7.0, s13, s2)
    want = _as_kernel_casts(rows[0].float() * weights[:, :1] + rows[1].float() * weights[:, 1:], dtype)
    assert out.dtype == dtype and torch.equal(out, want), (out.float() - want.float()).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sum_topk_rounds_each_weighted_row_before_adding(dtype, monkeypatch):
    """moe._sum_topk with routing weights (the bf16, FP8 and GPT-OSS experts' top-k sum): out = sum_k w_k *
    y_k.float() with each product rounded to float32, pairs of id -1 left out, bit for bit; it is compiled without
    floating-point contraction, which would turn w_k * y_k + partial into one fma (sm_90 PTX, Triton 3.9; emulated
    on random top-4 rows, 23% of the float32 sums and 1 bf16 output in ~60,000 change). On a GPU the compiled PTX
    holds no fma."""
    from atom.ops.triton_kernels import moe

    launches = spy_launches(monkeypatch, moe, "_sum_topk_kernel")
    tokens, width = (512, 2880) if ON_GPU else (6, 300)
    y = rand(tokens * 2, width, dtype=dtype)
    ids = torch.randint(0, 8, (tokens, 2), device=DEVICE)
    ids[1, 0] = ids[2, 1] = -1  # another rank's experts
    weights = torch.rand(tokens, 2, device=DEVICE) + 0.1
    out = moe._sum_topk(y, ids.reshape(-1), tokens, 2, torch.float32, weights.reshape(-1).contiguous())
    terms = y.float().view(tokens, 2, width) * weights[:, :, None]
    terms = torch.where((ids >= 0)[:, :, None], terms, 0.0)
    assert torch.equal(out, terms[:, 0] + terms[:, 1]), (out - terms[:, 0] - terms[:, 1]).abs().max()
    (_, kwargs, compiled), = launches
    assert kwargs.get("enable_fp_fusion") is False
    if ON_GPU and torch.version.hip is None:
        assert "fma" not in compiled.asm["ptx"]
