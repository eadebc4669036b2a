"""How much an L2 prefetch of the next weight can buy at decode (ATOM_L2_PREFETCH_MB's premise), on the GPU:

    PYTHONPATH=packages/atom-core/src python3 tools/device/l2_prefetch_bench.py [--shape qwen3-0.6b] [--rows 1]

1. One GEMM (F.linear, cuBLAS, as atom-server's bf16 linears) per weight of a layer, timed in a CUDA graph of 50
   calls: on rotating weights (HBM: each call's weight evicted by the others) and on one weight (L2 hot). The gap
   is the most a prefetch can save a call.
2. A decode-like chain per layer in one graph, all layers with their own weights (far more bytes than L2):
   rms-norm -> qkv -> a stand-in for attention (a few small elementwise kernels) -> o -> residual + norm ->
   gate_up -> SiLU-and-mul -> down -> residual; timed without and with a side stream that, at each GEMM, asks L2
   for the next GEMM's weight (atom.ops.triton_kernels.pdl.prefetch_to_l2, the engine's mechanism), at lookahead
   1 and 2. Prints us per layer and the saving.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from atom.ops.triton_kernels.pdl import prefetch_to_l2

SHAPES = {  # hidden, q heads, kv heads, head_dim, intermediate, layers
    "qwen3-0.6b": (1024, 16, 8, 128, 3072, 28),
    "qwen3-1.7b": (2048, 16, 8, 128, 6144, 28),
    "qwen3-8b": (4096, 32, 8, 128, 12288, 36),
}


def timed(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    """Median ms of one replay."""
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def capture(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, default=1, help="tokens (batch at decode)")
    ap.add_argument("--max-mb", type=int, default=64, help="prefetch cap a weight (MB)")
    ns = ap.parse_args()
    hidden, hq, hk, hd, inter, layers = SHAPES[ns.shape]
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    shapes = {"qkv": ((hq + 2 * hk) * hd, hidden), "o": (hidden, hq * hd), "gate_up": (2 * inter, hidden),
              "down": (hidden, inter)}
    w = [{k: torch.randn(s, device=dev, dtype=dt) * 0.02 for k, s in shapes.items()} for _ in range(layers)]
    norm = torch.ones(hidden, device=dev, dtype=dt)
    print(f"{ns.shape}, {ns.rows} row(s), {layers} layers, {sum(t.numel() * 2 for t in w[0].values()) / 2**20:.1f} "
          f"MB a layer; L2 {torch.cuda.get_device_properties(0).L2_cache_size / 2**20:.0f} MB")

    # 1. one GEMM: from HBM (rotating over the layers' copies) against L2-hot (the same weight every call)
    for name, (n, k) in shapes.items():
        x = torch.randn(ns.rows, k, device=dev, dtype=dt)
        cold = capture(lambda: [F.linear(x, w[i % layers][name]) for i in range(50)])
        hot = capture(lambda: [F.linear(x, w[0][name]) for _ in range(50)])
        c, h = timed(cold) / 50 * 1e3, timed(hot) / 50 * 1e3
        mb = n * k * 2 / 2**20
        print(f"  {name:8s} {mb:6.1f} MB: HBM {c:6.2f} us ({mb / 2**10 / c * 1e6 / 1e3:5.2f} TB/s), "
              f"L2-hot {h:6.2f} us: at most {c - h:5.2f} us a call to win")

    # 2. the chain, without and with prefetches on a side stream
    order = [(i, k) for i in range(layers) for k in ("qkv", "o", "gate_up", "down")]
    side = torch.cuda.Stream()

    def chain(lookahead: int):
        main = torch.cuda.current_stream()
        pos = 0

        def gemm(x, i, k):
            nonlocal pos
            if lookahead and pos + lookahead < len(order):
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    j, kk = order[pos + lookahead]
                    prefetch_to_l2(w[j][kk], ns.max_mb << 20)
            pos += 1
            return F.linear(x, w[i][k])

        h = torch.randn(ns.rows, hidden, device=dev, dtype=dt)
        for i in range(layers):
            a = F.rms_norm(h, (hidden,), norm, 1e-6)
            qkv = gemm(a, i, "qkv")
            att = (qkv[:, : hq * hd].float().softmax(-1) * 2).to(dt)  # a few small kernels, as attention + rope
            h = h + gemm(att, i, "o")
            a = F.rms_norm(h, (hidden,), norm, 1e-6)
            gu = gemm(a, i, "gate_up")
            h = h + gemm(F.silu(gu[:, :inter]) * gu[:, inter:], i, "down")
        if lookahead:
            main.wait_stream(side)
        return h

    base = None
    for lookahead in (0, 1, 2, 0, 1, 2):
        g = capture(lambda: chain(lookahead))
        ms = timed(g, 50)
        base = ms if lookahead == 0 else base
        print(f"  chain, lookahead {lookahead}: {ms * 1e3 / layers:6.2f} us a layer ({ms:.3f} ms){'' if lookahead == 0 else f', {base / ms:.3f}x'}")


if __name__ == "__main__":
    main()
