"""The one-launch decode layer (`atom.ops.triton_kernels.decode_layer._decode_layer_kernel`) compiled for sm_90 on
this machine (no GPU needed): registers, spills, and the global loads issued before the PDL wait, for a preset's
shapes with the launcher's tiles (132 programs, as an H100 / H200). Use the device's Triton (3.6; see
mx_frag_sass.py for the install into /tmp/tri36):

    PYTHONPATH=/tmp/tri36:packages/atom-core/src python tools/device/decode_layer_sass.py [--preset qwen3-0.6b]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from atom.ops.triton_kernels import decode_layer as dl  # noqa: E402
from decode_layer_bench import SHAPES  # noqa: E402
from mx_frag_sass import ahead_of_wait, compile_sm90, registers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--programs", type=int, default=132)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--barrier", type=int, default=1, choices=(1, 2), help="the grid barrier's form (GRID_SYNC)")
    ap.add_argument("--stream", type=int, default=dl.STREAM_BYTES,
                    help="the early stream's bytes a program (ATOM_DECODE_LAYER_STREAM), with a next layer")
    ap.add_argument("--loop-ahead", type=int, default=dl.LOOP_AHEAD, help="ATOM_DECODE_LAYER_LOOP_AHEAD")
    opts = ap.parse_args()
    hidden, hq, hkv, d, inter = SHAPES[opts.preset]
    p = opts.programs
    s = dl.decode_splits(p, hkv, opts.max_seq_len)
    const = dict(**dl.tiles(hidden, inter, hq, hkv, d, 2, p, s, opts.stream, True), PAGE=16, KV_ALIGN=16, HAS_RES=True,
                 QKV_BIAS=False, QK_NORM=True, IS_NEOX=True, ACT=0, F32_DOT=False, IEEE=False, ASM=True,
                 LOOP_AHEAD=opts.loop_ahead, PHASE_LO=0, PHASE_HI=dl.NUM_PHASES - 1,
                 GRID_SYNC=opts.barrier,
                 FLAGS_AT=dl.flags_at(hkv), PDL=True)
    for k in ("H", "INTER"):
        const.pop(k)
    ptrs = {n: "*bf16" for n in dl._decode_layer_kernel.arg_names if n.endswith("_ptr")}
    ptrs.update(cs_ptr="*fp32", pos_ptr="*i64", seq_lens_ptr="*i32", slot_ptr="*i64", bt_ptr="*i32",
                part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32", bar_ptr="*i32")
    sig = {n: ptrs.get(n, "fp32" if n in ("eps", "qk_eps", "scale") else "i32")
           for n in dl._decode_layer_kernel.arg_names if n not in const}
    aligned = tuple(n for n in sig if n.endswith("_ptr")) + ("H", "INTER")
    c = const
    k = compile_sm90(dl._decode_layer_kernel, sig, const, num_warps=dl.NUM_WARPS, num_stages=1, aligned=aligned)
    loads = ahead_of_wait(k, ("LDG",))["LDG"]
    print(f"{opts.preset}: {p} programs, {dl.NUM_WARPS} warps, splits {s}, chunks qkv {c['T_QKV']}x{c['KB_QKV']}, "
          f"o {c['T_H']}x{c['KB_O']}, gate_up 2x{c['T_GU']}x{c['KB_GU']}, down {c['T_H']}x{c['KB_D']}, early stream "
          f"{opts.stream} B (lines a row o {c['EL_O']}, gate_up {c['EL_GU']}, down {c['EL_D']}, next qkv "
          f"{c['EL_NEXT']}), loop ahead {opts.loop_ahead}: "
          f"{registers(k)}; {loads[0]} of {loads[1]} LDG before the PDL wait")


if __name__ == "__main__":
    main()
