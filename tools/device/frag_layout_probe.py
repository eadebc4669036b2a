"""Compile an MXFP4 regdot K step for sm_90 on this machine (no GPU needed) and count its TTGIR conversions and SASS
instructions: the checkpoint byte order (FRAG=False, what _expert_gemm_mxr_kernel's bf16 decode runs) against a
16-byte block whose 4-byte word c holds bytes (2c, 2c+1, 2c+8, 2c+9) of the logical row (FRAG=True: each word is
one thread's A-fragment columns). KERNEL_NOTES.md (stop 30) has what it printed.

    PYTHONPATH=packages/atom-core/src python tools/device/frag_layout_probe.py   (PROBE_TTGIR=/tmp/p: TTGIR files)
"""
import os
import subprocess
import tempfile
from collections import Counter

import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from atom.ops.triton_kernels.moe_swigluoai import _e2m1_bytes_bf16_ptx, _e8m0_bf16_pair, _mx_decode_chunk

@triton.jit
def k_exp(w_ptr, s_ptr, a_ptr, out_ptr, K2, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
          FRAG: tl.constexpr, A_SPLIT: tl.constexpr):
    n = tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    J: tl.constexpr = BLOCK_K // 2
    S: tl.constexpr = BLOCK_K // 32
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, 2 * K2, BLOCK_K):
        kb = k0 // 2 + tl.arange(0, J)
        if FRAG == 2:  # one contiguous [64 rows x 64 bytes] tile a K step, in the A fragment's register order
            # address bits, low to high: 5 register bits, 5 lane bits, 2 warp bits: thread t's 32 bytes at 32 t,
            # loaded as two 16-byte halves (the widest vector) and joined (the join is register bit 4)
            t = tl.arange(0, 128)[:, None] * 32 + tl.arange(0, 16)[None, :]
            tile = w_ptr + (k0 // BLOCK_K) * 4096
            both = tl.join(tl.load(tile + t), tl.load(tile + 16 + t))  # [128, 16, 2]
            bits = tl.reshape(both, [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])  # w1 w0 l4 l3 l2 l1 l0 r3 r2 r1 r0 r4
            # logical row = w1 w0 r1 l4 l3 l2 (high to low), byte = r4 r3 l1 l0 r2 r0
            packed = tl.reshape(tl.permute(bits, (0, 1, 9, 2, 3, 4, 11, 7, 5, 6, 8, 10)), [BLOCK_N, J])
        else:
            packed = tl.load(w_ptr + n[:, None] * K2 + kb[None, :])  # [N, J] uint8 (storage order)
        g = k0 // 32 + tl.arange(0, S)
        sb = tl.load(s_ptr + n[:, None] * (K2 // 16) + g[None, :])
        if FRAG >= 1:
            lo_s, hi_s = _e8m0_bf16_pair(sb)
            low, high = _e2m1_bytes_bf16_ptx(tl.reshape(packed, [BLOCK_N, S, 16]),
                                             tl.broadcast_to(lo_s[:, :, None], [BLOCK_N, S, 16]),
                                             tl.broadcast_to(hi_s[:, :, None], [BLOCK_N, S, 16]))
            # storage: word c of a 16-byte block holds bytes (2c, 2c+1, 2c+8, 2c+9) of the logical row
            low = tl.reshape(tl.permute(tl.reshape(low, [BLOCK_N, S, 4, 2, 2]), (0, 1, 3, 2, 4)), [BLOCK_N, J])
            high = tl.reshape(tl.permute(tl.reshape(high, [BLOCK_N, S, 4, 2, 2]), (0, 1, 3, 2, 4)), [BLOCK_N, J])
        else:
            low, high = _mx_decode_chunk(packed, sb, tl.bfloat16, BLOCK_N, BLOCK_K, "bf16")
        if A_SPLIT:  # one contiguous [BLOCK_K, M] load, split into the even and odd columns in registers
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + m[None, :] * (2 * K2) + kk[:, None])
            a_even, a_odd = tl.split(tl.permute(tl.reshape(a, [J, 2, BLOCK_M]), (0, 2, 1)))
        else:
            a_even = tl.load(a_ptr + m[None, :] * (2 * K2) + (2 * kb)[:, None])
            a_odd = tl.load(a_ptr + m[None, :] * (2 * K2) + (2 * kb + 1)[:, None])
        acc = tl.dot(low, a_even, acc)
        acc = tl.dot(high, a_odd, acc)
    tl.store(out_ptr + n[:, None] * BLOCK_M + m[None, :], acc)

def build(frag, a_split=False):
    sig = {"w_ptr": "*u8", "s_ptr": "*u8", "a_ptr": "*bf16", "out_ptr": "*fp32", "K2": "i32"}
    consts = dict(BLOCK_N=64, BLOCK_M=16, BLOCK_K=128, FRAG=frag, A_SPLIT=a_split)
    names = k_exp.arg_names
    for kk in consts: sig[kk] = "constexpr"
    aligned = {(names.index(a),): [["tt.divisibility", 16]] for a in ("w_ptr", "s_ptr", "a_ptr", "out_ptr", "K2")}
    src = ASTSource(fn=k_exp, signature=sig, constexprs={(names.index(kk),): v for kk, v in consts.items()},
                    attrs=aligned)  # pointers 16-byte aligned and K2 a multiple of 16, as a real launch specializes
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))

bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
for frag, a_split in ((0, False), (1, False), (2, False), (0, True), (2, True)):
    c = build(frag, a_split)
    ttgir = c.asm["ttgir"]
    f = tempfile.NamedTemporaryFile(suffix=".cubin", delete=False); f.write(c.asm["cubin"]); f.close()
    sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    ins = [l.split(";")[0].split("*/")[-1].strip().split(" ")[0] for l in sass.splitlines() if "/*" in l and ";" in l]
    ins = [i for i in ins if i and not i.startswith("@")]
    cnt = Counter(x.split(".")[0] for x in ins)
    if os.environ.get("PROBE_TTGIR"):
        with open(f"{os.environ['PROBE_TTGIR']}{frag}{int(a_split)}.ttgir", "w") as out:
            out.write(ttgir)
    print(f"FRAG={frag} A_SPLIT={int(a_split)}: convert_layout {ttgir.count('ttg.convert_layout')}, local_alloc {ttgir.count('ttg.local_alloc')}, "
          f"SASS total {sum(cnt.values())}: " + ", ".join(f"{k} {v}" for k, v in cnt.most_common(12)))
