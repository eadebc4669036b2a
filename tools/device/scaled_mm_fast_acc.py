"""torch._scaled_mm's rowwise FP8 GEMM with and without fast accumulation on qwen3-8b's four linears (on the
GPU; `--shrink 32` on CPU checks the script).

ATOM runs the per-token x per-channel FP8 GEMMs of SCALED_MM_MIN_M rows and more (prefills) through
torch._scaled_mm (quant_fp8.rowwise_scaled_mm); SCALED_MM_FAST_ACC passes use_fast_accum. For each shape and
row count this prints the time of one call either way (CUDA events, median of --reps after warm-up) and each
output's largest error against the float32 product of the dequantized operands, relative to its largest value.

    PYTHONPATH=packages/atom-core/src python3 tools/device/scaled_mm_fast_acc.py --rows 256,1024,4096,16384
"""

from __future__ import annotations

import argparse
import json

import torch
from row_quant_sweep import timed  # tools/device: CUDA-event timing, median of reps

LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}


def main() -> None:
    from atom.ops import quant_fp8 as Q

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="256,1024,4096,16384")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shrink", type=int, default=1, help="divide every N and K by this (a CPU smoke run)")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = [int(r) for r in a.rows.split(",")]
    res = []
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name} torch {torch.__version__}")
    print(f"{'linear':<8} {'M':>6} {'promote us':>11} {'fast us':>9} {'fast/promote':>12} "
          f"{'TFLOP/s fast':>12} "
          f"{'err promote':>11} {'err fast':>9}")
    tot = {}
    for name, (n, k) in LINEARS.items():
        n, k = n // a.shrink, k // a.shrink
        w = torch.randn(n, k, generator=g, device=dev, dtype=torch.bfloat16) * 0.02
        wq, ws = Q.per_token_quant_fp8(w)  # per output channel: the rows of W
        for m in rows:
            x = torch.randn(m, k, generator=g, device=dev, dtype=torch.bfloat16)
            xq, xs = Q.per_token_quant_fp8(x)
            ref = (xq.float() * xs.float().reshape(-1, 1)) @ (wq.float() * ws.float().reshape(-1, 1)).t()
            sb = ws.float().reshape(1, -1).contiguous()
            sa = xs.float().reshape(-1, 1)
            outs, us = {}, {}
            for fast in (False, True):
                def call(fast=fast, xq=xq, wq=wq, sa=sa, sb=sb):
                    return torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                            use_fast_accum=fast)
                outs[fast] = call().float()
                us[fast] = timed(call, a.reps)
            scale = ref.abs().max().item()
            err = {f: (outs[f] - ref).abs().max().item() / scale for f in outs}
            tflops = 2 * m * n * k / us[True] / 1e6
            print(f"{name:<8} {m:>6} {us[False]:>11.1f} {us[True]:>9.1f} {us[True] / us[False]:>12.3f} "
                  f"{tflops:>12.0f} {err[False]:>11.2e} {err[True]:>9.2e}", flush=True)
            res.append(dict(linear=name, m=m, n=n, k=k, promote_us=us[False], fast_us=us[True],
                            err_promote=err[False], err_fast=err[True]))
            t = tot.setdefault(m, [0.0, 0.0])
            t[0] += us[False]
            t[1] += us[True]
            del x, xq, xs, ref, outs
    for m, (p, f) in tot.items():
        print(f"four linears M={m}: {p:.1f} -> {f:.1f} us ({f / p:.3f}x); x36 layers {p * 36 / 1e3:.2f} -> "
              f"{f * 36 / 1e3:.2f} ms")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(dict(device=name, torch=torch.__version__, rows=res), fh, indent=1)


if __name__ == "__main__":
    main()
