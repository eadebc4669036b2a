"""The MXFP4 expert paths side by side at gpt-oss-20b shapes, in about a minute (a short device call).

For each token count: the scaled-dot kernel (tl.dot_scaled), the hand-decoded kernels (f16dot, regdot, rows),
dequantize + the dense grouped GEMM, each with its default tile, as CUDA-graph replays (us per layer call), and
each one's max difference from the scaled-dot output. kernel_bench.py --gpt-oss-only has the full rows and tile
sweeps; this is the quick look.

    PYTHONPATH=packages/atom-core/src python3 tools/device/mx_paths_bench.py [--tokens 32,128,1024]
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench_cudagraph

from atom.ops import moe as ref_moe
from atom.ops.registry import resolve
from atom.ops.triton_kernels import moe_swigluoai as tk

E, K, H, I = 32, 4, 2880, 2880


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32,128,1024")
    ap.add_argument("--out")
    opts = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    op = resolve("fused_experts_swigluoai", "triton")
    w13 = torch.randint(0, 256, (E, 2 * I, H // 2), dtype=torch.uint8, device=dev)
    s13 = torch.randint(118, 125, (E, 2 * I, H // 32), dtype=torch.uint8, device=dev)
    w2 = torch.randint(0, 256, (E, H, I // 2), dtype=torch.uint8, device=dev)
    s2 = torch.randint(118, 125, (E, H, I // 32), dtype=torch.uint8, device=dev)
    b13 = torch.randn(E, 2 * I, device=dev, dtype=torch.bfloat16) * 0.1
    b2 = torch.randn(E, H, device=dev, dtype=torch.bfloat16) * 0.1
    rows = []
    paths = {"scaled_dot": dict(MX_GEMM="scaled_dot", MX_DEQUANT_MIN_PAIRS=0),
             "f16dot": dict(MX_GEMM="f16dot", MX_DEQUANT_MIN_PAIRS=0),
             "regdot": dict(MX_GEMM="regdot", MX_DEQUANT_MIN_PAIRS=0),
             "rows": dict(MX_GEMM="rows", MX_DEQUANT_MIN_PAIRS=0),  # decode batches only (<= 128 tokens)
             "dequant": dict(MX_GEMM="scaled_dot", MX_DEQUANT_MIN_PAIRS=1)}
    saved = {name: getattr(tk, name) for name in ("MX_GEMM", "MX_DEQUANT_MIN_PAIRS", "MXFP4_SCALED_DOT",
                                                  "MX_GEMM_MIN_PAIRS")}
    tk.MXFP4_SCALED_DOT, tk.MX_GEMM_MIN_PAIRS = True, 1
    for tokens in [int(t) for t in opts.tokens.split(",")]:
        x = torch.randn(tokens, H, device=dev, dtype=torch.bfloat16)
        tw, tid = ref_moe.moe_topk_softmax(torch.randn(tokens, E, device=dev), K, True)
        args = (x, w13, w2, b13, b2, tw, tid, 1.702, 7.0, s13, s2)
        want = None
        for name, values in paths.items():
            if name == "rows" and tokens > 128:
                continue
            for key, value in values.items():
                setattr(tk, key, value)
            try:
                out = op(*args).float()
                want = out if want is None else want
                us = do_bench_cudagraph(lambda: op(*args), rep=200) * 1e3
                row = dict(tokens=tokens, path=name, us=us, diff=(out - want).abs().max().item())
            except Exception as exc:  # a path the compiler refuses
                row = dict(tokens=tokens, path=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    for key, value in saved.items():
        setattr(tk, key, value)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
