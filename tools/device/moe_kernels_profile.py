"""Per-kernel GPU times of fused_experts at decode sizes (torch.profiler), on an expert shape.

    PYTHONPATH=packages/atom-core/src python3 tools/device/moe_kernels_profile.py [--tokens 1,4] [--shape v2-lite]

Shapes: qwen3-30b-a3b (128 experts, top-8, H 2048, I 768) and v2-lite (DeepSeek-V2-Lite's 64 routed experts
top-6 plus its 2 shared experts as expert slots, always chosen: 8 pairs a token, H 2048, I 1408).
ATOM_PAIR_SWEEP='[{"gate_block_n": 16, "down_block_n": 32, "block_k": 256, "down_block_k": 128, "num_warps": 4}, ...]'
times the per-pair kernels with each tile (None in the list: the shipped choice).
ATOM_GEMM_SWEEP='[{"block_m": 16, "block_n": 32, "block_k": 128, "num_warps": 4, "num_stages": 4}, ...]' does the same
for the sorted path's grouped GEMM (both projections take the tile, "down": {...} in it overrides the down projection's
block_n / block_k / warps / stages / n_major; `_gemm_tile` is the shipped rule); the sorted rows print the two projections
apart and the TFLOP/s of both.
--fp8 block|channel: the FP8 experts (fp8_fused_experts; 128 x 128 block scales or per-channel scales, weights
quantized from the same random bf16 ones); ATOM_GEMM_SWEEP then sets moe_fp8.GEMM_TILE_OVERRIDE (block_m, block_n,
num_warps, num_stages, n_major; block_k: the scale group for block scales, free for per-channel ones; "down": {...}
for the down projection alone), e.g.
ATOM_GEMM_SWEEP='[null, {"block_m": 64, "block_n": 128, "num_warps": 8, "num_stages": 3, "n_major": true}]'.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

from atom.ops import moe as ref_moe
from atom.ops.registry import resolve
from atom.ops.triton_kernels import moe as tk_moe
from atom.ops.triton_kernels import moe_fp8 as tk_fp8

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", default="1,4")
ap.add_argument("--shape", default="qwen3-30b-a3b", choices=["qwen3-30b-a3b", "v2-lite"])
ap.add_argument("--fp8", choices=["block", "channel"], default=None, help="FP8 experts with these scales")
opts = ap.parse_args()
# experts, routed top-k, shared slots, hidden, intermediate
E, K, S, H, I = (128, 8, 0, 2048, 768) if opts.shape == "qwen3-30b-a3b" else (64, 6, 2, 2048, 1408)
w13 = (torch.randn(E + S, 2 * I, H, device="cuda") * H**-0.5).bfloat16()
w2 = (torch.randn(E + S, H, I, device="cuda") * I**-0.5).bfloat16()
op = resolve("fused_experts", "triton")
kernel = "_expert_gemm_kernel"
if opts.fp8:
    from atom.ops import quant_fp8 as Q

    bs = [128, 128] if opts.fp8 == "block" else None

    def quantize(w):  # [E, N, K] -> fp8 codes and scales per expert (gate and up stack: 128-row blocks)
        parts = [Q.quantize_weight_fp8(w[e], opts.fp8, (128, 128), torch.float8_e4m3fn) for e in range(w.shape[0])]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

    (q13, s13), (q2, s2) = quantize(w13), quantize(w2)
    del w13, w2
    fp8_op = resolve("fp8_fused_experts", "triton")
    op = lambda x, _w13, _w2, tw, tid: fp8_op(x, q13, q2, s13, s2, tw, tid, "silu", bs)  # noqa: E731
    w13 = w2 = None
    kernel = "_fp8_expert_gemm_kernel"
for tokens in [int(t) for t in opts.tokens.split(",")]:
    tiles = json.loads(os.environ.get("ATOM_PAIR_SWEEP", "null")) or [None]  # None: the shipped tiles
    gemm_tiles = json.loads(os.environ.get("ATOM_GEMM_SWEEP", "null")) or [None]
    runs = [("per-pair", 16, t, None) for t in tiles] if tokens * (K + S) <= 16 else []
    for path, limit, tile, gemm in runs + [("sorted", 0, tiles[0], g) for g in gemm_tiles]:
        tk_moe.PAIR_GEMV_MAX_PAIRS, tk_moe.PAIR_TILE_OVERRIDE, tk_moe.GEMM_TILE_OVERRIDE = limit, tile, gemm
        if opts.fp8:  # the FP8 kernels read the float module's pair limit; their own tile overrides
            tk_fp8.PAIR_TILE_OVERRIDE, tk_fp8.GEMM_TILE_OVERRIDE, tk_moe.GEMM_TILE_OVERRIDE = tile, gemm, None
        x = torch.randn(tokens, H, device="cuda").bfloat16()
        tw, tid = ref_moe.moe_topk_softmax(torch.randn(tokens, E, device="cuda"), K, True)
        if S:
            from atom.ops.moe_routing import append_shared

            tw, tid = append_shared(tw, tid, E, S)
        for _ in range(3):
            op(x, w13, w2, tw, tid)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                op(x, w13, w2, tw, tid)
            torch.cuda.synchronize()
        print(f"== {opts.shape}{' fp8 ' + opts.fp8 if opts.fp8 else ''} T{tokens} {path} "
              f"{(tile or 'default tile') if limit else (gemm or 'default tile')}")
        for evt in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
            if evt.device_time_total > 0:
                print(f"   {evt.key[:60]:60s} {evt.device_time_total / evt.count:8.1f} us x{evt.count // 20}")
        # the grouped GEMM's two launches a call, in launch order: gate|up, then down
        gemms = sorted((e for e in prof.events() if e.name == kernel and e.device_time_total > 0),
                       key=lambda e: e.time_range.start)
        if len(gemms) >= 2 and len(gemms) % 2 == 0:
            gate = sum(e.device_time_total for e in gemms[0::2]) / (len(gemms) // 2)
            down = sum(e.device_time_total for e in gemms[1::2]) / (len(gemms) // 2)
            flop = 2 * tokens * (K + S) * H * I * 3
            print(f"   gate|up {gate:8.1f} us, down {down:8.1f} us, {flop / (gate + down) / 1e6:6.1f} TFLOP/s")
tk_moe.PAIR_GEMV_MAX_PAIRS, tk_moe.PAIR_TILE_OVERRIDE, tk_moe.GEMM_TILE_OVERRIDE = 16, None, None
tk_fp8.PAIR_TILE_OVERRIDE = tk_fp8.GEMM_TILE_OVERRIDE = None
