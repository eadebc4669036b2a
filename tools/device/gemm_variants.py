"""Decode GEMMs of the qwen3-8b shape through cuBLAS: x @ W^T (F.linear, what ATOM runs) against
(W @ x^T)^T, which makes cuBLAS pick a different kernel for the same product. CUDA-graph replay times.

    python3 tools/device/gemm_variants.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triton.testing import do_bench

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}


def graph_us(fn) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):  # 20 copies of the weights would not fit in L2 anyway; repeat for timing
            fn()
    return do_bench(g.replay, warmup=10, rep=50, return_mode="median") * 1e3 / 20


a = torch.empty(1 << 28, device="cuda")
b = torch.empty_like(a)
bw = 2 * a.numel() * 4 / (do_bench(lambda: b.copy_(a), return_mode="median") * 1e-3) / 1e9
print(f"copy bandwidth {bw:.0f} GB/s")
for m in (1, 8, 32, 128):
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]  # > L2 between calls
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        i = [0]

        def lin():
            i[0] = (i[0] + 1) % 4
            return F.linear(x, ws[i[0]])

        def tn():
            i[0] = (i[0] + 1) % 4
            return torch.mm(ws[i[0]], x.t()).t()

        mb = n * k * 2 / 1e6
        t1, t2 = graph_us(lin), graph_us(tn)
        print(f"M={m:4d} {name:8s} {mb:6.1f} MB  linear {t1:7.1f} us ({mb / t1 * 1e3 / bw * 100:3.0f}% bw)  "
              f"W@xT {t2:7.1f} us ({mb / t2 * 1e3 / bw * 100:3.0f}% bw)")
