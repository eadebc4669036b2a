"""Static SASS of the FP8 swap-AB GEMM's K loop (`_fp8_gemm_swap_kernel`), compiled for sm_90 on this machine (no GPU
needed): the kernel on FP8 codes from a quantization kernel against the same kernel quantizing float activations
itself from their rows' partial maxima (QUANT_A), per-channel weights, qwen3-8b's down_proj
launch (64 weight rows a program, K steps of 128, split K). One warp's instructions a K step by opcode and the
registers ptxas gives each. Use the device's Triton (3.6; see mx_frag_sass.py for the install into /tmp/tri36):

    PYTHONPATH=/tmp/tri36:packages/atom-core/src python tools/device/swap_sass.py [--block-k 256] [--stages 3]

The last column counts the global loads the compiled kernel issues ahead of its PDL wait (ACQBULK).
"""

from __future__ import annotations

import argparse
import os
import sys

import triton

sys.path.insert(0, os.path.dirname(__file__))
from mx_frag_sass import ahead_of_wait, compile_sm90, loop_counts, registers  # noqa: E402

from atom.ops.triton_kernels.quant_fp8 import _fp8_gemm_swap_kernel  # noqa: E402

ALIGNED = ("a_ptr", "as_ptr", "w_ptr", "ws_ptr", "bias_ptr", "out_ptr", "final_ptr", "cnt_ptr", "N", "K", "a_stride",
           "w_stride", "out_stride_split", "out_stride_m", "k_per_split")


def signature(act: str, block_m: int, block_n: int, block_k: int, tma: bool, weight: str = "*fp8e4nv") -> dict:
    ptr = {"a_ptr": act, "as_ptr": "*fp32", "w_ptr": weight, "ws_ptr": "*fp32", "bias_ptr": "*bf16",
           "out_ptr": "*fp32", "final_ptr": "*bf16", "cnt_ptr": "*i32"}
    if tma:
        ptr["a_desc"] = f"tensordesc<{act[1:]}[{block_m}, {block_k}]>"
        ptr["w_desc"] = f"tensordesc<{weight[1:]}[{block_n}, {block_k}]>"
    else:
        ptr["a_desc"], ptr["w_desc"] = act, weight
    return {n: ptr.get(n, "i32") for n in _fp8_gemm_swap_kernel.arg_names}


def before_wait(kernel) -> str:
    """Global loads (LDG / LDGSTS / UTMALDG) issued before the PDL wait (ACQBULK), of all."""
    counts = ahead_of_wait(kernel, ("LDG", "LDGSTS", "UTMALDG"))
    early, total = sum(a for a, _ in counts.values()), sum(n for _, n in counts.values())
    return f"{early} of {total} global loads before the PDL wait"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-k", type=int, default=256)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--dense", action="store_true",
                    help="the bf16 weights' form (SCALED=False: atom.ops.triton_kernels.dense) instead of FP8")
    args = ap.parse_args()
    bk = args.block_k
    print(f"Triton {triton.__version__}, sm_90, 4 warps, {args.stages} stages, [64 weight rows, BLOCK_M rows, K {bk}], "
          "split 4; the K loop, one warp's instructions a step")
    variants = [("codes, 1 row (pointer loads)", "*fp8e4nv", 16, False, False),
                ("QUANT_A, 1 row (pointer loads)", "*bf16", 16, False, True),
                ("codes, 2-16 rows (TMA)", "*fp8e4nv", 16, True, False),
                ("QUANT_A, 2-16 rows (TMA)", "*bf16", 16, True, True),
                ("codes, 17-32 rows (TMA)", "*fp8e4nv", 32, True, False),
                ("QUANT_A, 17-32 rows (TMA)", "*bf16", 32, True, True)]
    if args.dense:
        variants = [("bf16 weights, 1 row (pointer loads)", "*bf16", 16, False, False),
                    ("bf16 weights, 2-16 rows (TMA)", "*bf16", 16, True, False),
                    ("bf16 weights, 17-32 rows (TMA)", "*bf16", 32, True, False)]
    for label, act, block_m, tma, quant in variants:
        consts = dict(SCALE_BN=1, BLOCK_SCALES=False, HAS_BIAS=False, SPLIT=4, BLOCK_M=block_m, BLOCK_N=64,
                      BLOCK_K=bk, SERIAL=False, PDL=True, PREFETCH=0, PRECISE=False, TMA=tma, FAST_ACC=True,
                      WS=False, QUANT_A=quant, A_PARTS=16, FP8_MAX=448.0, MIN_SCALE=1.0 / (448.0 * 512.0),
                      MIN_EXP=-6, EMULATE=False, SCALED=not args.dense, F32_DOT=False)
        weight = "*bf16" if args.dense else "*fp8e4nv"
        kernel = compile_sm90(_fp8_gemm_swap_kernel, signature(act, block_m, 64, bk, tma, weight), consts, num_warps=4,
                              num_stages=args.stages, aligned=ALIGNED)
        total, loop = loop_counts(kernel)
        top = ", ".join(f"{op} {n}" for op, n in loop.most_common(10))
        print(f"{label}: loop {sum(loop.values())}, kernel {total}; {registers(kernel)}; {before_wait(kernel)}\n"
              f"    {top}")

if __name__ == "__main__":
    main()
