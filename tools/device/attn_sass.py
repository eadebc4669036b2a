"""Static SASS of the decode attention kernel's key loop, compiled for sm_90 on this machine (no GPU needed).

The decode kernel (`_attention_kernel` with one query a sequence) costs the same over an FP8 cache as over a bf16
one at half the bytes (BENCHMARKS.md, H100 2026-12-05): it is bound by its instructions. This prints, per 64-key
step and warp, the instructions of the kernel's largest loop by opcode, and the registers ptxas gives it, for bf16
and FP8 caches, so changes to the loop can be counted before device time. Use the device's Triton (3.6; see
mx_frag_sass.py for the install into /tmp/tri36):

    PYTHONPATH=/tmp/tri36:packages/atom-core/src python tools/device/attn_sass.py [--block-n 64] [--group 4]

--prep compiles the decode kernel with the prep inside (qk-norm, rope, KV write; the qkv GEMM's 2 partials added)
over an FP8 cache with fp16 dots, as a qwen3-8b FP8 batch-1 step runs it, once per --early mode (off; meta:
EARLY_META; kv: EARLY_META + EARLY_KV 1, the prefetch; load: EARLY_META + EARLY_KV 2, the loads), and prints registers, instructions and what runs ahead of the PDL wait
(ACQBULK): global loads (LDG) and L2 prefetches (CCTL):

    PYTHONPATH=/tmp/tri36:packages/atom-core/src python tools/device/attn_sass.py --prep --splits 4 --early off,meta,kv,load
"""

from __future__ import annotations

import argparse
import os
import sys

import triton

sys.path.insert(0, os.path.dirname(__file__))
from mx_frag_sass import ahead_of_wait, compile_sm90, loop_counts, registers  # noqa: E402

from atom.ops.triton_kernels.attention import _attention_kernel  # noqa: E402

I32 = "i32"
# what a qwen3-8b decode launch specializes: 16-byte aligned pointers, strides and sizes multiples of 16
ALIGNED = ("q_ptr", "kc_ptr", "vc_ptr", "bt_ptr", "out_ptr", "part_acc_ptr", "head_dim", "block_size", "q_stride_t",
           "q_stride_h", "out_stride_t", "out_stride_h", "kc_stride_b", "kc_stride_s", "kc_stride_h", "vc_stride_b",
           "vc_stride_s", "vc_stride_h", "num_heads")


def signature(kv: str) -> dict:
    ptr = {"q_ptr": "*bf16", "kc_ptr": kv, "vc_ptr": kv, "bt_ptr": "*i32", "qsl_ptr": "*i32", "seq_lens_ptr": "*i32",
           "out_ptr": "*bf16", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32",
           "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "sinks_ptr": "*bf16", "pos_ptr": "*i64",
           "k_raw_ptr": "*bf16", "v_raw_ptr": "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "cs_ptr": "*fp32",
           "slot_ptr": "*i64", "max_ptr": "*fp32"}
    scalars = {"scale": "fp32", "softcap": "fp32", "eps": "fp32"}
    return {n: ptr.get(n, scalars.get(n, I32)) for n in _attention_kernel.arg_names}


def before_wait(kernel) -> str:
    """Global loads (LDG) and L2 prefetches (CCTL) ahead of the PDL wait (ACQBULK), of all."""
    return ", ".join(f"{op} {a} of {n}" for op, (a, n) in ahead_of_wait(kernel, ("LDG", "CCTL")).items()) \
        + " ahead of the wait"


