"""bf16 linears at decode sizes on the GPU: cuBLAS (F.linear) against ATOM's dense_linear (the swap-AB kernel on
16-bit weights, atom.ops.triton_kernels.dense), against the copy rate.

Run on a GPU machine:
    PYTHONPATH=packages/atom-core/src python3 tools/device/dense_skinny_bench.py [--out f.json] [--sweep]

Shapes: the dense linears of qwen3-8b, qwen3-0.6b and qwen3-30b-a3b's attention ([N, K] of qkv, o, gate_up,
down). Each row times a CUDA graph that calls the op on ROTATE weight copies in turn (together > 2x the 50 MB L2,
so every call streams its weight from HBM, as in the engine) and reports us a call, GB/s of weight bytes and the
share of the measured copy rate (read + write, as fp8_skinny_bench.py). PDL as the engine has it (pdl.py).
Rows per (shape, M):
  cublas        F.linear on the bf16 weight
  swap          dense_linear with its built-in tile (split-K partials added by the sum kernel where it splits)
  swap parts    the same leaving the partials to the caller (as o_proj / down_proj / qkv_proj do in the engine,
                whose norm or attention adds them): no sum kernel
--sweep adds tiles (block_k, num_stages, split) at M = 1 and 16 on the 8b shapes and the 0.6b o_proj, parts form.
The summary line per (shape, M) names the faster of cublas and the best swap row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from atom.ops import dense as dense_ref  # noqa: E402
from atom.ops.triton_kernels import dense as tk_dense  # noqa: E402
from atom.ops.triton_kernels import quant_fp8 as tk  # noqa: E402
from kernel_bench import GraphRows, copy_bandwidth, patched  # noqa: E402

DEV = "cuda"
L2_BYTES = 50 << 20
SHAPES = {
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (24576, 4096), "8b down": (4096, 12288),
    "0.6b qkv": (4096, 1024), "0.6b o": (1024, 2048), "0.6b gate_up": (6144, 1024), "0.6b down": (1024, 3072),
    "30b qkv": (5120, 2048), "30b o": (2048, 4096),
}
SWEEP_SHAPES = ("8b qkv", "8b o", "8b gate_up", "8b down", "0.6b o")
SWEEP_TILES = [dict(block_k=128, num_stages=3), dict(block_k=128, num_stages=6), dict(block_k=256, num_stages=3),
               dict(block_k=64, num_stages=8), dict(block_k=128, num_stages=4, num_warps=8),
               dict(block_k=128, num_stages=4, block_n=128, num_warps=8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    opts = ap.parse_args()
    torch.manual_seed(0)
    copy = copy_bandwidth()
    print(f"copy rate {copy:.0f} GB/s (read + write); built-in tile {tk_dense.TILE}", flush=True)
    bench, summary = GraphRows(copy, width=72), []
    row, rows_out = bench.time, bench.rows

    for shape in opts.shapes.split(","):
        n, k = SHAPES[shape]
        nbytes = 2 * n * k
        rotate = max(2, -(-2 * L2_BYTES // nbytes))
        ws = [(torch.randn(n, k, device=DEV) / k**0.5).to(torch.bfloat16) for _ in range(rotate)]
        for m in [int(v) for v in opts.rows.split(",")]:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            tag = f"{shape} [{n}, {k}] M{m}"

            def cublas(x=x, ws=ws):
                for w in ws:
                    torch.nn.functional.linear(x, w)

            def swap(parts: bool, x=x, ws=ws):
                def run():
                    for w in ws:
                        tk_dense.dense_linear(x, w, **({"parts": []} if parts else {}))
                return run

            base = row(f"cublas {tag}", cublas, nbytes, rotate)
            best = (None, None)
            with patched(dense_ref, DENSE_SWAP_MAX_M=64):
                for parts in (False, True):
                    us = row(f"swap{' parts' if parts else ''} {tag}", swap(parts), nbytes, rotate)
                    if us is not None and parts and (best[0] is None or us < best[0]):
                        best = (us, dict(tk_dense.TILE))
                if opts.sweep and shape in SWEEP_SHAPES and m in (1, 16):
                    auto = tk._swap_tile(m, n, k, 128, x.device, base=tk_dense.TILE)["split_k"]
                    tiles = [dict(t) for t in SWEEP_TILES]
                    tiles += [dict(tk_dense.TILE, split_k=s) for s in sorted({max(1, auto // 2), min(8, auto * 2)})
                              if s != auto]
                    for tile in tiles:
                        with patched(tk_dense, TILE=tile):
                            us = row(f"  sweep swap parts {tag} {tile}", swap(True), nbytes, rotate)
                        if us is not None and (best[0] is None or us < best[0]):
                            best = (us, tile)
            if base is not None and best[0] is not None:
                line = (f"{tag}: cublas {base:.2f} us ({100 * nbytes / base / 1e3 / copy:.0f}%), best swap parts "
                        f"{best[0]:.2f} us ({100 * nbytes / best[0] / 1e3 / copy:.0f}%) {best[1]}: "
                        f"{'swap' if best[0] < base else 'cublas'} by {abs(base - best[0]):.2f} us")
                summary.append(line)
        ws = None  # the next shape's copies replace these
        torch.cuda.empty_cache()
    print("\nsummary (us a call; % of the copy rate)")
    for line in summary:
        print(line)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(dict(copy_gbs=copy, rows=rows_out, summary=summary), f, indent=1)


if __name__ == "__main__":
    main()
