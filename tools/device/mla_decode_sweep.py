"""Sweep of the DeepSeek-V2-Lite decode kernels that sit beside the experts (run on the GPU machine):
the latent attention (split count and tile of `mla_latent_attention`, merge included) and the float32
router (`moe_router_logits` tile), each timed as a CUDA-graph replay (no launch overhead), at decode batch
sizes. The first row of each group is the shipped choice.

    PYTHONPATH=packages/atom-core/src python3 tools/device/mla_decode_sweep.py [--batch-sizes 32,128] [--ctx 192]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import graph_time, mla, rnd  # noqa: E402

from atom.ops.registry import resolve  # noqa: E402
from atom.ops.triton_kernels import mla as tk_mla  # noqa: E402
from atom.ops.triton_kernels import moe_routing as tk_routing  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--batch-sizes", default="1,32,128")
ap.add_argument("--ctx", type=int, default=192, help="context length of every sequence (mean of a 128+128 run)")
ap.add_argument("--router-only", action="store_true", help="only the router rows")
ap.add_argument("--prefill", action="store_true",
                help="instead: mla_prefill of --batch-sizes sequences of --q-len new tokens each (no cached prefix), "
                     "the expanded form per EXPANDED_TILE, the absorbed form per PREFILL_TILE")
ap.add_argument("--q-len", type=int, default=128)
opts = ap.parse_args()

PREFILL_TILES = [None, dict(block_m=64, block_n=32, num_warps=8, num_stages=2),
                 dict(block_m=64, block_n=64, num_warps=8, num_stages=2), dict(block_m=32, block_n=64, num_warps=8, num_stages=2),
                 dict(block_m=64, block_n=32, num_warps=4, num_stages=2), dict(block_m=16, block_n=32, num_warps=4, num_stages=2),
                 dict(block_m=32, block_n=32, num_warps=4, num_stages=3)]
EXPANDED_TILES = [None, dict(block_q=128, block_n=64, num_warps=8, num_stages=2),
                  dict(block_q=64, block_n=32, num_warps=4, num_stages=2), dict(block_q=64, block_n=64, num_warps=4, num_stages=3),
                  dict(block_q=32, block_n=64, num_warps=4, num_stages=2), dict(block_q=128, block_n=32, num_warps=8, num_stages=2)]
if opts.prefill:
    prefill = resolve("mla_prefill", "triton")
    shipped_prefill = dict(tk_mla.PREFILL_TILE)
    for batch in [int(b) for b in opts.batch_sizes.split(",")]:
        qn, qp, cache, w, tables, qsl, lens, scale, max_l, _ = mla(batch, opts.q_len, [0] * batch)
        tk_mla.PREFILL_FORM_OVERRIDE = "expanded"
        shipped_expanded = dict(tk_mla.EXPANDED_TILE)
        for tile in EXPANDED_TILES:
            tk_mla.EXPANDED_TILE = tile or shipped_expanded
            us = 1e3 * graph_time(lambda: prefill(qn, qp, cache, w, tables, qsl, lens, scale, opts.q_len, max_l))
            print(f"mla_prefill expanded bs{batch} q{opts.q_len} {tile or 'shipped'}: {us:8.1f} us", flush=True)
        tk_mla.EXPANDED_TILE = shipped_expanded
        tk_mla.PREFILL_FORM_OVERRIDE = "absorbed"
        for tile in PREFILL_TILES:
            tk_mla.PREFILL_TILE = tile or shipped_prefill
            try:
                us = 1e3 * graph_time(lambda: prefill(qn, qp, cache, w, tables, qsl, lens, scale, opts.q_len, max_l))
            except Exception as e:  # a tile that does not fit: say so, go on
                print(f"mla_prefill bs{batch} q{opts.q_len} {tile or 'shipped'}: {type(e).__name__}")
                continue
            print(f"mla_prefill bs{batch} q{opts.q_len} {tile or 'shipped'}: {us:8.1f} us", flush=True)
        tk_mla.PREFILL_TILE = shipped_prefill
        tk_mla.PREFILL_FORM_OVERRIDE = None
        for name, fn in (("w_uk bmm", lambda: torch.bmm(qn.transpose(0, 1), w.view(16, 256, 512)[:, :128])),
                         ("kv_b expansion GEMM", lambda: torch.mm(cache.view(-1, 576)[:batch * opts.q_len, :512],
                                                                  w.t()))):
            print(f"{name} bs{batch} q{opts.q_len}: {1e3 * graph_time(fn):8.1f} us", flush=True)
    sys.exit(0)

TILES = [None, dict(block_m=16, block_n=64, num_warps=4, num_stages=2), dict(block_m=16, block_n=16, num_warps=4, num_stages=2),
         dict(block_m=16, block_n=32, num_warps=8, num_stages=2), dict(block_m=16, block_n=32, num_warps=4, num_stages=3),
         dict(block_m=16, block_n=64, num_warps=8, num_stages=2)]
ROUTER = [None, (1, 4), (2, 4), (4, 4), (8, 4), (1, 2), (2, 2), (4, 2)]  # (BLOCK_T, BLOCK_E)
tk_routing.ROUTER_GEMM_MIN_TOKENS = 1 << 30  # the kernel's rows at every size; the GEMM has its own row
shipped_tile = dict(tk_mla.DECODE_TILE)
route = resolve("moe_router_logits", "triton")
for batch in [int(b) for b in opts.batch_sizes.split(",")]:
    qn, qp, cache, w, tables, _, lens, scale, max_l, _ = mla(batch, 1, [opts.ctx - 1] * batch)
    q_lat = rnd(16, batch, 512).transpose(0, 1)
    q_pe = qp.contiguous()
    for tile in TILES if not opts.router_only else []:
        tk_mla.DECODE_TILE = tile or shipped_tile
        for splits in (None, 1, 2, 4, 8):
            try:
                us = 1e3 * graph_time(lambda: tk_mla.mla_latent_attention(q_lat, q_pe, cache, tables, None, lens, scale, 1,
                                                                         max_l, splits))
            except Exception as e:  # a tile that does not fit: say so, go on
                print(f"mla bs{batch} ctx{opts.ctx} {tile or 'shipped'} splits={splits}: {type(e).__name__}")
                continue
            print(f"mla bs{batch} ctx{opts.ctx} {tile or 'shipped'} splits={splits or 'auto'}: {us:7.1f} us")
    tk_mla.DECODE_TILE = shipped_tile
    tiny = torch.zeros(1, device="cuda")
    print(f"floor (one tiny kernel's graph replay) bs{batch}: {1e3 * graph_time(lambda: tiny.add_(1)):6.1f} us")
    x, rw = rnd(batch, 2048), torch.randn(64, 2048, device="cuda") * 2048**-0.5
    for tile in ROUTER:
        tk_routing.ROUTER_TILE_OVERRIDE = tile
        print(f"router bs{batch} {tile or 'shipped'}: "
              f"{1e3 * graph_time(lambda: route(x, rw)):6.1f} us")
    tk_routing.ROUTER_TILE_OVERRIDE = None
    print(f"router bs{batch} float32 GEMM (F.linear on x.float()): "
          f"{1e3 * graph_time(lambda: torch.nn.functional.linear(x.float(), rw)):6.1f} us")
    if opts.router_only:
        continue
    for name, fn in (("w_uk bmm", lambda: torch.bmm(qn.transpose(0, 1), w.view(16, 256, 512)[:, :128])),
                     ("w_uv bmm", lambda: torch.bmm(q_lat.transpose(0, 1), w.view(16, 256, 512)[:, 128:].transpose(1, 2)))):
        print(f"{name} bs{batch}: {1e3 * graph_time(fn):6.1f} us")
