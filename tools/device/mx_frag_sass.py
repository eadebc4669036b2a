"""Static SASS of regdot's K step on the checkpoint layout and on the fragment order, compiled for sm_90 on this
machine (no GPU needed): the instructions of each kernel's main loop (the block a backward branch closes), per
warp and per weight a thread decodes, and the registers ptxas gives it. regdot is bound by instruction issue at
decode sizes (KERNEL_NOTES.md, stops 29-30), so the loop's count is the figure to lower before device time.

Use the device's Triton for figures that carry over (it is 3.6 there): `pip download triton==3.6.0` then
`pip install --no-deps --target /tmp/tri36 triton-3.6.0-*.whl`, and put /tmp/tri36 first on PYTHONPATH.

    PYTHONPATH=/tmp/tri36:packages/atom-core/src python tools/device/mx_frag_sass.py [--block-m 16,32]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from atom.ops.mxfp4 import FRAG_CODE_BYTES, FRAG_STEP_BYTES
from atom.ops.triton_kernels.moe_swigluoai import _expert_gemm_mxf_kernel, _expert_gemm_mxr_kernel

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
COMMON = dict(a_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16", sorted_ids_ptr="*i32", padded_end_ptr="*i32",
              n_out="i32", k_dim="i32", num_pairs="i32", num_experts="i32", a_row_div="i32", a_stride="i32",
              w_stride_e="i32", bias_stride_e="i32", out_stride="i32", alpha="fp32", limit="fp32", part_ptr="*fp32",
              part_stride_s="i32", part_stride_p="i32")
# what a gpt-oss-20b launch specializes: 16-byte aligned pointers, strides and sizes multiples of 16
ALIGNED = ("a_ptr", "w_ptr", "s_ptr", "bias_ptr", "out_ptr", "sorted_ids_ptr", "padded_end_ptr", "part_ptr", "n_out",
           "k_dim", "a_stride", "w_stride_e", "w_stride_n", "bias_stride_e", "out_stride", "part_stride_s",
           "part_stride_p")


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                 aligned: tuple[str, ...] = ALIGNED):
    """fn compiled for sm_90 with these argument types, constexprs and 16-divisible arguments (`aligned`: the
    pointers, sizes and strides a real launch specializes; without them loads do not vectorize)."""
    names = fn.arg_names
    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned if a in names}
    src = ASTSource(fn=fn, signature={n: signature[n] for n in names},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))


def loop_counts(kernel) -> tuple[int, Counter]:
    """(instructions in the whole kernel, opcode counts of its largest loop)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    text = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                          check=True).stdout
    os.unlink(f.name)
    labels, ops = {}, []
    for line in text.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
        elif "/*" in line and ";" in line:
            body = line.split(";")[0].split("*/")[-1].strip()
            if body:
                tokens = body.split()
                ops.append((tokens[1] if tokens[0].startswith("@") and len(tokens) > 1 else tokens[0], body))
    best = Counter()
    for i, (_, body) in enumerate(ops):
        target = re.search(r"BRA\s+.*?(\.L_x_\d+)", body)
        if target and labels.get(target.group(1), i + 1) <= i:
            loop = Counter(op.split(".")[0] for op, _ in ops[labels[target.group(1)]: i + 1])
            if sum(loop.values()) > sum(best.values()):
                best = loop
    return len(ops), best


def ahead_of_wait(kernel, opcodes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """For each opcode: (instructions of it before the PDL wait (ACQBULK), in the whole kernel); with no wait in the
    kernel every instruction counts as before it."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    text = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                          check=True).stdout
    os.unlink(f.name)
    ops = [m.group(1).split(".")[0] for m in re.finditer(r"\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text)]
    wait = next((i for i, op in enumerate(ops) if op == "ACQBULK"), len(ops))
    return {op: (ops[:wait].count(op), ops.count(op)) for op in opcodes}


def registers(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".ptx", delete=False, mode="w") as f:
        f.write(kernel.asm["ptx"])
    out = subprocess.run([os.path.join(BIN, "ptxas"), "--gpu-name", "sm_90a", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    found = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"{found.group(1) if found else '?'} registers, {spills.group(1) if spills else '?'} bytes spilled"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-m", default="16,32")
    ap.add_argument("--split-k", type=int, default=2)
    opts = ap.parse_args()
    print(f"Triton {triton.__version__}, sm_90, 4 warps, 3 stages; per K step of 128 (one warp's instructions)")
    for block_m in (int(b) for b in opts.block_m.split(",")):
        for gated in (True, False):
            weights = (2 if gated else 1) * 64  # decoded weights a thread: 64 rows x 128 columns per matrix
            plain = compile_sm90(_expert_gemm_mxr_kernel, {**COMMON, "w_ptr": "*u8", "s_ptr": "*u8",
                                                           "w_stride_n": "i32", "s_stride_e": "i32",
                                                           "s_stride_n": "i32"},
                                 dict(GATED=gated, E_PAD=32, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, F32_DOT=False,
                                      DECODE="bf16", SPLIT_K=opts.split_k, PDL=True))
            frag = compile_sm90(_expert_gemm_mxf_kernel, {**COMMON, "w_ptr": "*u8", "up_tiles": "i32",
                                                          "steps": "i32"},
                                dict(GATED=gated, E_PAD=32, BLOCK_M=block_m, F32_DOT=False, IEEE=False, PTX=True,
                                     STEP_BYTES=FRAG_STEP_BYTES, CODE_BYTES=FRAG_CODE_BYTES, SPLIT_K=opts.split_k,
                                     PER_PAIR=False, PDL=True, WORDS_SPLIT=True))
            for name, kernel in (("checkpoint layout", plain), ("fragment order", frag)):
                total, loop = loop_counts(kernel)
                n = sum(loop.values())
                top = ", ".join(f"{k} {v}" for k, v in loop.most_common(10))
                print(f"BLOCK_M {block_m:3d} {'gate/up' if gated else 'down   '} {name:17s}: loop {n:4d} "
                      f"({n / weights:.2f} a weight), kernel {total}, {registers(kernel)}; {top}")


if __name__ == "__main__":
    main()
