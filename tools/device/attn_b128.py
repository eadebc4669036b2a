"""Decode attention over a bf16 and an FP8 KV cache at batch 32-128, with a sweep of the decode tile.

Run on a GPU machine (ATOM_PDL=0 for kernel times without the wait on a previous kernel):
    ATOM_PDL=0 PYTHONPATH=packages/atom-core/src python3 tools/device/attn_b128.py [--batches 128]
        [--contexts 192,1024] [--out f.json]

Each case is qwen3-8b's attention (32 query heads, 8 KV heads, head dim 128) as the engine's CUDA graph runs it:
block tables as wide as max_model_len (4,096), contexts of mean ctx +-50%, the split count from the engine's rule,
FP8 caches with per-tensor scales of 1.0 (what `--kv-cache-dtype fp8` without checkpoint scales stores). Every
decode tile of the sweep (block_n, num_warps, num_stages) runs on both caches (patched into DECODE_TILE and
F16_DECODE_TILE alike; "<- default" marks the tile the engine takes there): us a call (GPU time of a graph
replay) and the share of the copy rate that the cache bytes read make. Also the per-token quantization of the
attention output ([batch, 4096] -> FP8, the o_proj input at per-channel FP8) by itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import kernel_bench  # noqa: E402
from kernel_bench import copy_bandwidth, graph_time, paged  # noqa: E402

from atom.ops.triton_kernels import attention as tk  # noqa: E402
from atom.ops.triton_kernels import quant_fp8 as tq  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="128")
    ap.add_argument("--contexts", default="192,1024")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--out")
    ns = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; copy rate {bw:,.0f} GB/s; PDL {os.environ.get('ATOM_PDL', 'default')}")
    saved = {name: dict(getattr(tk, name)) for name in ("DECODE_TILE", "F16_DECODE_TILE")}
    rows = []
    for batch in (int(b) for b in ns.batches.split(",")):
        x = torch.randn(batch, 4096, device=kernel_bench.DEV, dtype=torch.bfloat16)
        us = graph_time(lambda x=x: tq.per_token_quant_fp8(x)) * 1e3
        print(f"per_token_quant_fp8 [{batch}, 4096]: {us:.2f} us")
        rows.append(dict(kind="quant_token", batch=batch, us=us))
        for ctx in (int(c) for c in ns.contexts.split(",")):
            ctxs = torch.randint(max(1, ctx // 2), ctx + ctx // 2, (batch,)).tolist()
            args, nbytes_bf16 = paged(batch, 1, ctxs)
            q, kc, vc, tables, qsl, seq, scale = args[:7]
            wide = torch.zeros(batch, ns.max_model_len // 16, dtype=torch.int32, device=kernel_bench.DEV)
            wide[:, :tables.shape[1]] = tables
            one = torch.ones(1, device=kernel_bench.DEV, dtype=torch.float32)
            caches = {"bf16": (kc, vc, None, None, nbytes_bf16),
                      "fp8": (kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), one, one,
                              nbytes_bf16 // 2)}
            for kv, (k_c, v_c, ks, vs, nbytes) in caches.items():
                # the tile the engine would take: F16_DECODE_TILE over an FP8 cache with fp16 dots at <= 2 splits
                splits = tk._decode_splits(q.device, batch, 8, ns.max_model_len, saved["DECODE_TILE"]["block_n"])
                f16_tile = kv == "fp8" and tk._f16_dot(q.dtype, True) and splits <= tk.WIDE_TILE_MAX_SPLITS
                default = saved["F16_DECODE_TILE" if f16_tile else "DECODE_TILE"]
                results = []
                for bn, w, st in itertools.product(*(map(int, v.split(",")) for v in (ns.block_n, ns.warps,
                                                                                       ns.stages))):
                    for name in saved:  # the swept tile whichever of the two the call picks
                        getattr(tk, name).update(block_n=bn, num_warps=w, num_stages=st)
                    try:
                        ms = graph_time(lambda q=q, k_c=k_c, v_c=v_c, wide=wide, ks=ks, vs=vs: tk.paged_attention_impl(
                            q, k_c, v_c, wide, qsl, seq, scale, None, None, 1, ns.max_model_len, k_scale=ks,
                            v_scale=vs))
                    except Exception as e:  # noqa: BLE001 - a tile that does not fit is a row
                        print(f"  {kv} b{batch} ctx{ctx} bn{bn} w{w} s{st} FAILED {type(e).__name__}: {str(e)[:120]}")
                        continue
                    finally:
                        for name, tile in saved.items():
                            getattr(tk, name).clear()
                            getattr(tk, name).update(tile)
                    pct = nbytes / (ms * 1e-3) / 1e9 / bw * 100
                    results.append((ms * 1e3, bn, w, st, pct))
                    rows.append(dict(kind="attention", kv=kv, batch=batch, ctx=ctx, block_n=bn, num_warps=w,
                                     num_stages=st, us=ms * 1e3, pct_copy=pct,
                                     default=(bn, w, st) == (default["block_n"], default["num_warps"],
                                                             default["num_stages"])))
                print(f"{kv} KV, batch {batch}, ctx {ctx} (mean), {nbytes / 1e6:.1f} MB, {splits} split(s) at the "
                      f"default tile {default['block_n']}/{default['num_warps']}/{default['num_stages']}:")
                for us, bn, w, st, pct in sorted(results):
                    mark = " <- default" if (bn, w, st) == (default["block_n"], default["num_warps"],
                                                            default["num_stages"]) else ""
                    print(f"  block_n {bn:3d} warps {w} stages {st}: {us:8.2f} us {pct:5.1f}% of copy{mark}",
                          flush=True)
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(dict(copy_gbps=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
