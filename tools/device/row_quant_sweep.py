"""One-program-a-row FP8 quantization kernels at prefill sizes: tiles swept (run on the GPU).

In batch 128's 16,384-token prefill of FP8 qwen3-8b (H100, 2026-12-05 profile,
benchmarks/h100-2026-12-05c/profile128_nopdl.txt) `_silu_mul_quant_token_kernel` took ~0.79 ms a layer (~28 ms a
prefill) for ~1 GB of traffic (43% of the copy rate) and `_quant_token_kernel` (o_proj's input) ~150 us for 201 MB
(45%), while the norm + quant kernel ran at the copy rate. Their launch (`quant_fp8.row_block`) reads a whole row
in one block (up to 16,384 columns, 16 warps): best at decode, where a handful of rows is latency. This times each
kernel over the rows of a prefill with other (BLOCK, num_warps) choices - BLOCK below the row length reads it
twice (the amax pass, then the codes), the second time mostly from L2 - checks the codes and scales are
bit-identical to the default launch's, and prints us, GB/s and % of the device copy rate. PDL off (each launch
alone).

    PYTHONPATH=packages/atom-core/src python3 tools/device/row_quant_sweep.py --rows 128,4096,16384 \
        --out $OUT/rowq.json

A winner at 4,096+ rows goes into the engine as ATOM_FP8_ROW_TILE_LARGE=min_rows:block:num_warps
(quant_fp8.ROW_TILE_LARGE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from atom.ops.triton_kernels import fp8_producers as fp
from atom.ops.triton_kernels import quant_fp8 as qf
from atom.ops.triton_kernels.fp8_common import fp8_consts

FP8 = torch.float8_e4m3fn
TILES = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 8),
         (16384, 16)]


def timed(fn, reps: int) -> float:
    on_gpu = torch.cuda.is_available()
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if on_gpu:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def copy_rate(dev: torch.device) -> float:
    if dev.type != "cuda":
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    us = timed(lambda: y.copy_(x), 10)
    return 2 * x.numel() / us / 1e3  # GB/s, read + write


def launches(kind: str, m: int, k: int, dev: torch.device):
    """(launch(block, warps) -> (q, s), bytes one launch moves) of one kernel over m rows of k columns."""
    g = torch.Generator(device=dev).manual_seed(m + k)
    consts = fp8_consts(FP8)
    if kind == "quant_token":
        x = torch.randn(m, k, generator=g, device=dev, dtype=torch.bfloat16)

        def run(block, warps):
            q = torch.empty(m, k, dtype=FP8, device=dev)
            s = torch.empty(m, 1, dtype=torch.float32, device=dev)
            qf._quant_token_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block, **consts,
                                         PDL=False, num_warps=warps)
            return q, s
        return run, m * k * (2 + 1) + m * 4
    if kind == "silu_mul_quant_token":
        x = torch.randn(m, 2 * k, generator=g, device=dev, dtype=torch.bfloat16)

        def run(block, warps):
            q = torch.empty(m, k, dtype=FP8, device=dev)
            s = torch.empty(m, 1, dtype=torch.float32, device=dev)
            fp._silu_mul_quant_token_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0),
                                                  ACT=fp._act_dtype(x.dtype), BLOCK=block, **consts,
                                                  PDL=False, num_warps=warps)
            return q, s
        return run, m * k * (4 + 1) + m * 4
    raise ValueError(kind)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="128,4096,16384")
    ap.add_argument("--kernels", default="quant_token:4096,silu_mul_quant_token:12288",
                    help="kernel:columns (qwen3-8b: o_proj's input 4,096; down_proj's 12,288)")
    ap.add_argument("--tiles", default=None, help="block:warps,... (default: a sweep of 10)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiles = [tuple(int(v) for v in t.split(":")) for t in a.tiles.split(",")] if a.tiles else TILES
    rate = copy_rate(dev)
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}: copy rate {rate:,.0f} GB/s")
    res = []
    for spec in a.kernels.split(","):
        kind, k = spec.split(":")
        k = int(k)
        default = qf.row_block(k)
        for m in (int(r) for r in a.rows.split(",")):
            run, nbytes = launches(kind, m, k, dev)
            ref = run(*default)
            rows = []
            for block, warps in [default] + [t for t in tiles if t != default]:
                if block < 16 or (block > qf.ROW_BLOCK_MAX):
                    continue
                q, s = run(block, warps)
                same = bool(torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8))
                            and torch.equal(s, ref[1]))
                us = timed(lambda b=block, w=warps, run=run: run(b, w), a.reps)
                gbs = nbytes / us / 1e3
                rows.append(dict(kernel=kind, cols=k, rows=m, block=block, warps=warps,
                                 default=(block, warps) == default, us=us, gbs=gbs,
                                 pct_copy=100 * gbs / rate if rate == rate else None, identical=same))
            best = min(rows, key=lambda r: r["us"])
            for r in rows:
                tag = " default" if r["default"] else ""
                tag += " BEST" if r is best else ""
                tag += "" if r["identical"] else " DIFFERS"
                pct = f"{r['pct_copy']:5.1f}%" if r["pct_copy"] is not None else "   - "
                print(f"{kind:<22} k={k:<6} M={m:<6} block {r['block']:>5} warps {r['warps']:>2}: "
                      f"{r['us']:9.1f} us {r['gbs']:8.0f} GB/s {pct}{tag}", flush=True)
            res += rows
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(copy_rate_gbs=rate, rows=res), f, indent=1)


if __name__ == "__main__":
    main()
