"""Static SASS of the FP8 swap-AB GEMM's K step (atom.ops.triton_kernels.quant_fp8._fp8_gemm_swap_kernel), compiled
for sm_90 on this machine (no GPU needed): W8A8 (codes x codes, wgmma from shared memory) against weight-only (A16:
each weight tile loaded to registers and widened to bf16, PRMT + F2F + F2FP, for a wgmma with A from registers).
Per warp and per weight of a thread's share of the tile; registers from ptxas. Device README item X reads the engine
A/B with these figures (KERNEL_NOTES.md, stops 41-42).

Use the device's Triton (3.6) for figures that carry over, as for mx_frag_sass.py:

    PYTHONPATH=/tmp/tri36:packages/atom-core/src python tools/device/fp8_widen_sass.py
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mx_frag_sass import compile_sm90, loop_counts, registers  # noqa: E402

from atom.ops.triton_kernels.quant_fp8 import _fp8_gemm_swap_kernel  # noqa: E402

SIGNATURE = dict(a_ptr="*bf16", as_ptr="*fp32", w_ptr="*fp8e4nv", ws_ptr="*fp32", bias_ptr="*bf16", out_ptr="*fp32",
                 final_ptr="*bf16", cnt_ptr="*i32", M="i32", N="i32", K="i32", a_stride="i32", as_stride="i32",
                 w_stride="i32", ws_stride_n="i32", ws_stride_k="i32", out_stride_split="i32", out_stride_m="i32",
                 k_per_split="i32")
# what a qwen3-8b launch specializes (16-byte aligned pointers, sizes and strides multiples of 16); M = 1 is not
ALIGNED = ("a_ptr", "as_ptr", "w_ptr", "ws_ptr", "bias_ptr", "out_ptr", "final_ptr", "cnt_ptr", "N", "K", "a_stride",
           "w_stride", "out_stride_m", "k_per_split")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-m", default="16")
    ap.add_argument("--stages", type=int, default=5)
    opts = ap.parse_args()
    print(f"sm_90, 4 warps, {opts.stages} stages, [64 weight rows, BLOCK_M tokens, K 128] per step, split 2; "
          "one warp's instructions per K step")
    weights = 64 * 128 // 128  # weights a thread widens per K step (64 x 128 tile over 128 threads)
    for block_m in (int(b) for b in opts.block_m.split(",")):
        for layout, block_scales in (("channel", False), ("block", True)):
            variants = [("W8A8", dict(A16=False), {"a_ptr": "*fp8e4nv"}), ("A16", dict(A16=True), {})]
            for name, flags, sig in variants:
                kernel = compile_sm90(
                    _fp8_gemm_swap_kernel, {**SIGNATURE, **sig},
                    dict(SCALE_BN=128, BLOCK_SCALES=block_scales, HAS_BIAS=False, SPLIT=2, BLOCK_M=block_m,
                         BLOCK_N=64, BLOCK_K=128, SERIAL=False, PDL=True, PREFETCH=0, PRECISE=False, F32_DOT=False,
                         **flags),
                    num_stages=opts.stages, aligned=ALIGNED)
                total, loop = loop_counts(kernel)
                n = sum(loop.values())
                top = ", ".join(f"{k} {v}" for k, v in loop.most_common(9))
                print(f"BLOCK_M {block_m:2d} {layout:7s} {name:4s}: loop {n:4d} ({n / weights:.2f} a weight), "
                      f"kernel {total}, {registers(kernel)}; {top}")


if __name__ == "__main__":
    main()
