"""Per-kernel GPU times of fused_experts at decode sizes (torch.profiler), qwen3-30b-a3b expert shapes.

    PYTHONPATH=packages/atom-core/src python3 tools/device/moe_kernels_profile.py [--tokens 1,4]
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
opts = ap.parse_args()
E, K, H, I = 128, 8, 2048, 768
w13 = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).bfloat16()
w2 = (torch.randn(E, H, I, device="cuda") * I**-0.5).bfloat16()
op = resolve("fused_experts", "triton")
for tokens in [int(t) for t in opts.tokens.split(",")]:
    tiles = json.loads(os.environ.get("ATOM_PAIR_SWEEP", "null")) or [None]  # None: the shipped tiles
    for path, limit, tile in [("per-pair", 16, t) for t in tiles] + [("sorted", 0, tiles[0])]:
        tk_moe.PAIR_GEMV_MAX_PAIRS, tk_moe.PAIR_TILE_OVERRIDE = limit, tile
        x = torch.randn(tokens, H, device="cuda").bfloat16()
        tw, tid = ref_moe.moe_topk_softmax(torch.randn(tokens, E, device="cuda"), K, True)
        for _ in range(3):
            op(x, w13, w2, tw, tid)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                op(x, w13, w2, tw, tid)
            torch.cuda.synchronize()
        print(f"== T{tokens} {path} {(tile or 'default tile') if limit else ''}")
        for evt in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
            if evt.device_time_total > 0:
                print(f"   {evt.key[:60]:60s} {evt.device_time_total / evt.count:8.1f} us x{evt.count // 20}")
tk_moe.PAIR_GEMV_MAX_PAIRS, tk_moe.PAIR_TILE_OVERRIDE = 16, None