def prep_variants(opts) -> None:
    """The decode kernel with the prep inside over an FP8 cache (fp16 dots, int32 offsets), per --early mode."""
    names = _attention_kernel.arg_names
    for mode in opts.early.split(","):
        consts = dict(GROUP=opts.group, BLOCK_Q=1, BLOCK_M=max(16, opts.group), BLOCK_N=64, BLOCK_D=128,
                      USE_SOFTCAP=False, USE_WINDOW=False, NUM_SPLITS=opts.splits, F32_DOT=False, IEEE=False,
                      KV_ALIGN=16, KV_FP8=True, HAS_K_SCALE=True, HAS_V_SCALE=True, USE_SINKS=False, PREP=True,
                      NORM=True, IS_NEOX=True, FP8_MAX=448.0, MIN_EXP=-6, EMULATE=False, PDL=True, PAGE=16,
                      EVEN_D=True, OFF32=True, F16_DOT=True, PREP_PARTS=2, SPLIT_MAJOR=opts.splits > 1,
                      EARLY_META=mode in ("meta", "kv", "load"), EARLY_KV={"kv": 1, "load": 2}.get(mode, 0),
                      KV_LINE=128, KV_LINES=1,
                      KV_ASM=True, MAXIMA=False, FLAT=False, ROWS_PAD=1)
        consts = {k: v for k, v in consts.items() if k in names}
        sig = signature("*fp8e4nv")
        sig.update({"qp_ptr": "*fp32", "kp_ptr": "*fp32", "vp_ptr": "*fp32"})
        kernel = compile_sm90(_attention_kernel, sig, consts, num_warps=4, num_stages=opts.stages, aligned=ALIGNED)
        total, loop = loop_counts(kernel)
        print(f"early {mode}: kernel {total} instructions, key loop {sum(loop.values())}; {registers(kernel)}; "
              f"{before_wait(kernel)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-n", default="64")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--splits", type=int, default=1)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--prep", action="store_true", help="the decode kernel with the prep inside, per --early mode")
    ap.add_argument("--early", default="off,meta,kv,load")
    opts = ap.parse_args()
    if opts.prep:
        prep_variants(opts)
        return
    print(f"Triton {triton.__version__}, sm_90, 4 warps, {opts.stages} stages, GROUP {opts.group}, "
          f"{opts.splits} split(s); the key loop, one warp's instructions a step")
    names = _attention_kernel.arg_names
    variants = [("bf16", "*bf16", False, False, False), ("bf16, int32 offsets", "*bf16", False, False, True),
                ("FP8", "*fp8e4nv", True, False, False), ("FP8, int32 offsets", "*fp8e4nv", True, False, True),
                ("FP8, fp16 dots", "*fp8e4nv", True, True, False),
                ("FP8, fp16 dots, int32 offsets", "*fp8e4nv", True, True, True)]
    for block_n in (int(b) for b in opts.block_n.split(",")):
        for label, kv, fp8, f16, off32 in variants:
            if (f16 and "F16_DOT" not in names) or (off32 and "OFF32" not in names):
                continue
            consts = dict(GROUP=opts.group, BLOCK_Q=1, BLOCK_M=max(16, opts.group), BLOCK_N=block_n, BLOCK_D=128,
                          USE_SOFTCAP=False, USE_WINDOW=False, NUM_SPLITS=opts.splits, F32_DOT=False, IEEE=False,
                          KV_ALIGN=16, KV_FP8=fp8, HAS_K_SCALE=fp8, HAS_V_SCALE=fp8, USE_SINKS=False, PREP=False,
                          NORM=False, IS_NEOX=True, FP8_MAX=448.0, MIN_EXP=-6, EMULATE=False, PDL=True)
            # the knobs of later kernels (a page of 16 keys, head_dim == its tile), where the kernel has them
            consts.update({k: v for k, v in dict(PAGE=16, EVEN_D=True, OFF32=off32, F16_DOT=fp8 and f16).items()
                           if k in names})
            kernel = compile_sm90(_attention_kernel, signature(kv), consts, num_warps=4, num_stages=opts.stages,
                                  aligned=ALIGNED)
            total, loop = loop_counts(kernel)
            top = ", ".join(f"{op} {n}" for op, n in loop.most_common(14))
            print(f"{label} KV, {block_n} keys a step: loop {sum(loop.values())} ({sum(loop.values()) / block_n:.1f} "
                  f"a key), kernel {total}; {registers(kernel)}\n    {top}")

if __name__ == "__main__":
    main()
