"""FP8 linears at decode sizes on the GPU: the GEMV, the tl.dot GEMM and the swap-AB kernel, against the copy rate.

Run on a GPU machine:
    PYTHONPATH=packages/atom-core/src python3 tools/device/fp8_skinny_bench.py [--out f.json] [--sweep]

qwen3-8b's four linears (kernel_bench.FP8_LINEARS) at M rows, block [128, 128] and per-channel weights. Each
row times a CUDA graph that calls the op on ROTATE weight copies in turn (together > 2x the 50 MB L2, so every
call streams its weight from HBM, as in the engine) and reports us a call, GB/s of weight bytes and the share of
the measured copy rate (read + write counted, as in ../shared/PERF.md; a pure read can go a little faster).
Paths per (shape, M, layout):
  gemv        the GEMV quantizing its own activations (fp8_linear with GEMV_MAX_M >= M)
  dot         the tl.dot GEMM with its 16-64-row activation tile (GEMV and swap off) + the quantization kernel
  swap        the swap-AB kernel + the quantization kernel
  swap codes  the swap-AB kernel on codes a producer made (fp8_linear_quantized: no quantization kernel), and
              the same with serial split-K switched (the last program of a tile adds the partials; the row says
              which way it ran)
  bf16        cuBLAS on the bf16 weight (the same shape, twice the bytes)
--rowmax adds, per-channel, two rows that include the producer before each call (SiLU-and-mul of a [M, 2K]
gate | up input, as before down_proj): "silu quant + swap codes" (silu_and_mul_quant_fp8, one program a row,
then the swap kernel on its codes: the engine's path) and "silu rowmax + swap quant_a" (silu_and_mul_rowmax,
then the swap kernel quantizing the rows itself: ATOM_FP8_ROWMAX_MAX_M); their difference is what the switch
moves a layer (the engine's A/B: bench_vs_vllm.sh --alt-env ATOM_FP8_ROWMAX_MAX_M=<rows>).
--sweep adds swap tiles (block_n, num_warps, num_stages, split) at M = 1, 16 and 64, block layout. --pdl adds
swap codes rows with programmatic dependent launch (pdl.py) switched, with L2 prefetch sizes of 0 / 256 / 4,096
bytes a weight row, and with serial split-K switched at prefetch 0: consecutive calls in the graph overlap as
consecutive kernels of a decode step do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import FP8_LINEARS, GraphRows, copy_bandwidth, patched  # noqa: E402

from atom.ops import quant_fp8 as Q  # noqa: E402
from atom.ops.registry import resolve  # noqa: E402
from atom.ops.triton_kernels import pdl  # noqa: E402
from atom.ops.triton_kernels import quant_fp8 as tk  # noqa: E402

DEV = "cuda"
L2_BYTES = 50 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--pdl", action="store_true",
                    help="swap codes rows with programmatic dependent launch switched, and L2 prefetch sizes")
    ap.add_argument("--rowmax", action="store_true",
                    help="per-channel rows with the SiLU-and-mul producer: quantizing itself, or the GEMM quantizing")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--shapes", default=",".join(FP8_LINEARS))
    opts = ap.parse_args()
    torch.manual_seed(0)
    copy = copy_bandwidth()
    print(f"copy rate {copy:.0f} GB/s (read + write)", flush=True)
    lin, lin_q = resolve("fp8_linear", "triton"), resolve("fp8_linear_quantized", "triton")
    bench = GraphRows(copy)
    row, rows_out = bench.time, bench.rows

    for proj in opts.shapes.split(","):
        n, k = FP8_LINEARS[proj]
        rotate = max(2, -(-2 * L2_BYTES // (n * k)))
        w = [torch.randn(n, k, device=DEV) / k**0.5 for _ in range(rotate)]
        layouts = {lay: [Q.quantize_weight_fp8(x, lay) for x in w] for lay in ("block", "channel")}
        bf16 = [x.to(torch.bfloat16) for x in w]
        del w
        for m in [int(v) for v in opts.rows.split(",")]:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            for lay, ws in layouts.items():
                block = [128, 128] if lay == "block" else None
                nbytes = n * k
                tag = f"{proj} M{m} {lay}"

                def call_all(fn=lin):
                    def run():
                        for q, s in ws:
                            fn(x, q, s, None, block)
                    return run

                if m <= tk.GEMV_MAX_M_CANDIDATE:
                    with patched(tk, GEMV_MAX_M=tk.GEMV_MAX_M_CANDIDATE, GEMV_FUSED_QUANT_PER_TOKEN=True):
                        row(f"gemv {tag}", call_all(), nbytes, rotate)
                with patched(tk, GEMV_MAX_M=0, SWAP_MAX_M=0, SCALED_MM=False):
                    row(f"dot {tag}", call_all(), nbytes, rotate)
                with patched(tk, GEMV_MAX_M=0, SWAP_MAX_M=64):
                    row(f"swap {tag}", call_all(), nbytes, rotate)
                    if block is not None:
                        a, sa = tk.per_token_group_quant_fp8(x, 128, torch.float8_e4m3fn)
                    else:
                        a, sa = tk.per_token_quant_fp8(x, torch.float8_e4m3fn)

                    def codes():
                        for q, s in ws:
                            lin_q(a, sa, q, s, None, block, torch.bfloat16)
                    row(f"swap codes {tag}", codes, nbytes, rotate)
                    with patched(tk, SWAP_SERIAL_SPLIT=not tk.SWAP_SERIAL_SPLIT):
                        row(f"swap codes {tag} serial split {tk.SWAP_SERIAL_SPLIT}", codes, nbytes, rotate)
                    if opts.rowmax and block is None:
                        gate_up = torch.randn(m, 2 * k, device=DEV, dtype=torch.bfloat16)
                        silu_q, silu_r = (resolve(op, "triton") for op in ("silu_and_mul_quant_fp8",
                                                                             "silu_and_mul_rowmax"))
                        lin_r = resolve("fp8_linear_rowmax", "triton")

                        def producer_codes():
                            for q, s in ws:
                                lin_q(*silu_q(gate_up, None, torch.float8_e4m3fn), q, s, None, None, torch.bfloat16)

                        def producer_rowmax():
                            for q, s in ws:
                                lin_r(*silu_r(gate_up), q, s, None, torch.bfloat16)
                        row(f"silu quant + swap codes {tag}", producer_codes, nbytes, rotate)
                        with patched(tk, ROWMAX_MAX_M=64):
                            row(f"silu rowmax + swap quant_a {tag}", producer_rowmax, nbytes, rotate)
                    if opts.pdl:
                        with patched(pdl, ENABLED=not pdl.ENABLED):
                            row(f"swap codes {tag} pdl {pdl.ENABLED}", codes, nbytes, rotate)
                        for pf in (0, 256, 4096):
                            with patched(tk, PDL_PREFETCH_BYTES=pf):
                                row(f"swap codes {tag} pdl prefetch {pf}", codes, nbytes, rotate)
                        with patched(tk, SWAP_SERIAL_SPLIT=not tk.SWAP_SERIAL_SPLIT, PDL_PREFETCH_BYTES=0):
                            row(f"swap codes {tag} serial split {tk.SWAP_SERIAL_SPLIT} prefetch 0", codes, nbytes,
                                rotate)
                    if opts.sweep and lay == "block" and m in (1, 16, 64):
                        auto = tk._swap_tile(m, n, k, 128, x.device)["split_k"]
                        for bn, warps, stages in ((64, 4, 3), (64, 4, 5), (64, 4, 7), (128, 4, 4), (128, 8, 4),
                                                  (128, 8, 6), (256, 8, 3)):
                            for split in sorted({auto, max(1, auto // 2), min(8, auto * 2)}):
                                tile = dict(block_n=bn, num_warps=warps, num_stages=stages, split_k=split)
                                with patched(tk, SWAP_TILE_OVERRIDE=tile):
                                    row(f"  sweep swap codes {tag} {tile}", codes, nbytes, rotate)

            def cublas():
                for wb in bf16:
                    torch.nn.functional.linear(x, wb)
            row(f"bf16 cublas {proj} M{m} (2 B a weight)", cublas, 2 * n * k, rotate)
        del layouts, bf16
        torch.cuda.empty_cache()
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(dict(copy_gbs=copy, rows=rows_out), f, indent=1)


if __name__ == "__main__":
    main()
