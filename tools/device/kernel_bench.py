"""Micro-benchmark of atom-core's Triton kernels against their bandwidth (or matrix-rate) floor.

Run on a GPU machine: PYTHONPATH=packages/atom-core/src python3 tools/device/kernel_bench.py [--out f.json]
Each row: median time (triton.testing.do_bench), the fewest bytes the op must move (every input read once,
every output written once), achieved GB/s and its share of the measured device-to-device copy rate, and
the torch reference's median time on the same inputs. Inputs are random, never zeros.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import json

import torch
import triton
from triton.testing import do_bench

from atom.ops import activation as ref_act
from atom.ops import attention as ref_attn
from atom.ops import mla as ref_mla
from atom.ops import moe as ref_moe
from atom.ops import norm as ref_norm
from atom.ops import rope as ref_rope
from atom.ops import sampling as ref_sampling
from atom.ops.registry import resolve

DEV = "cuda"
BF16 = torch.bfloat16


def t(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def graph_time(fn) -> float:
    """Median ms of a CUDA-graph replay of fn: the GPU time without Python launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return t(g.replay)


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy, bytes read + written."""
    a = torch.randn(1 << 28, device=DEV)  # 1 GiB of fp32
    b = torch.empty_like(a)
    ms = t(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / ms / 1e6


class GraphRows:
    """Rows of a weight-streaming bench: `time(name, fn, nbytes, calls)` times `calls` calls of fn in one CUDA graph
    (graph_time), prints us a call, GB/s of `nbytes` and the share of the copy rate `copy_gbs`, keeps the row in
    `.rows` and returns the us (None, with the row marked failed, where fn does not run: a tile that does not
    compile is a row, not the end of the run)."""

    def __init__(self, copy_gbs: float, width: int = 70):
        self.copy, self.width, self.rows = copy_gbs, width, []

    def time(self, name: str, fn, nbytes: float, calls: int) -> float | None:
        try:
            us = graph_time(fn) * 1e3 / calls
        except Exception as e:  # noqa: BLE001
            print(f"{name:{self.width}s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            self.rows.append(dict(name=name, error=str(e)[:500]))
            return None
        gbs = nbytes / us / 1e3
        print(f"{name:{self.width}s} {us:8.2f} us {gbs:7.0f} GB/s {100 * gbs / self.copy:5.1f}% of copy", flush=True)
        self.rows.append(dict(name=name, us=us, gbs=gbs, pct_copy=100 * gbs / self.copy))
        return us


def rnd(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def paged(batch, q_len, ctx, hq=32, hkv=8, d=128, bs=16):
    seq = [c + q_len for c in ctx]
    nblk = [triton.cdiv(s, bs) for s in seq]
    perm = torch.randperm(sum(nblk), device=DEV).int()
    tables = torch.zeros(batch, max(nblk), dtype=torch.int32, device=DEV)
    used = 0
    for i, n in enumerate(nblk):
        tables[i, :n] = perm[used:used + n]
        used += n
    kc, vc = rnd(sum(nblk), bs, hkv, d), rnd(sum(nblk), bs, hkv, d)
    qsl = (torch.arange(batch + 1, device=DEV) * q_len).int()
    q = rnd(batch * q_len, hq, d)
    lens = torch.tensor(seq, dtype=torch.int32, device=DEV)
    args = (q, kc, vc, tables, qsl, lens, d**-0.5, None, None, q_len, max(seq))
    kv_bytes = sum(seq) * hkv * d * 2 * 2
    return args, kv_bytes + 2 * q.numel() * 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--no-ref", action="store_true", help="skip timing the torch references")
    ap.add_argument("--moe-only", action="store_true", help="only the MoE rows and tile sweeps")
    ap.add_argument("--gpt-oss-only", action="store_true", help="only the GPT-OSS rows (sinks, MXFP4 experts)")
    ap.add_argument("--fp8-only", action="store_true", help="only the FP8 rows (GEMM, MoE, KV cache) and sweeps")
    ap.add_argument("--fp8-decode-only", action="store_true",
                    help="with --fp8-only: only the decode-size linear rows (GEMV variants, tl.dot, cuBLAS) and sweeps")
    ap.add_argument("--fp8-producers-only", action="store_true",
                    help="only the FP8 producer rows (norm / SiLU-and-mul emitting FP8, fp8_linear_quantized)")
    ap.add_argument("--mla-only", action="store_true", help="only the MLA and grouped-routing rows")
    opts = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rows = []

    def bench(name, op, ref, args, nbytes, flops=0.0, graph=True):
        eager = t(lambda: op(*args))
        # rates from the graph replay where the op can be captured (no host syncs): that is how the
        # engine runs decode; eager time adds Python launch overhead
        ms = graph_time(lambda: op(*args)) if graph else eager
        ref_ms = t(lambda: ref(*args)) if (ref is not None and not opts.no_ref) else float("nan")
        rows.append(dict(kernel=name, ms=ms, eager_ms=eager, graph=graph, bytes=nbytes, gbps=nbytes / ms / 1e6,
                         frac_bw=nbytes / ms / 1e6 / bw, tflops=flops / ms / 1e9 if flops else 0.0, ref_ms=ref_ms))
        print(f"{name:44s} {ms * 1e3:9.1f} us (eager {eager * 1e3:8.1f})  {nbytes / ms / 1e6:7.0f} GB/s  "
              f"ref {ref_ms * 1e3:9.1f} us", flush=True)

    if opts.gpt_oss_only:
        gpt_oss_rows(bench)
        rows_out(rows, bw, opts)
        return
    if opts.fp8_producers_only:
        fp8_producer_rows(bench)
        rows_out(rows, bw, opts)
        return
    if opts.fp8_only:
        fp8_rows(bench, opts)
        if not opts.fp8_decode_only:
            fp8_producer_rows(bench)
        rows_out(rows, bw, opts)
        return

    T = 4096
    if opts.mla_only:
        mla_rows(bench, T)
        rows_out(rows, bw, opts)
        return
    if not opts.moe_only:
        H = 4096
        x, res, w = rnd(T, H), rnd(T, H), rnd(H)
        bench("rms_norm 4096x4096", resolve("rms_norm", "triton"), ref_norm.rms_norm, (x, w, 1e-6), 2 * T * H * 2)
        bench("fused_add_rms_norm 4096x4096", resolve("fused_add_rms_norm", "triton"), ref_norm.fused_add_rms_norm,
              (x, res, w, 1e-6), 4 * T * H * 2)

        hq, hk, d = 32, 8, 128
        qkv = rnd(T, (hq + 2 * hk) * d)
        q, k = qkv[:, : hq * d], qkv[:, hq * d : (hq + hk) * d]
        cs = torch.randn(32768, d, device=DEV)
        pos = torch.randint(0, 32768, (T,), device=DEV)
        bench("rotary_embedding T4096 32q/8k x128 neox", resolve("rotary_embedding", "triton"),
              ref_rope.rotary_embedding, (pos, q, k, d, cs, True), 2 * T * (hq + hk) * d * 2)

        inter = 14336
        xa = rnd(T, 2 * inter)
        for op in ("silu_and_mul", "gelu_tanh_and_mul"):
            bench(f"{op} 4096x{inter}", resolve(op, "triton"), getattr(ref_act, op), (xa,), 3 * T * inter * 2)

        kv = rnd(T, 2 * hk, d)
        kcache, vcache = rnd(8192, 16, hk, d), rnd(8192, 16, hk, d)
        slots = torch.randperm(8192 * 16, device=DEV)[:T]
        bench("reshape_and_cache T4096 8x128", resolve("reshape_and_cache", "triton"), ref_attn.reshape_and_cache,
              (kv[:, :hk], kv[:, hk:], kcache, vcache, slots), 4 * T * hk * d * 2)

        qw, kw = rnd(d), rnd(d)
        vv = qkv[:, (hq + hk) * d :]
        prep_bytes = (T * (hq + 2 * hk) * d + T * (hq + hk) * d + 2 * T * hk * d) * 2
        bench("qk_norm_rope_cache T4096 32q/8k x128", resolve("qk_norm_rope_cache", "triton"),
              resolve("qk_norm_rope_cache", "torch"), (pos, q, k, vv, qw, kw, 1e-6, d, cs, True, kcache, vcache, slots),
              prep_bytes)

        attn = resolve("paged_attention", "triton")
        for batch, ctx in ((1, 4096), (1, 32768), (32, 4096), (128, 1024), (128, 4096)):
            args, nbytes = paged(batch, 1, [ctx - 1] * batch)
            bench(f"paged_attention decode bs{batch} ctx{ctx}", attn,
                  ref_attn.paged_attention if batch * ctx <= 128 * 4096 else None, args, nbytes,
                  4 * batch * 32 * 128 * ctx)
        for batch, q_len, ctx in ((1, 4096, 0), (4, 1024, 0), (4, 512, 3584)):
            args, nbytes = paged(batch, q_len, [ctx] * batch)
            # causal: each query sees ctx + (its index + 1) keys
            pairs = batch * sum(ctx + i + 1 for i in range(q_len))
            bench(f"paged_attention prefill bs{batch} q{q_len} ctx{ctx}", attn, ref_attn.paged_attention, args,
                  nbytes, 4 * pairs * 32 * 128)
        mla_rows(bench, T)

    from atom.ops.triton_kernels import moe as tk_moe

    E, K, Hm, Im = 128, 8, 2048, 768
    logits = rnd(T, E)
    bench("moe_topk_softmax T4096 E128 k8", resolve("moe_topk_softmax", "triton"), ref_moe.moe_topk_softmax,
          (logits, K, True), T * E * 2 + T * K * 12)
    w13, w2 = rnd(E, 2 * Im, Hm, scale=Hm**-0.5), rnd(E, Hm, Im, scale=Im**-0.5)
    for tokens in (1, 32, 128, 1024, 4096):
        xm = rnd(tokens, Hm)
        tw, tid = ref_moe.moe_topk_softmax(rnd(tokens, E, dtype=torch.float32), K, True)
        touched = int(torch.unique(tid).numel())
        nbytes = touched * 3 * Hm * Im * 2 + 2 * tokens * Hm * 2
        bench(f"fused_experts qwen3-30b-a3b T{tokens} ({touched} experts)", resolve("fused_experts", "triton"),
              ref_moe.fused_experts, (xm, w13, w2, tw, tid), nbytes, 2 * tokens * K * 3 * Hm * Im)

    # the sort of (token, k) pairs by expert alone (two chunked kernels; 17 us a layer at 256 pairs when one
    # program did it): qwen3-30b-a3b (E128 k8) and deepseek-v2-lite (E64 k6) batch sizes, block_m as the GEMM's
    for experts, top_k, tokens in ((128, 8, 32), (128, 8, 128), (64, 6, 32), (64, 6, 128), (128, 8, 256)):
        _, tid = ref_moe.moe_topk_softmax(rnd(tokens, experts, dtype=torch.float32), top_k, True)
        block_m = tk_moe._gemm_tile(tokens * top_k, experts)["block_m"]
        bench(f"moe align-by-expert T{tokens} E{experts} k{top_k} ({tokens * top_k} pairs)",
              lambda ids, e=experts, b=block_m: tk_moe._align_by_expert(ids, e, b), None, (tid,), tid.numel() * 4)

    # decode sizes: the per-pair GEMV path, its tile, and the sorted path at the same size for comparison
    default_max_pairs = tk_moe.PAIR_GEMV_MAX_PAIRS
    for tokens in (1, 4):
        xm = rnd(tokens, Hm)
        tw, tid = ref_moe.moe_topk_softmax(rnd(tokens, E, dtype=torch.float32), K, True)
        pair_bytes = tokens * K * 3 * Hm * Im * 2 + 2 * tokens * Hm * 2  # weights read once per pair
        sweep = json.loads(os.environ.get("ATOM_PAIR_SWEEP", "null")) or [
            dict(gate_block_n=16, down_block_n=32, block_k=256, num_warps=4),
            dict(gate_block_n=4, down_block_n=8, block_k=1024, num_warps=4)]
        for tile in sweep:
            tk_moe.PAIR_TILE_OVERRIDE = tile
            bench(f"  sweep per-pair T{tokens} {tile}", resolve("fused_experts", "triton"), None,
                  (xm, w13, w2, tw, tid), pair_bytes)
        tk_moe.PAIR_TILE_OVERRIDE = None
        tk_moe.PAIR_GEMV_MAX_PAIRS = 0
        bench(f"  sorted path T{tokens}", resolve("fused_experts", "triton"), None, (xm, w13, w2, tw, tid), pair_bytes)
        tk_moe.PAIR_GEMV_MAX_PAIRS = default_max_pairs
    gemm_sweep = json.loads(os.environ.get("ATOM_GEMM_SWEEP", "null")) or [
        dict(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3),
        dict(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=3),
        dict(block_m=16, block_n=16, block_k=128, num_warps=2, num_stages=4)]
    for tokens in [int(v) for v in os.environ.get("ATOM_GEMM_SWEEP_TOKENS", "32").split(",")]:
        xm = rnd(tokens, Hm)
        tw, tid = ref_moe.moe_topk_softmax(rnd(tokens, E, dtype=torch.float32), K, True)
        nbytes = int(torch.unique(tid).numel()) * 3 * Hm * Im * 2 + 2 * tokens * Hm * 2
        bench(f"  default tile T{tokens}", resolve("fused_experts", "triton"), None, (xm, w13, w2, tw, tid), nbytes)
        for tile in gemm_sweep:
            tk_moe.GEMM_TILE_OVERRIDE = tile
            bench(f"  sweep fused_experts T{tokens} {tile}", resolve("fused_experts", "triton"), None,
                  (xm, w13, w2, tw, tid), nbytes)
        tk_moe.GEMM_TILE_OVERRIDE = None
    if opts.moe_only:
        rows_out(rows, bw, opts)
        return

    fp8_rows(bench, opts)
    fp8_producer_rows(bench)

    B, V = 128, 151936
    lg = torch.randn(B, V, device=DEV) * 4
    ones = torch.ones(B, device=DEV)
    sample = resolve("sample", "triton")
    bench("sample greedy B128 V151936", sample, ref_sampling.sample, (lg, ones * 0), B * V * 4, graph=False)
    bench("sample temperature B128 V151936", sample, ref_sampling.sample, (lg, ones * 0.8), B * V * 4, graph=False)
    topk = torch.full((B,), 50, device=DEV)
    bench("sample top-k 50 + top-p 0.9", sample, ref_sampling.sample, (lg, ones * 0.8, topk, ones * 0.9), B * V * 4, graph=False)
    bench("sample top-p 0.9 (sort fallback)", sample, ref_sampling.sample, (lg, ones * 0.8, None, ones * 0.9),
          B * V * 4, graph=False)

    gpt_oss_rows(bench)
    rows_out(rows, bw, opts)


def gpt_oss_rows(bench) -> None:
    """gpt-oss-20b shapes: attention with sinks (64 q / 8 kv heads x 64, window 128 on half the layers) and
    the MXFP4 experts (32 experts, top-4, hidden = intermediate = 2880). MXFP4 bytes: 0.5 per weight plus
    one scale byte per 32, and the touched experts' biases."""
    from atom.ops import moe_swigluoai as ref_oai
    from atom.ops.triton_kernels import moe_swigluoai as tk_oai

    attn = resolve("paged_attention", "triton")
    hq, hkv, d, window = 64, 8, 64, 128
    sinks = rnd(hq)
    for batch, ctx in ((1, 4096), (32, 4096), (128, 4096)):
        for win in (window, None):
            args, _ = paged(batch, 1, [ctx - 1] * batch, hq=hq, hkv=hkv, d=d)
            args = (*args[:7], win, *args[8:])
            seen = min(ctx, win or ctx)
            nbytes = batch * seen * hkv * d * 2 * 2 + 2 * batch * hq * d * 2
            bench(f"gpt-oss attention decode sinks bs{batch} ctx{ctx} window {win}",
                  lambda *a: attn(*a, sinks=sinks), None, args, nbytes, 4 * batch * hq * d * seen)
    args, _ = paged(4, 1024, [1024] * 4, hq=hq, hkv=hkv, d=d)
    pairs = 4 * sum(min(1024 + i + 1, window) for i in range(1024))
    bench("gpt-oss attention prefill sinks bs4 q1024 ctx1024 window 128",
          lambda *a: attn(*(a[:7]), window, *a[8:], sinks=sinks), None, args, 0, 4 * pairs * hq * d)
    # sinks over an FP8 KV cache (one byte a cached value)
    one = torch.ones((), device=DEV)
    args, _ = paged(32, 1, [4095] * 32, hq=hq, hkv=hkv, d=d)
    k8, v8 = args[1].to(torch.float8_e4m3fn), args[2].to(torch.float8_e4m3fn)
    fp8_args = (args[0], k8, v8, *args[3:7], window, *args[8:])
    bench("gpt-oss attention decode sinks bs32 ctx4096 window 128 fp8 KV",
          lambda *a: attn(*a, k_scale=one, v_scale=one, sinks=sinks), None, fp8_args,
          32 * window * hkv * d * 2 + 2 * 32 * hq * d * 2, 4 * 32 * hq * d * window)

    E, K, H, I = 32, 4, 2880, 2880
    op = resolve("fused_experts_swigluoai", "triton")
    blocks13 = torch.randint(0, 256, (E, 2 * I, H // 2), dtype=torch.uint8, device=DEV)
    scales13 = torch.randint(118, 125, (E, 2 * I, H // 32), dtype=torch.uint8, device=DEV)
    blocks2 = torch.randint(0, 256, (E, H, I // 2), dtype=torch.uint8, device=DEV)
    scales2 = torch.randint(118, 125, (E, H, I // 32), dtype=torch.uint8, device=DEV)
    dense13, dense2 = rnd(E, 2 * I, H, scale=H**-0.5), rnd(E, H, I, scale=I**-0.5)
    b13, b2 = rnd(E, 2 * I, scale=0.1), rnd(E, H, scale=0.1)
    mxfp4_expert_bytes = 3 * H * I // 2 + 3 * H * I // 32 + (2 * I + H) * 2
    dense_expert_bytes = 3 * H * I * 2 + (2 * I + H) * 2
    # scaled-dot tiles swept from 32 tokens (ATOM_MX_SWEEP='[{...}]' overrides; keys as moe_swigluoai.MX_TILE_OVERRIDE);
    # at 1 and 4 tokens every scaled-dot tile lost to the per-pair GEMV on 2026-12-02
    mx_sweep = json.loads(os.environ.get("ATOM_MX_SWEEP", "null")) or [
        dict(block_m=m, block_n=n, block_k=k, num_warps=w, num_stages=st)
        for m, n, k, w, st in ((16, 64, 128, 4, 3), (32, 128, 128, 4, 3), (32, 64, 128, 4, 3), (32, 128, 128, 4, 4),
                               (64, 128, 128, 4, 3), (16, 128, 128, 4, 3), (16, 64, 128, 4, 4), (32, 256, 128, 8, 3))]
    # per-pair GEMV tiles at 1 and 4 tokens (ATOM_OAI_PAIR_SWEEP overrides)
    pair_sweep = json.loads(os.environ.get("ATOM_OAI_PAIR_SWEEP", "null")) or [
        dict(gate_block_n=8, down_block_n=16, block_k=512, down_block_k=256, num_warps=4),
        dict(gate_block_n=16, down_block_n=32, block_k=256, num_warps=4),
        dict(gate_block_n=8, down_block_n=16, block_k=1024, down_block_k=512, num_warps=4),
        dict(gate_block_n=4, down_block_n=8, block_k=512, down_block_k=256, num_warps=4),
        dict(gate_block_n=8, down_block_n=8, block_k=512, down_block_k=512, num_warps=2)]
    # tiles of regdot (_expert_gemm_mxr_kernel; block_k: scale blocks per loop step x 32); ATOM_MX_REGDOT_SWEEP
    # overrides
    regdot_sweep = json.loads(os.environ.get("ATOM_MX_REGDOT_SWEEP", "null")) or [
        dict(block_m=m, block_n=n, block_k=k, num_warps=w, num_stages=st)
        for m, n, k, w, st in ((16, 64, 128, 4, 3), (32, 64, 128, 4, 3), (32, 128, 128, 4, 3), (64, 128, 128, 4, 3),
                               (16, 64, 256, 4, 3), (16, 32, 128, 4, 3), (32, 128, 64, 4, 4), (64, 128, 128, 8, 3))]
    # Each variant: its label, the moe_swigluoai settings it runs under (on top of: the MXFP4 grouped GEMM from one
    # pair on, no dequantization), the token counts it runs at, its tile sweep, the counts swept at, and the tile
    # override it sweeps. MX_PTX / MX_REGDOT_BF16 only take effect on CUDA (moe_swigluoai._ptx_decode).
    big = (32, 128, 512, 1024, 4096)
    # the per-pair GEMV at every size (both GEMV limits lifted, the GEMM from one past them)
    pair_settings = dict(PAIR_GEMV_MAX_PAIRS=1 << 30, MX_PTX_GEMV_MAX_PAIRS=1 << 30, MX_GEMM_MIN_PAIRS=None)
    variants = [
        ("per-pair", dict(pair_settings, MX_PTX=False), (1, 4), pair_sweep, (1, 4), "PAIR_TILE_OVERRIDE"),
        ("per-pair ptx", dict(pair_settings, MX_PTX=True), (1, 4), pair_sweep, (1, 4), "PAIR_TILE_OVERRIDE"),
        ("scaled-dot", dict(MX_GEMM="scaled_dot"), big, mx_sweep, (32, 128, 1024), "MX_TILE_OVERRIDE"),
        ("regdot", dict(MX_GEMM="regdot", MX_PTX=False), (4, *big), [], (), None),
        ("regdot ptx", dict(MX_GEMM="regdot", MX_PTX=True, MX_REGDOT_BF16=False), (4, *big), [], (), None),
        ("regdot bf16", dict(MX_GEMM="regdot", MX_PTX=True, MX_REGDOT_BF16=True), (4, *big), regdot_sweep,
         (4, 32, 128, 1024), "MX_TILE_OVERRIDE"),
        ("dequant+dense", dict(MX_DEQUANT_MIN_PAIRS=1), (128, 512, 1024, 4096), [], (), None),
    ]
    base = dict(MXFP4_SCALED_DOT=True, MX_GEMM_MIN_PAIRS=1, MX_DEQUANT_MIN_PAIRS=0)
    for tokens in (1, 4, 32, 128, 512, 1024, 4096):
        x = rnd(tokens, H)
        tw, tid = ref_moe.moe_topk_softmax(rnd(tokens, E, dtype=torch.float32), K, True)
        touched = int(torch.unique(tid).numel())
        act_bytes = 2 * tokens * H * 2
        flops = 2 * tokens * K * 3 * H * I
        ref = ref_oai.fused_experts_swigluoai if tokens <= 32 else None
        args = (x, blocks13, blocks2, b13, b2, tw, tid, 1.702, 7.0, scales13, scales2)
        nbytes = touched * mxfp4_expert_bytes + act_bytes
        ptx = tk_oai._ptx_decode(x)  # the label names the path that runs: the PTX decode moves the GEMV's limit
        path = tk_oai.experts_path(x.dtype, True, tokens * K, ptx)
        if path == "per_pair" and ptx:
            path += " ptx"
        elif path == "mx_gemm":
            path += f" {tk_oai.MX_GEMM}"
            if tk_oai.MX_GEMM == "regdot":
                path += f" {tk_oai.regdot_decode(x)}"
        bench(f"gpt-oss experts MXFP4 default T{tokens} ({touched} experts, {path})", op, ref, args, nbytes, flops)
        if tokens <= 128:  # the register-decode kernels (per-pair GEMV / _expert_gemm_kernel)
            with patched(tk_oai, MXFP4_SCALED_DOT=False, MX_DEQUANT_MIN_PAIRS=0):
                path = tk_oai.experts_path(x.dtype, True, tokens * K, ptx)
                path += " ptx" if path == "per_pair" and ptx else ""
                bench(f"gpt-oss experts MXFP4 register-decode T{tokens} ({path})", op, None, args, nbytes, flops)
        with patched(tk_oai, MX_DEQUANT_MIN_PAIRS=0):  # the differences below are from the packed-weight path
            want = op(*args).float()
        for label, settings, at, sweep, sweep_at, override in variants:
            if tokens not in at:
                continue
            with patched(tk_oai, **{**base, **settings}):
                for tile in [None, *(sweep if tokens in sweep_at else ())]:  # None: the variant's own tile choice
                    name = f"gpt-oss experts MXFP4 {label} T{tokens}" if tile is None else \
                        f"  sweep {label} T{tokens} {tuple(tile.values())}"
                    try:
                        with patched(tk_oai, **({override: tile} if override else {})):
                            diff = (op(*args).float() - want).abs().max().item()
                            bench(f"{name} (diff {diff:.2g} of max {want.abs().max().item():.3g})", op, None, args,
                                  nbytes, flops)
                    except Exception as exc:  # a tile (or a whole kernel) the compiler refuses
                        print(f"{name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if tokens in (1, 32, 128, 1024):
            bench(f"gpt-oss experts bf16 T{tokens} ({touched} experts)", op, None,
                  (x, dense13, dense2, b13, b2, tw, tid, 1.702, 7.0), touched * dense_expert_bytes + act_bytes, flops)
    # the dequantization alone (gate/up of one layer): packed codes + scales in, bf16 out
    bench("mxfp4_dequantize w13 32x5760x2880 -> bf16", lambda b, sc: tk_oai.mxfp4_dequantize(b, sc, torch.bfloat16),
          None, (blocks13, scales13), blocks13.numel() + scales13.numel() + 4 * blocks13.numel())


# qwen3-8b GEMMs (N, K): fused qkv, o, fused gate|up, down
FP8_LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}


@contextlib.contextmanager
def patched(module, **values):
    """Set module attributes for the rows inside, restore them after."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def fp8_rows(bench, opts) -> None:
    """FP8 rows: the 8b GEMMs at decode and prefill sizes (with cuBLAS bf16 on the same shape as the
    baseline to beat), the activation quantization kernels, the 30b-a3b experts, attention over an FP8 KV
    cache. Bytes = the FP8 weight (+ scales) read once + activations in and out: the bandwidth roofline of
    a weight-streaming GEMM. Per-channel rows above GEMV_MAX_M run torch._scaled_mm (SCALED_MM; `(scaled_mm)` in
    the name) with the tl.dot GEMM on the same call below them (`fp8 dot`). M <= 4 (decode): `fp8 gemv` rows (the GEMV at GEMV_MAX_M_CANDIDATE, quantizing its
    activations itself), `fp8 gemv+quant kernel` (the quantization kernel first) against
    `fp8 dot` (the same call with GEMV_MAX_M = 0: the tl.dot GEMM) and cuBLAS bf16. Sweeps:
    ATOM_FP8_GEMM_SWEEP='[{"block_m":16,"block_n":32,"num_warps":4,"num_stages":4,"split_k":4}, ...]' at
    ATOM_FP8_SWEEP_M (default 1,16,128) on the o and down shapes (tl.dot GEMM, M > 4); the GEMV's tiles:
    ATOM_FP8_GEMV_SWEEP='[{"block_n":32,"block_k":512,"num_warps":8,"split_k":2}, ...]' (keys as
    GEMV_TILE_OVERRIDE; unset: a built-in list, '[]': none) at ATOM_FP8_GEMV_SWEEP_M (default 1) on all four, in
    the layouts of ATOM_FP8_GEMV_SWEEP_LAYOUTS (default block,channel)."""
    import torch.nn.functional as F

    from atom.ops import quant_fp8 as Q
    from atom.ops.triton_kernels import quant_fp8 as tk_fp8

    lin = resolve("fp8_linear", "triton")
    tk_fp8.GEMV_MAX_M = tk_fp8.GEMV_MAX_M_CANDIDATE  # the gemv rows and sweeps time the GEMV
    weights = {}
    for proj, (n, k) in FP8_LINEARS.items():
        w = rnd(n, k, scale=k**-0.5)
        weights[proj] = dict(bf16=w, block=Q.quantize_weight_fp8(w, "block"), channel=Q.quantize_weight_fp8(w, "channel"))
    for proj, (n, k) in FP8_LINEARS.items():
        for m in (1, 2, 4):
            x = rnd(m, k)
            for layout in ("block", "channel"):
                q, s = weights[proj][layout]
                block = [128, 128] if layout == "block" else None
                nbytes = n * k + s.numel() * 4 + 2 * m * (k + n)
                with patched(tk_fp8, GEMV_FUSED_QUANT_PER_TOKEN=True):
                    bench(f"fp8 gemv 8b {proj} M{m} {layout}", lin, None, (x, q, s, None, block), nbytes,
                          2 * m * n * k)
                tk_fp8.GEMV_FUSED_QUANT = False
                try:
                    bench(f"  fp8 gemv+quant kernel 8b {proj} M{m} {layout}", lin, None, (x, q, s, None, block),
                          nbytes, 2 * m * n * k)
                finally:
                    tk_fp8.GEMV_FUSED_QUANT = True
                with patched(tk_fp8, GEMV_MAX_M=0, SCALED_MM=False):
                    bench(f"  fp8 dot 8b {proj} M{m} {layout}", lin, None, (x, q, s, None, block), nbytes,
                          2 * m * n * k)
                if layout == "channel":
                    with patched(tk_fp8, GEMV_MAX_M=0, SCALED_MM=True, SCALED_MM_MIN_M=0):
                        bench(f"  fp8 scaled_mm 8b {proj} M{m} {layout}", lin, None, (x, q, s, None, block),
                              nbytes, 2 * m * n * k)
            bench(f"  bf16 F.linear (cuBLAS) 8b {proj} M{m}", F.linear, None, (x, weights[proj]["bf16"]),
                  2 * n * k + 2 * m * (k + n), 2 * m * n * k)
    for proj, (n, k) in FP8_LINEARS.items() if not opts.fp8_decode_only else ():
        for m in (16, 32, 64, 128, 1024):
            x = rnd(m, k)
            for layout in ("block", "channel"):
                q, s = weights[proj][layout]
                block = [128, 128] if layout == "block" else None
                nbytes = n * k + s.numel() * 4 + 2 * m * (k + n)
                path = "scaled_mm" if tk_fp8.scaled_mm_applies(m, q, block, x.dtype) else "dot"
                bench(f"fp8_linear 8b {proj} M{m} {layout} ({path})", lin, None, (x, q, s, None, block), nbytes,
                      2 * m * n * k)
                if path == "scaled_mm":  # the tl.dot GEMM on the same call (ATOM_FP8_SCALED_MM=0)
                    with patched(tk_fp8, SCALED_MM=False):
                        bench(f"  fp8 dot 8b {proj} M{m} {layout}", lin, None, (x, q, s, None, block), nbytes,
                              2 * m * n * k)
                elif layout == "channel":  # torch._scaled_mm below SCALED_MM_MIN_M
                    with patched(tk_fp8, SCALED_MM_MIN_M=0):
                        bench(f"  fp8 scaled_mm 8b {proj} M{m} {layout}", lin, None, (x, q, s, None, block),
                              nbytes, 2 * m * n * k)
            bench(f"  bf16 F.linear (cuBLAS) 8b {proj} M{m}", F.linear, None, (x, weights[proj]["bf16"]),
                  2 * n * k + 2 * m * (k + n), 2 * m * n * k)
    sweep = json.loads(os.environ.get("ATOM_FP8_GEMM_SWEEP", "null")) or []
    for m in [int(v) for v in os.environ.get("ATOM_FP8_SWEEP_M", "1,16,128").split(",")] if sweep else []:
        for proj in os.environ.get("ATOM_FP8_SWEEP_PROJ", "o,down").split(","):
            n, k = FP8_LINEARS[proj]
            x = rnd(m, k)
            for layout in os.environ.get("ATOM_FP8_SWEEP_LAYOUT", "block").split(","):
                q, s = weights[proj][layout]
                block = [128, 128] if layout == "block" else None
                for tile in sweep:  # the tl.dot GEMM (scaled_mm off: it ignores the tile)
                    with patched(tk_fp8, GEMM_TILE_OVERRIDE=tile, SCALED_MM=False):
                        bench(f"  sweep fp8_linear {proj} M{m} {layout} {tile}", lin, None, (x, q, s, None, block),
                              n * k + 2 * m * (k + n), 2 * m * n * k)
    gemv_sweep = json.loads(os.environ.get("ATOM_FP8_GEMV_SWEEP", "null"))
    if gemv_sweep is None:  # around the default tiles ([16, 1024-2048]); W loads pipelined over K steps
        # (num_stages 2-3) were 2-4x slower on every shape (2026-12-02, KERNEL_NOTES.md) and are left out
        gemv_sweep = [dict(block_n=bn, block_k=bk, num_warps=w, split_k=sk) for bn, bk, w, sk in (
            (16, 2048, 8, 1), (16, 1024, 4, 1), (16, 1024, 8, 1), (16, 512, 4, 1), (32, 1024, 8, 1))]
        # (loading the next K step's W tile into registers early was measured slower on every shape, 2026-12-02:
        # gate_up 58.6-91.3 us against 39.9-43.3, o 17.3-21.4 against 13.0-16.7, down 38.4-50.0 against
        # 26.8-39.6; removed)
    for m in [int(v) for v in os.environ.get("ATOM_FP8_GEMV_SWEEP_M", "1").split(",")] if gemv_sweep else []:
        # block: the GEMV quantizes its 1 x 128 groups itself; channel (what --quantization fp8 makes): the
        # quantization kernel runs first, inside the row's time
        for proj, (n, k) in FP8_LINEARS.items():
            for layout in os.environ.get("ATOM_FP8_GEMV_SWEEP_LAYOUTS", "block,channel").split(","):
                q, s = weights[proj][layout]
                block = [128, 128] if layout == "block" else None
                x = rnd(m, k)
                for tile in gemv_sweep:
                    tk_fp8.GEMV_TILE_OVERRIDE = tile
                    try:
                        bench(f"  sweep fp8 gemv {proj} M{m} {layout} {tile}", lin, None, (x, q, s, None, block),
                              n * k + s.numel() * 4 + 2 * m * (k + n))
                    finally:
                        tk_fp8.GEMV_TILE_OVERRIDE = None
    if opts.fp8_decode_only:
        return
    for m, k in ((1, 4096), (128, 4096), (4096, 4096), (4096, 12288)):
        x = rnd(m, k)
        bench(f"fp8_quant_group M{m} K{k}", resolve("fp8_quant_group", "triton"), Q.per_token_group_quant_fp8,
              (x,), m * k * 3 + m * (k // 128) * 4)
        bench(f"fp8_quant_token M{m} K{k}", resolve("fp8_quant_token", "triton"), Q.per_token_quant_fp8, (x,),
              m * k * 3 + m * 4)

    E, K, Hm, Im = 128, 8, 2048, 768
    experts = resolve("fp8_fused_experts", "triton")
    float_experts = resolve("fused_experts", "triton")
    w13, w2 = rnd(E, 2 * Im, Hm, scale=Hm**-0.5), rnd(E, Hm, Im, scale=Im**-0.5)
    fp8_w = {}
    for layout in ("block", "channel"):
        q13, s13, q2, s2 = [], [], [], []
        for e in range(E):
            parts = [Q.quantize_weight_fp8(w13[e, j * Im:(j + 1) * Im], layout) for j in (0, 1)]
            q13.append(torch.cat([p[0] for p in parts]))
            s13.append(torch.cat([p[1] for p in parts]))
            a, b = Q.quantize_weight_fp8(w2[e], layout)
            q2.append(a)
            s2.append(b)
        fp8_w[layout] = (torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2))
    for tokens in (1, 2, 4, 32, 128, 1024):
        xm = rnd(tokens, Hm)
        tw, tid = ref_moe.moe_topk_softmax(rnd(tokens, E, dtype=torch.float32), K, True)
        touched = int(torch.unique(tid).numel())
        for layout in ("block", "channel"):
            q13, q2, s13, s2 = fp8_w[layout]
            nbytes = touched * 3 * Hm * Im + 2 * tokens * Hm * 2
            bench(f"fp8_fused_experts 30b-a3b T{tokens} ({touched} experts) {layout}", experts, None,
                  (xm, q13, q2, s13, s2, tw, tid, "silu", [128, 128] if layout == "block" else None), nbytes,
                  2 * tokens * K * 3 * Hm * Im)
        bench(f"  bf16 fused_experts 30b-a3b T{tokens}", float_experts, None, (xm, w13, w2, tw, tid),
              touched * 3 * Hm * Im * 2 + 2 * tokens * Hm * 2, 2 * tokens * K * 3 * Hm * Im)

    attn = resolve("paged_attention", "triton")
    one = torch.ones((), device=DEV)
    for batch, ctx in ((1, 4096), (32, 4096), (128, 4096)):
        args, nbytes = paged(batch, 1, [ctx - 1] * batch)
        q, kc, vc, *rest = args
        fp8_args = (q, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), *rest)
        kv_bytes = (nbytes - 2 * q.numel() * 2) // 2
        attn_fp8 = functools.partial(attn, k_scale=one, v_scale=one)
        bench(f"paged_attention decode bs{batch} ctx{ctx} fp8 KV", attn_fp8, None, fp8_args,
              kv_bytes + 2 * q.numel() * 2, 4 * batch * 32 * 128 * ctx)


# ---- FP8 producers (fp8-producer branch; atom.ops.fp8_producers) ----
def fp8_producer_rows(bench) -> None:
    """The 8b decoder's FP8 activation producers, fused against their unfused pairs, at M 16 / 128 (above
    GEMV_MAX_M: below it the GEMV quantizes inside itself), block (1 x 128 groups) and channel (per-token)
    layouts, all as CUDA-graph replays:
    - `fp8 producer add+rms_norm+quant` (one kernel) vs `  unfused: fused_add_rms_norm, quant` (two kernels);
    - `fp8 producer silu_and_mul+quant` vs `  unfused: silu_and_mul, quant`;
    - `fp8_linear_quantized 8b <proj>` (the tl.dot GEMM on pre-quantized input) vs `  fp8_linear` (quantization
      kernel + the same GEMM);
    - `fp8 chain <site>`: the producer and its linear together, fused vs unfused: the saving per call site
      (qkv after input_layernorm, gate_up after post_attention_layernorm, down after SiLU-and-mul).
    Bytes: what each kernel must read and write (the fused rows skip writing and re-reading the bf16 activations)."""
    from atom.ops import quant_fp8 as Q

    lin, lin_q = resolve("fp8_linear", "triton"), resolve("fp8_linear_quantized", "triton")
    add_norm, add_norm_q = resolve("fused_add_rms_norm", "triton"), resolve("fused_add_rms_norm_quant_fp8", "triton")
    silu, silu_q = resolve("silu_and_mul", "triton"), resolve("silu_and_mul_quant_fp8", "triton")
    quant_g, quant_t = resolve("fp8_quant_group", "triton"), resolve("fp8_quant_token", "triton")
    fp8 = torch.float8_e4m3fn
    H, inter = FP8_LINEARS["o"][1], FP8_LINEARS["down"][1]  # 4096, 12288
    weights = {proj: {layout: Q.quantize_weight_fp8(rnd(n, k, scale=k**-0.5), layout)
                      for layout in ("block", "channel")} for proj, (n, k) in FP8_LINEARS.items()}
    nw = 1 + 0.1 * rnd(H)
    for m in (16, 128):
        for layout in ("block", "channel"):
            group, block = (128, [128, 128]) if layout == "block" else (None, None)
            groups = H // 128 if group else 1

            def quant(y, group=group):
                return quant_g(y, group, fp8) if group else quant_t(y, fp8)

            x, res = rnd(m, H), rnd(m, H)
            gu = rnd(m, 2 * inter)
            norm_bytes = 3 * m * H * 2 + m * H + m * groups * 4
            bench(f"fp8 producer add+rms_norm+quant M{m} {layout}", add_norm_q, None,
                  (x, res, nw, 1e-6, group, fp8), norm_bytes)
            bench(f"  unfused: fused_add_rms_norm, quant M{m} {layout}",
                  lambda x, res: quant(add_norm(x, res, nw, 1e-6)[0]), None, (x, res), norm_bytes + 2 * m * H * 2)
            silu_bytes = m * 2 * inter * 2 + m * inter + m * (inter // 128 if group else 1) * 4
            bench(f"fp8 producer silu_and_mul+quant M{m} {layout}", silu_q, None, (gu, group, fp8), silu_bytes)
            bench(f"  unfused: silu_and_mul, quant M{m} {layout}", lambda gu: quant(silu(gu)), None, (gu,),
                  silu_bytes + 2 * m * inter * 2)
            for proj, (n, k) in FP8_LINEARS.items():
                q, s = weights[proj][layout]
                s = s.float()
                a = rnd(m, k)
                aq, as_ = Q.quantize_activations(a, block, fp8)
                nbytes = n * k + s.numel() * 4 + m * k + m * n * 2
                bench(f"fp8_linear_quantized 8b {proj} M{m} {layout}", lin_q, None,
                      (aq, as_, q, s, None, block, BF16), nbytes, 2 * m * n * k)
                bench(f"  fp8_linear 8b {proj} M{m} {layout}", lin, None, (a, q, s, None, block),
                      nbytes + m * k * 2, 2 * m * n * k)
            for site, proj in (("qkv", "qkv"), ("gate_up", "gate_up"), ("down", "down")):
                q, s = weights[proj][layout]
                s = s.float()
                n, k = FP8_LINEARS[proj]
                if site == "down":
                    fused = lambda gu, q=q, s=s: lin_q(*silu_q(gu, group, fp8), q, s, None, block, BF16)  # noqa: E731
                    unfused = lambda gu, q=q, s=s: lin(silu(gu), q, s, None, block)  # noqa: E731
                    args = (gu,)
                else:
                    def fused(x, res, q=q, s=s):
                        aq, as_, _ = add_norm_q(x, res, nw, 1e-6, group, fp8)
                        return lin_q(aq, as_, q, s, None, block, BF16)

                    def unfused(x, res, q=q, s=s):
                        return lin(add_norm(x, res, nw, 1e-6)[0], q, s, None, block)

                    args = (x, res)
                nbytes = n * k + s.numel() * 4 + m * n * 2
                bench(f"fp8 chain {site} M{m} {layout} fused", fused, None, args, nbytes, 2 * m * n * k)
                bench(f"  fp8 chain {site} M{m} {layout} unfused", unfused, None, args, nbytes, 2 * m * n * k)
# ---- end FP8 producers ----


def mla(batch, q_len, ctx, heads=16, lora=512, rope=64, nope=128, v=128, bs=16):
    """DeepSeek-V2-Lite's per-layer MLA shapes (V3: heads=128): paged latent cache, queries, kv_b_proj."""
    seq = [c + q_len for c in ctx]
    nblk = [triton.cdiv(s, bs) for s in seq]
    perm = torch.randperm(sum(nblk), device=DEV).int()
    tables = torch.zeros(batch, max(nblk), dtype=torch.int32, device=DEV)
    used = 0
    for i, n in enumerate(nblk):
        tables[i, :n] = perm[used:used + n]
        used += n
    cache = rnd(sum(nblk), bs, lora + rope)
    q = rnd(batch * q_len, heads, nope + rope)
    w = rnd(heads * (nope + v), lora, scale=nope**-0.5)
    qsl = (torch.arange(batch + 1, device=DEV) * q_len).int()
    lens = torch.tensor(seq, dtype=torch.int32, device=DEV)
    scale = (nope + rope) ** -0.5
    nbytes = (sum(seq) * (lora + rope) + w.numel() + q.numel() + batch * q_len * heads * v) * 2
    return q[..., :nope], q[..., nope:], cache, w, tables, qsl, lens, scale, max(seq), nbytes


def mla_rows(bench, T) -> None:
    """MLA decode (absorbed, split-K) and prefill (absorbed, varlen over a cached prefix), grouped top-k."""
    decode, prefill = resolve("mla_decode", "triton"), resolve("mla_prefill", "triton")
    for heads, batch, ctx in ((16, 1, 4096), (16, 32, 4096), (16, 128, 1024), (16, 128, 4096), (128, 32, 4096)):
        qn, qp, cache, w, tables, _, lens, scale, max_l, nbytes = mla(batch, 1, [ctx - 1] * batch, heads=heads)
        flops = 2 * batch * heads * (ctx * (512 + 64 + 512) + 128 * 512 * 2)
        bench(f"mla_decode H{heads} bs{batch} ctx{ctx}", decode,
              ref_mla.mla_decode if batch * ctx <= 32 * 4096 else None,
              (qn, qp, cache, w, tables, lens, scale, max_l), nbytes, flops)
        if batch > 1:  # the FP8 latent cache (--kv-cache-dtype fp8): half the cache bytes
            from atom.ops.attention import to_cache_dtype

            kv_scale = torch.tensor(0.05, device=DEV)
            fp8 = to_cache_dtype(cache, torch.float8_e4m3fn, kv_scale)
            fp8_bytes = nbytes - batch * ctx * (512 + 64)
            bench(f"mla_decode H{heads} bs{batch} ctx{ctx} fp8 latent", lambda *a: decode(*a, kv_scale=kv_scale),
                  None, (qn, qp, fp8, w, tables, lens, scale, max_l), fp8_bytes, flops)
    for batch, q_len, ctx in ((1, 4096, 0), (4, 1024, 0), (4, 512, 3584)):
        qn, qp, cache, w, tables, qsl, lens, scale, max_l, nbytes = mla(batch, q_len, [ctx] * batch)
        pairs = batch * sum(ctx + i + 1 for i in range(q_len))
        bench(f"mla_prefill H16 bs{batch} q{q_len} ctx{ctx}", prefill, None,
              (qn, qp, cache, w, tables, qsl, lens, scale, q_len, max_l), nbytes, 2 * pairs * 16 * (512 + 64 + 512),
              graph=False)
    for experts, k, groups, topk_group, scoring, gscore, bias in ((256, 8, 8, 4, "sigmoid", "top2_sum", True),
                                                                   (64, 6, 1, 1, "softmax", "max", False)):
        logits = torch.randn(T, experts, device=DEV)
        corr = torch.randn(experts, device=DEV) * 0.1 if bias else None
        bench(f"moe_grouped_topk T{T} E{experts} k{k} groups {groups}/{topk_group}", resolve("moe_grouped_topk", "triton"),
              resolve("moe_grouped_topk", "torch"),
              (logits, corr, k, groups, topk_group, scoring, gscore, True, 2.5), T * experts * 4 + T * k * 12)


def rows_out(rows, bw, opts) -> None:
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"measured copy bandwidth: {bw:.0f} GB/s (datasheet 4800)\n")
    print("| kernel | us (graph) | us eager | GB/s | % copy BW | TFLOP/s | torch ref us (eager) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        graph_us = f"{r['ms'] * 1e3:.1f}" if r["graph"] else "-"
        print(f"| {r['kernel']} | {graph_us} | {r['eager_ms'] * 1e3:.1f} | {r['gbps']:.0f} | "
              f"{100 * r['frac_bw']:.0f}% | {r['tflops']:.1f} | {r['ref_ms'] * 1e3:.1f} |")
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(dict(copy_gbps=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
