"""Which cuBLAS call runs a decode-size bf16 linear fastest (run on the GPU machine, ~20 s):

    python3 tools/device/skinny_gemm_variants.py [--shape qwen3-0.6b] [--rows 1,4,32]

For each linear of a layer: F.linear(x, W) (what atom-server's bf16 linears call), torch.mm(W, x.T) (the same
product with the weight as the wide operand: cuBLAS then sees M = out features, N = rows) and F.linear on x padded to
8 rows; us a call in a CUDA graph of 50 calls on rotating weight copies (more bytes than L2), L2-busting like a
decode step. Prints the copy rate each reaches.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

SHAPES = {  # name -> {linear: (out, in)}
    "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
    "qwen3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)},
}


def timed_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2] * 1e3 / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,4,32")
    ns = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    for name, (n, k) in SHAPES[ns.shape].items():
        copies = max(2, int(3 * 60 * 2**20 // (n * k * 2)) + 1)
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        calls = 50
        for rows in (int(r) for r in ns.rows.split(",")):
            x = torch.randn(rows, k, device=dev, dtype=dt)
            x8 = torch.zeros(max(rows, 8), k, device=dev, dtype=dt)
            out = {
                "linear": lambda: [F.linear(x, ws[i % copies]) for i in range(calls)],
                "mm(W, x.T)": lambda: [torch.mm(ws[i % copies], x.t()) for i in range(calls)],
                "linear pad 8": lambda: [F.linear(x8, ws[i % copies]) for i in range(calls)],
            }
            res = {key: timed_us(fn, calls) for key, fn in out.items()}
            ref = F.linear(x, ws[0])
            same = torch.equal(ref, torch.mm(ws[0], x.t()).t())
            gb = n * k * 2 / 1e6  # MB: MB / us = TB/s
            print(f"{ns.shape} {name:8s} rows {rows:3d}: " + "  ".join(
                f"{key} {us:6.2f} us ({gb / us:4.2f} TB/s)" for key, us in res.items()) + f"  mm==linear: {same}")


if __name__ == "__main__":
    main()
