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

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", default="1,4")
ap.add_argument("--shape", default="qwen3-30b-a3b", choices=["qwen3-30b-a3b", "v2-lite"])
opts = ap.parse_args()
# experts, routed top-k, shared slots, hidden, intermediate
E, K, S, H, I = (128, 8, 0, 2048, 768) if opts.shape == "qwen3-30b-a3b" else (64, 6, 2, 2048, 1408)
w13 = (torch.randn(E + S, 2 * I, H, device="cuda") * H**-0.5).bfloat16()
w2 = (torch.randn(E + S, H, I, device="cuda") * I**-0.5).bfloat16()
op = resolve("fused_experts", "triton")
for tokens in [int(t) for t in opts.tokens.split(",")]:
    tiles = json.loads(os.environ.get("ATOM_PAIR_SWEEP", "null")) or [None]  # None: the shipped tiles
    gemm_tiles = json.loads(os.environ.get("ATOM_GEMM_SWEEP", "null")) or [None]
    runs = [("per-pair", 16, t, None) for t in tiles] if tokens * (K + S) <= 16 else []
    for path, limit, tile, gemm in runs + [("sorted", 0, tiles[0], g) for g in gemm_tiles]:
        tk_moe.PAIR_GEMV_MAX_PAIRS, tk_moe.PAIR_TILE_OVERRIDE, tk_moe.GEMM_TILE_OVERRIDE = limit, tile, gemm
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
        print(f"== {opts.shape} T{tokens} {path} {(tile or 'default tile') if limit else (gemm or 'default tile')}")
        for evt in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
            if evt.device_time_total > 0:
                print(f"   {evt.key[:60]:60s} {evt.device_time_total / evt.count:8.1f} us x{evt.count // 20}")
        # the grouped GEMM's two launches a call, in launch order: gate|up, then down
        gemms = sorted((e for e in prof.events() if e.name == "_expert_gemm_kernel" and e.device_time_total > 0),
                       key=lambda e: e.time_range.start)
        if len(gemms) >= 2 and len(gemms) % 2 == 0:
            gate = sum(e.device_time_total for e in gemms[0::2]) / (len(gemms) // 2)
            down = sum(e.device_time_total for e in gemms[1::2]) / (len(gemms) // 2)
            flop = 2 * tokens * (K + S) * H * I * 3
            print(f"   gate|up {gate:8.1f} us, down {down:8.1f} us, {flop / (gate + down) / 1e6:6.1f} TFLOP/s")
tk_moe.PAIR_GEMV_MAX_PAIRS, tk_moe.PAIR_TILE_OVERRIDE, tk_moe.GEMM_TILE_OVERRIDE = 16, None, None
