"""Sweep the FP8 GEMMs' tiles (pointer loads and TMA) on the GPU at hand and write the winners as ATOM_FP8_TILES rules.

Run on a GPU machine:
    PYTHONPATH=packages/atom-core/src python3 tools/device/fp8_tiles.py --out-rules /tmp/fp8_tiles.json \
        [--out sweep.json] [--dot-rows 128] [--swap-rows 1,32] [--budget-s 300]

qwen3-8b's four linears (kernel_bench.FP8_LINEARS) on codes a producer made (fp8_linear_quantized: what the engine
runs at decode), weights rotated past 2x the L2 as in fp8_skinny_bench.py, us a call under CUDA-graph replay.
- --dot-rows (the tl.dot GEMM, e.g. batch 128's decode): the built-in tile, torch._scaled_mm (per-channel), and
  DOT_TILES with pointer and TMA loads, with and without fast accumulation (per-channel) and Triton's warp
  specialization (TMA, 4 warps), split-K by the built-in rule (about two programs an SM), and the TMA tiles again
  without split-K (split1: no float32 partials and no sum kernel);
- --swap-rows (the swap-AB kernel, batch 1-32): the built-in tile, and SWAP_TILES the same ways (warp
  specialization at 4 warps: 12 warps and 168 registers a thread on sm_90, so one program an SM).
Each candidate's output is first checked against the torch reference on the same codes (WRONG_REL), so a tile that
computes something else cannot win. Per M the candidate with the least summed time over the four shapes in the --pick layout (per-channel: what
`--quantization fp8` makes) wins; the rules file holds it unless it is the built-in choice, and scaled_mm_min_m
moves past M where the tl.dot GEMM beat torch._scaled_mm. Every row and the per-layer sums are printed and kept.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import FP8_LINEARS, copy_bandwidth, graph_time, patched  # noqa: E402

from atom.ops import quant_fp8 as Q  # noqa: E402
from atom.ops.registry import resolve  # noqa: E402
from atom.ops.triton_kernels import quant_fp8 as tk  # noqa: E402

DEV = "cuda"
L2_BYTES = 50 << 20
# [block_m, block_n, num_warps, num_stages]; each with pointer loads and TMA
DOT_TILES = [(128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 5), (64, 128, 4, 4), (64, 128, 4, 5),
             (64, 256, 8, 3), (64, 256, 8, 4)]
# [block_n (weight rows), num_warps, num_stages, block_k]; block_m is the padded rows. block_k 256 (per-channel /
# per-tensor only: K steps of twice the bytes, half the steps; stop 51) for the batch-1 GEMMs at ~70% of the copy
# rate. (64, 4, 5, 256): 64 KB of weight in flight a program, for the H200's faster HBM (KERNEL_NOTES stop 66);
# (64, 4, 3 / 4, 512): the same bytes in flight in fewer, longer K steps (sm_90 compile here: 44 registers from
# codes, 146 quantizing rows, no spills; stop 67).
SWAP_TILES = [(64, 4, 5, 128), (64, 4, 7, 128), (128, 8, 4, 128), (64, 4, 3, 256), (64, 4, 4, 256), (64, 4, 5, 256),
              (128, 8, 3, 256), (64, 4, 3, 512), (64, 4, 4, 512)]
# a candidate whose output is further than this from the reference (relative to its largest value) is wrong: bf16
# outputs and fast accumulation stay ~10x below it on these shapes
WRONG_REL = 2e-2
# fast_acc (the FP8 MMA accumulating all of K before promoting, as vLLM's CUTLASS kernels do) only changes per-channel /
# per-tensor GEMMs: block scales promote every K step anyway
FAST_ACC = {"channel": (False, True), "block": (False,)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--out-rules", default=None)
    ap.add_argument("--dot-rows", default="128")
    ap.add_argument("--swap-rows", default="1,32")
    ap.add_argument("--layouts", default="channel,block")
    ap.add_argument("--pick", default="channel")
    ap.add_argument("--budget-s", type=float, default=420.0)
    opts = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy rate {copy:.0f} GB/s (read + write)", flush=True)
    lin_q, lin_ref = resolve("fp8_linear_quantized", "triton"), resolve("fp8_linear_quantized", "torch")
    rows: list[dict] = []
    layouts = opts.layouts.split(",")
    plans = [("dot", int(m)) for m in opts.dot_rows.split(",") if m] + \
            [("swap", int(m)) for m in opts.swap_rows.split(",") if m]

    def candidates(kind: str, m: int, layout: str):
        """(label, patches, tile for the rules file or None for the built-in choice)"""
        if kind == "dot":
            yield "built-in", dict(SWAP_MAX_M=0, GEMV_MAX_M=0), None
            if layout == "channel":
                yield "scaled_mm", dict(SWAP_MAX_M=0, GEMV_MAX_M=0, SCALED_MM=True, SCALED_MM_MIN_M=0), "scaled_mm"
            for (bm, bn, w, st), tma, fast, ws, split in itertools.product(
                    DOT_TILES, (False, True), FAST_ACC[layout], (False, True), (None, 1)):
                if ws and not (tma and w == 4):  # warp specialization needs TMA; at 8 warps Triton 3.6 skips it
                    continue
                # split-K 1 (no partials, no second kernel: 3 of a layer's 4 GEMMs split at 128 rows by the
                # rule, 108 sum kernels a step) on TMA tiles with the layout's fastest accumulation only
                if split == 1 and not (tma and fast == FAST_ACC[layout][-1] and not ws):
                    continue
                tile = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, tma=tma, fast_acc=fast, ws=ws)
                if split is not None:
                    tile["split_k"] = split
                yield (f"{bm}x{bn} w{w} s{st}{' tma' if tma else ''}{' fast' if fast else ''}{' ws' if ws else ''}"
                       f"{' split1' if split == 1 else ''}",
                       dict(SWAP_MAX_M=0, GEMV_MAX_M=0, SCALED_MM=False, GEMM_TILE_OVERRIDE=tile), tile)
        else:
            yield "built-in", dict(SWAP_MAX_M=64, GEMV_MAX_M=0), None
            for (bn, w, st, bk), tma, fast, ws in itertools.product(SWAP_TILES, (False, True), FAST_ACC[layout],
                                                                   (False, True)):
                if ws and not (tma and w == 4):
                    continue
                if bk != 128 and layout != "channel":  # block scales fix the K step
                    continue
                tile = dict(block_n=bn, num_warps=w, num_stages=st, tma=tma, fast_acc=fast, ws=ws)
                if bk != 128:
                    tile["block_k"] = bk
                yield (f"{bn}{f'x{bk}' if bk != 128 else ''} w{w} s{st}{' tma' if tma else ''}{' fast' if fast else ''}"
                       f"{' ws' if ws else ''}", dict(SWAP_MAX_M=64, GEMV_MAX_M=0, SWAP_TILE_OVERRIDE=tile), tile)

    for proj, (n, k) in FP8_LINEARS.items():
        rotate = max(2, -(-2 * L2_BYTES // (n * k)))
        w = [torch.randn(n, k, device=DEV) / k**0.5 for _ in range(rotate)]
        weights = {lay: [Q.quantize_weight_fp8(x, lay) for x in w] for lay in layouts}
        del w
        for kind, m in plans:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            for lay in layouts:
                block = [128, 128] if lay == "block" else None
                if block is not None:
                    a, sa = tk.per_token_group_quant_fp8(x, 128, torch.float8_e4m3fn)
                else:
                    a, sa = tk.per_token_quant_fp8(x, torch.float8_e4m3fn)

                def run(ws=weights[lay], a=a, sa=sa, block=block):
                    for q, s in ws:
                        lin_q(a, sa, q, s, None, block, torch.bfloat16)

                # every candidate's output is checked against the torch reference on the same codes first: a tile
                # that computes something else is a row marked wrong, never a winner
                q0, s0 = weights[lay][0]
                ref = lin_ref(a, sa, q0, s0, None, block, torch.float32)

                for label, patches, tile in candidates(kind, m, lay):
                    if time.time() - t0 > opts.budget_s:
                        print(f"budget of {opts.budget_s:.0f} s spent: stopping before {proj} M{m} {lay} {label}")
                        break
                    if label == "scaled_mm" and block is not None:
                        continue
                    row = dict(kind=kind, m=m, proj=proj, layout=lay, label=label, tile=tile)
                    try:
                        with patched(tk, **patches):
                            got = lin_q(a, sa, q0, s0, None, block, torch.bfloat16).float()
                            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                            if not err <= WRONG_REL:
                                raise ValueError(f"wrong output: max error {err:.2e} of the reference's largest")
                            us = graph_time(run) * 1e3 / rotate
                    except Exception as e:  # noqa: BLE001 - a tile that does not compile is a row
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        print(f"{kind} M{m} {proj:8s} {lay:7s} {label:24s} FAILED {row['error'][:150]}", flush=True)
                        rows.append(row)
                        continue
                    gbs = n * k / us / 1e3
                    row.update(us=us, gbs=gbs, pct_copy=100 * gbs / copy)
                    rows.append(row)
                    print(f"{kind} M{m} {proj:8s} {lay:7s} {label:24s} {us:8.2f} us {gbs:6.0f} GB/s "
                          f"{100 * gbs / copy:5.1f}%", flush=True)
        del weights
        torch.cuda.empty_cache()

    rules: dict = {}
    summary = []
    for kind, m in plans:
        for lay in layouts:
            sums: dict[str, list] = {}
            for r in rows:
                if r["kind"] == kind and r["m"] == m and r["layout"] == lay and "us" in r:
                    sums.setdefault(r["label"], []).append(r)
            full = {label: rs for label, rs in sums.items() if len(rs) == len(FP8_LINEARS)}
            if not full:
                continue
            ranked = sorted(full, key=lambda label: sum(r["us"] for r in full[label]))
            base = sum(r["us"] for r in full["built-in"]) if "built-in" in full else float("nan")
            print(f"\n{kind} M{m} {lay}: the four linears, us a layer (built-in {base:.1f})")
            for label in ranked:
                total = sum(r["us"] for r in full[label])
                print(f"  {label:24s} {total:8.1f} us  {base / total:5.3f}x  "
                      + " ".join(f"{r['proj']} {r['us']:.1f}" for r in full[label]))
                summary.append(dict(kind=kind, m=m, layout=lay, label=label, us_layer=total))
            if lay != opts.pick:
                continue
            best = ranked[0]
            tile = full[best][0]["tile"]
            if kind == "dot":
                if "scaled_mm" in full and best != "scaled_mm":
                    rules["scaled_mm_min_m"] = max(rules.get("scaled_mm_min_m", 0), m + 1)
                if tile not in (None, "scaled_mm"):
                    rules.setdefault("dot", []).append([m, tile])
            elif tile is not None:
                rules.setdefault("swap", []).append([m, tile])
    for kind in ("dot", "swap"):
        if kind in rules:
            rules[kind].sort(key=lambda e: e[0])
    print("\nATOM_FP8_TILES rules:", json.dumps(rules, separators=(",", ":")), flush=True)
    if opts.out_rules:
        with open(opts.out_rules, "w") as f:
            json.dump(rules, f)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_gbs=copy, rows=rows, summary=summary,
                           rules=rules), f, indent=1)


if __name__ == "__main__":
    main()
