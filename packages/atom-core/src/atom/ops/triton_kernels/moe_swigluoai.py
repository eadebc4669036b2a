"""fused_experts_swigluoai in Triton: GPT-OSS experts (biases, clamped SwiGLU) with bf16/fp32 or MXFP4 weights.

The structure is that of atom.ops.triton_kernels.moe (read it first), whose sort, tile choice and top-k sum
this module reuses: up to PAIR_GEMV_MAX_PAIRS (token, k) pairs, one GEMV per (pair, column block) and no
sort; beyond, the pairs sorted by expert and padded to tiles of BLOCK_M rows, and two grouped GEMMs (the
first computes gate and up tiles together, adds their biases and applies the activation in registers; the
second adds the bias and writes each pair's output in the activation dtype, the rounding the reference has
there); then moe._sum_topk weights each token's k rows by their routing weights in float32 and sums them.

MXFP4 weights are read packed, 0.53 bytes per weight, and decoded in registers: a byte holds elements 2j
(low nibble) and 2j+1 (high nibble) of a row, so a K chunk of the weights is taken as its even and its odd
elements, each multiplied with the matching even / odd activations (two half-K dots, or one GEMV with two
products), and no interleaving is ever materialized. E2M1 codes and E8M0 scales become float32 by building
their bits (exact), then the dot operand dtype (exact in bf16 too).

MXFP4 with bf16 / fp16 activations (experts_path): the per-pair GEMV up to PAIR_GEMV_MAX_PAIRS pairs
(MX_PTX_GEMV_MAX_PAIRS with the inline-PTX decode), then an MXFP4 grouped GEMM as out^T = W A^T, the tile's
tokens the matrix instruction's narrow side: "regdot" (the default: weights decoded in registers, block scales
folded in, as the first operand) or "scaled_dot" (tl.dot_scaled, the compiler's upcast); from
MX_DEQUANT_MIN_PAIRS pairs (prefill) the weights are dequantized into a scratch copy and run the dense grouped
GEMM. All are exact to the dequantized weights up to the dot's own accumulation.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

from atom.ops.mxfp4 import (FRAG_CODE_BYTES, FRAG_COLS, FRAG_HALF_BYTES, FRAG_MAX_SCALE, FRAG_ROWS, FRAG_STEP_BYTES,
                             pack_fragments)
from atom.ops.registry import register
from atom.ops.triton_kernels.common import dot_ieee, fit_tile, interpreting
from atom.ops.triton_kernels.moe import _align_by_expert, _gemm_tile, _pair_tile, _sum_topk, sorted_tile, token_columns
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait

logger = logging.getLogger(__name__)

# Up to this many (token, k) pairs, one GEMV per pair (see moe.PAIR_GEMV_MAX_PAIRS). Module-level for sweeps.
PAIR_GEMV_MAX_PAIRS = 16
# MXFP4 with the PTX decode: the per-pair GEMV up to this many pairs. H200, gpt-oss-20b experts
# (tools/device/mx_paths_bench.py, 2026-12-02, us a layer call): the PTX GEMV took 123.7 / 224.5 / 424.6 at 4 /
# 8 / 16 tokens against 183.2 / 227.4-251.6 / 310.8 for regdot with the float32 PTX decode (236.3 with the bf16
# one at 8): it wins up to 8 tokens (32 pairs; by 5% over the bf16 regdot there) and loses from 16.
MX_PTX_GEMV_MAX_PAIRS = 32
# Tile overrides for tools/device/kernel_bench.py sweeps (the same keys as moe.PAIR_TILE_OVERRIDE and
# moe.GEMM_TILE_OVERRIDE); None: moe's choice.
PAIR_TILE_OVERRIDE: dict | None = None
GEMM_TILE_OVERRIDE: dict | None = None
# MXFP4 experts with bf16 / fp16 activations run an MXFP4 grouped GEMM (MX_GEMM's kernel) beyond the per-pair
# GEMV's pairs, instead of the register-decode grouped GEMM (_expert_gemm_kernel), which float32 activations
# always take. ATOM_MXFP4_SCALED_DOT=0 turns that path off (A/B). MX_GEMM_MIN_PAIRS (sweeps only): the GEMM from
# this many pairs on; None: one past the GEMV's limit.
MXFP4_SCALED_DOT = os.environ.get("ATOM_MXFP4_SCALED_DOT", "1") == "1"
MX_GEMM_MIN_PAIRS: int | None = None
# Tile override for sweeps: dict(block_m, block_n, block_k, num_warps, num_stages); None: _mx_tile's choice.
MX_TILE_OVERRIDE: dict | None = None
# From this many (token, k) pairs on (prefill), MXFP4 experts are first dequantized into a scratch copy in the
# activation dtype (_mx_dequant_kernel, one projection at a time) and then run the dense grouped GEMM: the
# grouped MXFP4 kernels are bound by their decode. H200, gpt-oss-20b experts (tools/device/mx_paths_bench.py,
# 2026-12-02, us a layer call): 512 tokens 1,216 against 1,003 for regdot (bf16 decode); 1,024 tokens 1,436
# against 1,981 for regdot (float32 PTX decode; the bf16 one, 5-7% faster at 8-512 tokens, was not run there)
# and 2,774 for scaled-dot; 4,096 tokens 3,207 against 8,986 (scaled-dot); results bit-identical. The
# crossover, interpolated, lies near 680 tokens: so from 2,720 pairs (680 tokens at top-4). The scratch
# (gpt-oss-20b: 1.06 GB for gate/up) falls inside the engine's profiled peak. ATOM_MX_DEQUANT_MIN_PAIRS=0 turns
# it off.
def _env_pairs(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ValueError(f"{name} must be a number of (token, expert) pairs >= 0 (0: off), got {raw!r}")
    return int(raw)


MX_DEQUANT_MIN_PAIRS = _env_pairs("ATOM_MX_DEQUANT_MIN_PAIRS", 2720)
# The MXFP4 grouped GEMM: "regdot" (_expert_gemm_mxr_kernel: the weights decoded in registers, block scales
# folded in, as the first operand of one float32 accumulator over K) or "scaled_dot" (_expert_gemm_mx_kernel,
# tl.dot_scaled: the compiler's upcast on Hopper, native MXFP4 matrix instructions where the GPU has them).
# H200, gpt-oss-20b experts (mx_paths_bench.py, 2026-12-02, default tiles, us a layer call, 4 / 8 / 16 / 32 / 64
# / 128 / 512 tokens): regdot 206 / 288 / 395 / 436 / 444 / 596 / 1,329, scaled-dot 297 / 400 / 554 / 610 / 620
# / 757 / 1,695. Two other hand-decoded kernels lost everywhere and were removed: float16 dots per scale block
# (381-1,878) and a per-expert multi-row GEMV (292-4,260).
MX_GEMM = os.environ.get("ATOM_MX_GEMM", "regdot")
if MX_GEMM not in ("regdot", "scaled_dot"):
    raise ValueError(f"ATOM_MX_GEMM must be regdot or scaled_dot, not {MX_GEMM!r}")
# ATOM_MX_PTX (default on; CUDA only, never on ROCm or under the interpreter): the MXFP4 GEMV and regdot decode
# their packed bytes with inline PTX, four bytes a block (_e2m1_bytes_ptx: the float16 bits of two codes built in
# one 32-bit register). Bit-identical to the element-wise decode (test_mxfp4_ptx_decode_is_bit_identical). H200,
# gpt-oss-20b experts (mx_paths_bench.py, 2026-12-02, us a layer call): the GEMV 42.0 / 123.7 / 224.5 at 1 / 4 /
# 8 tokens against 54.3 / 168.8 / 317.9; regdot 183 / 227-252 / 354 / 488 / 1,066 at 4 / 8 / 32 / 128 / 512
# tokens against 206 / 288 / 436 / 596 / 1,329 (two calls; at 8 tokens they differed by 10%).
MX_PTX = os.environ.get("ATOM_MX_PTX", "1") == "1"
# ATOM_MX_REGDOT_BF16 (default on; with MX_PTX and bf16 activations): regdot's PTX decode builds bf16 weights and
# applies the block scale with two bf16x2 multiplies (_e2m1_bytes_bf16_ptx) instead of scaling float32 values and
# converting them. Bit-identical; H200, same bench: 236 / 336 / 462 / 1,003 us at 8 / 32 / 128 / 512 tokens
# against 252 / 355 / 488 / 1,067 for the float32 PTX decode.
MX_REGDOT_BF16 = os.environ.get("ATOM_MX_REGDOT_BF16", "1") == "1"
# ATOM_MX_SPLIT_K: regdot splits K over this many programs a tile, each storing float32 partial sums that
# _split_k_finish_kernel adds (in a fixed order) before the epilogue. For batches with few tiles: a random-weight
# engine routes every token to the same 4 experts (the router's bias decides), which leaves 4 experts x 1-4 tiles
# x 45 column blocks of 23 sequential K steps each. "auto": MX_SPLIT_K_RULE; a number: always that split; or a
# rule "T:S,...,S" (up to T tokens split S, the last S beyond), for sweeps.
@functools.cache  # _mx_split_k reads it on every MoE call
def _split_rule(raw: str) -> tuple[tuple[int, int], ...]:
    """"T:S,...,S" -> ((T, S), ..., (2**62, S))."""
    rule, parts = [], [p.strip() for p in raw.split(",")]
    try:
        for part in parts[:-1]:
            tokens, split = part.split(":")
            rule.append((int(tokens), int(split)))
        rule.append((2**62, int(parts[-1])))
    except ValueError:
        rule = []
    if not rule or any(split < 1 for _, split in rule):
        raise ValueError(f"ATOM_MX_SPLIT_K must be auto, a number >= 1 or a rule like 48:4,192:2,1; got {raw!r}")
    return tuple(rule)


# H200, gpt-oss-20b experts (mx_paths_bench.py --sweep-kernels split, two calls of 2026-12-02, us a layer call,
# concentrated / random routing): 32 tokens, [16, 64] tile: split 1 142.9, 138.2 / 331.7, 329.6; split 3 111.7,
# 114.1 / 334.5, 337.1 (split 2 119.7 / 329.4, 4 110.3 / 341.2, 6 113.7 / 354.1). 128 tokens, [32, 64]: split 1
# 281.3, 277.3 / 440.2, 471.1; split 2 250.2, 257.8 / 438.5, 471.7 (3 253.8 / 452.9, 4 261.9 / 466.2). In the
# engine (gpt-oss-20b, random weights) batch 32 went from 5.08 to 4.38 ms a step. The [32, 64] tile with split 2
# was faster still where routing is concentrated (84.6-90.2 us; engine 3.87 ms) but 18-28% slower with random
# routing (392.5-423.1), so the tile rule stays; sub-tiles that skip padding (git history: 922cd9b) lost
# everywhere (125.6 / 426.9 at 32 tokens).
MX_SPLIT_K_RULE = "64:3,192:2,1"
# The fragment kernel's own rule (ATOM_MX_SPLIT_K="auto"; a number or rule there sets both). H100, 2026-12-05, the
# kernel at spread routing (mx_paths_bench.py --routing random --sweep-kernels frag_split, us a layer call, one
# process): 32 tokens, 16 tokens a tile: split 1 178.3, 2 185.0, 3 185.4, 4 190.6; 128 tokens, 32 a tile: split 1
# 211.7, 2 233.6, 3 245.4, 4 266.5. A spread batch already gives the grid a tile for most experts, so the split's
# float32 round trip and finishing kernel only cost; regdot's rule above was measured on a batch routed to 4 experts
# (random-weight engines), where it pays. Up to 8 tokens (one token: 4 programs a column block) the split stays.
MX_FRAG_SPLIT_K_RULE = "8:3,1"
# ATOM_MX_FRAG (default 1; 0: the checkpoint layout and regdot's own kernel): GPT-OSS's MXFP4 experts are repacked at
# load in fragment order (atom.ops.mxfp4.pack_fragments; the checkpoint-layout tensors are emptied), and every Triton
# path reads it: regdot's kernel on the fragments (_expert_gemm_mxf_kernel) at every size below MX_DEQUANT_MIN_PAIRS
# (the per-pair GEMV's sizes too), the prefill's dequantization (_mx_frag_dequant_kernel) above. Measured on the
# H200 (2026-12-05, BENCHMARKS.md): 1.3-1.7x faster than regdot a layer call, 15-28% shorter gpt-oss-20b decode
# steps; on by default since its GPU suites passed there (core 205, server 14 with it on; 2026-12-05 11:00 UTC).
# Local sm_90 compile (Triton 3.6, tools/device/mx_frag_sass.py): the gated K step takes 390 instructions a warp for
# 128 weights a thread (3.0 a weight) against regdot's 855 (6.7), 88 registers against 125; the down projection 240
# (3.75) against 483 (7.5). regdot is bound by instruction issue at decode sizes (KERNEL_NOTES.md, stops 29 and 41).
MX_FRAG = os.environ.get("ATOM_MX_FRAG", "1") == "1"
# ATOM_MX_FRAG_BLOCK_M: tokens a tile of the fragment kernel (16, 32 or 64; 0, the default: regdot's tile rule, which
# goes by the average pairs an expert: 16 up to 8, 32 beyond). A batch routed to few experts (random-weight engines)
# decodes each weight once per tile of its tokens, so larger tiles decode less there; spread routing (real
# checkpoints) gives each expert a few tokens, where larger tiles only cost registers (static: 88 / 130 / 170
# registers at 16 / 32 / 64 for gate / up). H200, 2026-12-05, the kernel at spread routing (mx_paths_bench.py
# --routing random): the rule's picks won, 16 at 32 tokens (231.2 us against 241.4 for 32) and 32 at 128 (267.1
# against 346.0 for 16). 32 everywhere was the default in stop 43, from engine runs whose checkpoint routed a batch to
# 6-8 experts (2.30 / 3.18 ms a step at batch 1 / 32 against the rule's 2.54 / 3.64); `bench_vs_vllm.sh` on a
# materialized checkpoint now spreads the batch as real weights do.
MX_FRAG_BLOCK_M = os.environ.get("ATOM_MX_FRAG_BLOCK_M", "0").strip() or "0"
if MX_FRAG_BLOCK_M not in ("0", "16", "32", "64"):
    raise ValueError(f"ATOM_MX_FRAG_BLOCK_M must be 16, 32 or 64 (0: the tile rule), got {MX_FRAG_BLOCK_M!r}")
MX_FRAG_BLOCK_M = int(MX_FRAG_BLOCK_M)
# Up to this many pairs (one token at top-4: a token's experts are distinct, so no weight is decoded twice; pairs
# of several tokens may share one, decoded once a pair) the fragment kernel runs one program per pair and column
# block, without the expert sort: the sort's kernel and the grid's empty tiles (cdiv(pairs, block_m) + experts of
# them, most returning at once: ~4,000 programs for gpt-oss-20b's gate / up at one token, 540 doing work) are
# gone. Module-level for sweeps and the tests.
MX_FRAG_PER_PAIR_MAX_PAIRS = 4
# With K split, the down projection's partial sums go straight to the top-k sum (_split_k_sum_topk_kernel: one
# kernel where _split_k_finish_kernel and moe._sum_topk ran, the same bits: one launch and the [pairs, hidden]
# round trip less a layer). ATOM_MX_SPLIT_SUM_TOPK=0: the two kernels (tests, the engine A/B; not yet measured).
MX_SPLIT_SUM_TOPK = os.environ.get("ATOM_MX_SPLIT_SUM_TOPK", "1") == "1"
MX_SPLIT_K = os.environ.get("ATOM_MX_SPLIT_K", "auto").strip()
# ATOM_MX_FRAG_UNGATED=1 (off until measured): with K split, the fragment kernel runs the gate / up matrix as one
# plain matrix of 2 x intermediate rows (its up tiles follow its gate tiles in the copy, and the split's float32
# sums go to the same [split, pair, gate | up] columns), so each program decodes one 64-row tile a K step instead
# of a gate and an up tile: 66 registers against 88 (Triton 3.6, sm_90, 16 tokens a tile), 7 programs an SM
# against 5, at the price of loading each activation slice twice (once for gate, once for up). The same float32
# sums bit for bit (each program's dots are the gated kernel's, in the same order). Needs intermediate % 64 == 0
# (gpt-oss: 2,880 = 45 x 64); elsewhere, and without a K split, the gated kernel runs.
MX_FRAG_UNGATED = os.environ.get("ATOM_MX_FRAG_UNGATED", "0") == "1"
# The fragment kernel's code layout (pack_fragments' split_words, which must match): the default splits each thread's
# words 0-3 and 4-7 into two 512-byte runs a warp; False reads stop 41-43's layout (tools/device/mx_paths_bench.py's
# regdot_frag_contig, for an A/B in one session).
MX_FRAG_WORDS_SPLIT = True
if MX_SPLIT_K != "auto":
    _split_rule(MX_SPLIT_K)  # refuse a bad value at import


@triton.jit
def _e2m1_to_f32(code):
    """E2M1 codes (0..15, sign | exponent(2) | mantissa(1)) -> float32, by building the float's bits."""
    c = code.to(tl.uint32)
    e = (c >> 1) & 3
    m = c & 1
    bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))  # 0.5 * m, or 2^(e-1) * 1.m
    return (bits | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_to_f16(code):
    """E2M1 codes (0..15) -> float16 equal to 2^-14 times the code's value: the magnitude bits (exponent(2)
    | mantissa(1)) land in the float16's low exponent bits and top mantissa bit, so exponent e >= 1 gives
    2^(e-15) * 1.m and e = 0, m = 1 the subnormal 2^-15; the sign moves to bit 15. Four integer instructions
    and no select; the float16 -> float32 conversion is exact for subnormals too."""
    c = code.to(tl.uint16)
    return (((c & 7) << 9) | ((c & 8) << 12)).to(tl.float16, bitcast=True)


@triton.jit
def _e2m1_bytes_ptx(packed):
    """(low, high): float32 2^-14 times the E2M1 values of each byte's low and high nibble, as _e2m1_to_f16 gives
    them, computed four bytes at a time in PTX. prmt spreads bytes 0, 1 (then 2, 3) into the two 16-bit halves of a
    register; shifts and masks move each half's code into float16 bit positions (magnitude to bits 9-11, sign to
    bit 15) for both halves at once; the halves are converted to float32. CUDA only."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t0, t1, x, y, w;
        .reg .b16 l0, l1, l2, l3, h0, h1, h2, h3;
        prmt.b32 t0, $8, 0, 0x4140;
        prmt.b32 t1, $8, 0, 0x4342;
        shl.b32 x, t0, 9;
        and.b32 x, x, 0x0E000E00;
        shl.b32 y, t0, 12;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mov.b32 {l0, l1}, w;
        shl.b32 x, t0, 5;
        and.b32 x, x, 0x0E000E00;
        shl.b32 y, t0, 8;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mov.b32 {h0, h1}, w;
        shl.b32 x, t1, 9;
        and.b32 x, x, 0x0E000E00;
        shl.b32 y, t1, 12;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mov.b32 {l2, l3}, w;
        shl.b32 x, t1, 5;
        and.b32 x, x, 0x0E000E00;
        shl.b32 y, t1, 8;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mov.b32 {h2, h3}, w;
        cvt.f32.f16 $0, l0;
        cvt.f32.f16 $1, l1;
        cvt.f32.f16 $2, l2;
        cvt.f32.f16 $3, l3;
        cvt.f32.f16 $4, h0;
        cvt.f32.f16 $5, h1;
        cvt.f32.f16 $6, h2;
        cvt.f32.f16 $7, h3;
        }
        """,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
        args=[packed], dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def _e2m1_bytes_bf16_ptx(packed, scale_lo, scale_hi):
    """(low, high): bf16 E2M1 values of each byte's low and high nibble times the block scale 2^(s - 127), in PTX,
    four bytes at a time. Each code's magnitude bits go to bf16 bits 6-8 and its sign to bit 15 (two codes per
    32-bit register), which is 2^-126 times its value (0.5 the subnormal 2^-127); two bf16x2 multiplies by
    scale_lo = 2^(min(s, 128) - 1) and scale_hi = 2^(max(s, 128) - 128) apply 2^126 * 2^(s - 127). Every product
    is a power of two times at most two significant bits, so exact: the same bits as the float32 decode converted
    to bf16. CUDA sm_90+ (mul.rn.bf16x2)."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t0, t1, x, y, w;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        shl.b32 x, t0, 6;
        and.b32 x, x, 0x01C001C0;
        shl.b32 y, t0, 12;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mul.rn.bf16x2 w, w, $5;
        mul.rn.bf16x2 $0, w, $7;
        shl.b32 x, t1, 6;
        and.b32 x, x, 0x01C001C0;
        shl.b32 y, t1, 12;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mul.rn.bf16x2 w, w, $6;
        mul.rn.bf16x2 $1, w, $8;
        shl.b32 x, t0, 2;
        and.b32 x, x, 0x01C001C0;
        shl.b32 y, t0, 8;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mul.rn.bf16x2 w, w, $5;
        mul.rn.bf16x2 $2, w, $7;
        shl.b32 x, t1, 2;
        and.b32 x, x, 0x01C001C0;
        shl.b32 y, t1, 8;
        and.b32 y, y, 0x80008000;
        or.b32 w, x, y;
        mul.rn.bf16x2 w, w, $6;
        mul.rn.bf16x2 $3, w, $8;
        }
        """,
        constraints="=r,=r,=r,=r,r,r,r,r,r",
        args=[packed, scale_lo, scale_hi], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _e8m0_bf16_pair(s):
    """E8M0 scale bytes -> (2^(min(s, 128) - 1), 2^(max(s, 128) - 128)) as bf16, built in the exponent bits: their
    product is 2^126 * 2^(s - 127), each factor a normal bf16 for every s."""
    s = s.to(tl.uint32)
    lo = ((tl.minimum(s, 128) + 126) << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    hi = ((tl.maximum(s, 128) - 1) << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return lo, hi


@triton.jit
def _e2m1_bytes(packed, PTX: tl.constexpr):
    """(low, high): float32 2^-14 times the E2M1 values of each packed byte's low and high nibble (elements 2j and
    2j + 1 of a row), by the PTX decode (CUDA) or the element-wise float16-bit one."""
    if PTX:
        low, high = _e2m1_bytes_ptx(packed)
    else:
        low, high = _e2m1_to_f16(packed & 15).to(tl.float32), _e2m1_to_f16(packed >> 4).to(tl.float32)
    return low, high


@triton.jit
def _e8m0_times_2p14(s):
    """E8M0 scale bytes -> 2^(s - 127 + 14) in float32 (the float16-bit decode's 2^-14 folded in), built in the
    exponent bits: exact for s <= 240 (s = 0 included: 2^-113 is a normal float32); real scales are far below."""
    return ((s.to(tl.uint32) + 14) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_to_f32(s):
    """E8M0 scale bytes -> 2^(s - 127) (s = 0 is the subnormal 2^-127)."""
    s = s.to(tl.uint32)
    return tl.where(s == 0, 5.877471754111438e-39, (s << 23).to(tl.float32, bitcast=True))


@triton.jit
def _swigluoai(gate, up, alpha, limit):
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    return (up + 1.0) * gate * tl.sigmoid(gate * alpha)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _a_chunk(a_rows, row_ok, k0, k_dim, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr, F32_DOT: tl.constexpr):
    """Activations of a K chunk, [BLOCK_M, BLOCK_K] (dense), or its even and odd columns (MXFP4)."""
    if MXFP4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        m = row_ok[:, None] & (kb < k_dim // 2)[None, :]
        even = tl.load(a_rows + 2 * kb[None, :], mask=m, other=0.0)
        odd = tl.load(a_rows + 2 * kb[None, :] + 1, mask=m, other=0.0)
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        even = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & (kk < k_dim)[None, :], other=0.0)
        odd = even
    if F32_DOT:
        even, odd = even.to(tl.float32), odd.to(tl.float32)
    return even, odd


@triton.jit
def _w_chunk(w_cols, s_cols, n_ok, k0, k_dim, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             MXFP4: tl.constexpr):
    """Weights of a K chunk as dot operands [K, BLOCK_N] (w_cols: pointers to each column n's row start):
    dense, or the decoded even and odd elements (MXFP4: bytes k0/2.. of each row; the chunk's BLOCK_K/32
    scales loaded once and broadcast over their 16 bytes)."""
    if MXFP4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_cols + kb[:, None], mask=(kb < k_dim // 2)[:, None] & n_ok[None, :], other=0)
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        scale = _e8m0_to_f32(tl.load(s_cols + g[:, None], mask=(g < k_dim // 32)[:, None] & n_ok[None, :],
                                     other=127))[:, None, :]
        low = tl.reshape(_e2m1_to_f32(packed & 15), [BLOCK_K // 32, 16, BLOCK_N]) * scale
        high = tl.reshape(_e2m1_to_f32(packed >> 4), [BLOCK_K // 32, 16, BLOCK_N]) * scale
        first = tl.reshape(low, [BLOCK_K // 2, BLOCK_N]).to(dtype)
        second = tl.reshape(high, [BLOCK_K // 2, BLOCK_N]).to(dtype)
    else:  # one return for both branches: Triton (3.6) type-checks every return of a function together
        kk = k0 + tl.arange(0, BLOCK_K)
        first = tl.load(w_cols + kk[:, None], mask=(kk < k_dim)[:, None] & n_ok[None, :], other=0.0).to(dtype)
        second = first
    return first, second


@triton.jit(do_not_specialize=["num_pairs"])  # as moe._expert_gemm_kernel: one compile for every batch
def _expert_gemm_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, w_stride_e, w_stride_n, s_stride_e, s_stride_n,
    bias_stride_e, out_stride, alpha, limit,
    GATED: tl.constexpr, MXFP4: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    """GATED: out[pair] = swigluoai(A W_gate^T + b_gate, A W_up^T + b_up), W_up = rows n_out..;
    else out[pair] = A W^T + b in the activation dtype (moe._sum_topk weights it). A row = pair // a_row_div;
    W the tile's expert's."""
    pdl_wait(PDL)
    tile = tl.program_id(0)
    n_blk = tl.program_id(1)
    expert, pair, past_end = sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
    if past_end:
        return
    row_ok = pair < num_pairs
    a_rows = a_ptr + (pair // a_row_div)[:, None] * a_stride
    n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    w_cols = w_ptr + expert * w_stride_e + n[None, :] * w_stride_n
    s_cols = s_ptr + expert * s_stride_e + n[None, :] * s_stride_n
    dtype = tl.float32 if F32_DOT else a_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        a0, a1 = _a_chunk(a_rows, row_ok, k0, k_dim, BLOCK_K, MXFP4, F32_DOT)
        w0, w1 = _w_chunk(w_cols, s_cols, n_ok, k0, k_dim, dtype, BLOCK_N, BLOCK_K, MXFP4)
        acc = _dot(a0, w0, acc, IEEE)
        if MXFP4:
            acc = _dot(a1, w1, acc, IEEE)
        if GATED:
            u0, u1 = _w_chunk(w_cols + n_out * w_stride_n, s_cols + n_out * s_stride_n, n_ok, k0, k_dim, dtype,
                              BLOCK_N, BLOCK_K, MXFP4)
            acc_up = _dot(a0, u0, acc_up, IEEE)
            if MXFP4:
                acc_up = _dot(a1, u1, acc_up, IEEE)
    out_dtype = a_ptr.dtype.element_ty
    bias = bias_ptr + expert * bias_stride_e + n
    if GATED:
        # round like the reference: projection + bias in the activation dtype, then the activation
        gate = (acc + tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(out_dtype).to(tl.float32)
        up = (acc_up + tl.load(bias + n_out, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(out_dtype)
        acc = _swigluoai(gate, up.to(tl.float32), alpha, limit)
    else:
        acc = (acc + tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(out_dtype)
    tl.store(out_ptr + pair[:, None] * out_stride + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _epilogue(acc, acc_up, bias, bias_up, out_dtype: tl.constexpr, alpha, limit, GATED: tl.constexpr):
    """Projection + bias (float32, broadcast to acc's shape) rounded to the activation dtype; GATED: then the
    clamped SwiGLU of it (acc_up holds the up projection, bias_up its bias), in float32; else returned in the
    activation dtype (the down projection's output, which moe._sum_topk weights)."""
    acc = (acc + bias).to(out_dtype)
    if GATED:
        acc = _swigluoai(acc.to(tl.float32), (acc_up + bias_up).to(out_dtype).to(tl.float32), alpha, limit)
    return acc


@triton.jit
def _store_transposed(acc, acc_up, a_ptr, bias_ptr, out_ptr, expert, bias_stride_e, out_stride, n, n_ok, n_out, pair,
                      row_ok, alpha, limit, GATED: tl.constexpr):
    """The epilogue of the out^T = W A^T kernels (accumulators [BLOCK_N, BLOCK_M]), as _expert_gemm_kernel's
    (_epilogue); out[pair, n] stored."""
    bias = bias_ptr + expert * bias_stride_e + n
    b = tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if GATED:
        acc = _epilogue(acc, acc_up, b, tl.load(bias + n_out, mask=n_ok, other=0.0).to(tl.float32)[:, None],
                        a_ptr.dtype.element_ty, alpha, limit, GATED)
    else:
        acc = _epilogue(acc, acc_up, b, 0.0, a_ptr.dtype.element_ty, alpha, limit, GATED)
    tl.store(out_ptr + pair[None, :] * out_stride + n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & row_ok[None, :])


@triton.jit
def _finish_tile(acc, acc_up, a_ptr, bias_ptr, out_ptr, expert, bias_stride_e, out_stride, n, n_ok, n_out, pair, row_ok,
                 alpha, limit, part_ptr, part_stride_s, part_stride_p, GATED: tl.constexpr, SPLIT_K: tl.constexpr):
    """The end of a regdot program: split over K, its float32 sums (gate, then up: [pair, 2 n_out]) into
    part_ptr[split] for _split_k_finish_kernel (or, the down projection's, _split_k_sum_topk_kernel); whole, the
    epilogue (_store_transposed)."""
    if SPLIT_K > 1:
        part = part_ptr + tl.program_id(2) * part_stride_s + pair[None, :] * part_stride_p + n[:, None]
        part_mask = n_ok[:, None] & row_ok[None, :]
        tl.store(part, acc, mask=part_mask)
        if GATED:
            tl.store(part + n_out, acc_up, mask=part_mask)
    else:
        _store_transposed(acc, acc_up, a_ptr, bias_ptr, out_ptr, expert, bias_stride_e, out_stride, n, n_ok, n_out,
                          pair, row_ok, alpha, limit, GATED)


@triton.jit(do_not_specialize=["num_pairs"])
def _expert_gemm_mx_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, w_stride_e, w_stride_n, s_stride_e, s_stride_n,
    bias_stride_e, out_stride, alpha, limit,
    GATED: tl.constexpr, ACT_FORMAT: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """The MXFP4 grouped GEMM as out^T = W A^T: the expert's packed rows [BLOCK_N, BLOCK_K/2] and their scales
    are the scaled dot's first operand, read in their stored layout (K contiguous) and decoded by the
    compiler's MXFP4 upcast (tl.dot_scaled); the tile's activation rows [BLOCK_K, BLOCK_M] the second. The
    expert's output columns fill the matrix instruction's 64-row side and the tile's tokens its narrow side
    (8..256), so a tile of 16 tokens wastes no weight decode. Same epilogue as _expert_gemm_kernel."""
    pdl_wait(PDL)
    tile = tl.program_id(0)
    n_blk = tl.program_id(1)
    expert, pair, past_end = sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
    if past_end:
        return
    row_ok = pair < num_pairs
    a_cols = a_ptr + (pair // a_row_div)[None, :] * a_stride
    n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    w_rows = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n
    s_rows = s_ptr + expert * s_stride_e + n[:, None] * s_stride_n
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_cols + kk[:, None], mask=(kk < k_dim)[:, None] & row_ok[None, :], other=0.0)
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        w_mask = n_ok[:, None] & (kb < k_dim // 2)[None, :]
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s_mask = n_ok[:, None] & (g < k_dim // 32)[None, :]
        w = tl.load(w_rows + kb[None, :], mask=w_mask, other=0)
        s = tl.load(s_rows + g[None, :], mask=s_mask, other=127)
        acc = tl.dot_scaled(w, s, "e2m1", a, None, ACT_FORMAT, acc)
        if GATED:
            u = tl.load(w_rows + n_out * w_stride_n + kb[None, :], mask=w_mask, other=0)
            su = tl.load(s_rows + n_out * s_stride_n + g[None, :], mask=s_mask, other=127)
            acc_up = tl.dot_scaled(u, su, "e2m1", a, None, ACT_FORMAT, acc_up)
    _store_transposed(acc, acc_up, a_ptr, bias_ptr, out_ptr, expert, bias_stride_e, out_stride, n, n_ok, n_out, pair,
                      row_ok, alpha, limit, GATED)


@triton.jit
def _mx_decode_chunk(packed, scale_bytes, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DECODE: tl.constexpr):
    """A K chunk of packed MXFP4 rows [BLOCK_N, BLOCK_K/2] and their E8M0 scales [BLOCK_N, BLOCK_K/32] -> (low,
    high) [BLOCK_N, BLOCK_K/2] in dtype: the scaled elements 2j and 2j + 1 of each row (exact). DECODE: "f32"
    (element-wise float16-bit decode, scaled in float32), "ptx" (the same values by _e2m1_bytes_ptx) or "bf16"
    (_e2m1_bytes_bf16_ptx: bf16 values scaled by bf16x2 multiplies)."""
    if DECODE == "bf16":
        scale_lo, scale_hi = _e8m0_bf16_pair(scale_bytes)
        low, high = _e2m1_bytes_bf16_ptx(
            tl.reshape(packed, [BLOCK_N, BLOCK_K // 32, 16]),
            tl.broadcast_to(scale_lo[:, :, None], [BLOCK_N, BLOCK_K // 32, 16]),
            tl.broadcast_to(scale_hi[:, :, None], [BLOCK_N, BLOCK_K // 32, 16]))
        low = tl.reshape(low, [BLOCK_N, BLOCK_K // 2])
        high = tl.reshape(high, [BLOCK_N, BLOCK_K // 2])
    else:
        low, high = _e2m1_bytes(packed, DECODE == "ptx")
        scale = _e8m0_times_2p14(scale_bytes)[:, :, None]
        low = tl.reshape(tl.reshape(low, [BLOCK_N, BLOCK_K // 32, 16]) * scale, [BLOCK_N, BLOCK_K // 2]).to(dtype)
        high = tl.reshape(tl.reshape(high, [BLOCK_N, BLOCK_K // 32, 16]) * scale, [BLOCK_N, BLOCK_K // 2]).to(dtype)
    return low, high


@triton.jit(do_not_specialize=["num_pairs"])
def _expert_gemm_mxr_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, w_stride_e, w_stride_n, s_stride_e, s_stride_n,
    bias_stride_e, out_stride, alpha, limit, part_ptr, part_stride_s, part_stride_p,
    GATED: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr, DECODE: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):
    """The MXFP4 grouped GEMM as out^T = W A^T with the weights decoded in registers as the first operand (on
    Hopper the matrix instruction's A may come from registers, so the decoded tile needs no trip through shared
    memory): per K step the expert's packed rows [BLOCK_N, BLOCK_K/2] become two scaled operands in the activation
    dtype (low nibbles: elements 2j, high: 2j + 1; the float16-bit decode times 2^(s - 127 + 14), exact), dotted
    with the tile's even and odd activation columns [BLOCK_K/2, BLOCK_M] into one float32 accumulator over all
    of K. DECODE: "f32" (the element-wise float16-bit decode, scaled in float32 and converted), "ptx" (the same
    values by _e2m1_bytes_ptx) or "bf16" (_e2m1_bytes_bf16_ptx: bf16 weights scaled by bf16x2 multiplies; bf16
    activations). Same epilogue as _expert_gemm_kernel. SPLIT_K > 1: program_id(2) takes one of SPLIT_K ranges of
    K steps and stores its float32 sums (gate, then up: [pair, 2 n_out]) into part_ptr[split]; _split_k_finish_kernel
    adds them in a fixed order and applies the epilogue. That is for batches whose tiles are too few to fill the
    GPU, such as every token routed to the same few experts."""
    pdl_wait(PDL)
    tile = tl.program_id(0)
    n_blk = tl.program_id(1)
    expert, pair, past_end = sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
    if past_end:
        return
    row_ok = pair < num_pairs
    a_cols = a_ptr + (pair // a_row_div)[None, :] * a_stride
    n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    w_rows = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n
    s_rows = s_ptr + expert * s_stride_e + n[:, None] * s_stride_n
    dtype = tl.float32 if F32_DOT else a_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    k_begin = 0
    k_end = k_dim
    if SPLIT_K > 1:
        split = tl.program_id(2)
        k_span = tl.cdiv(tl.cdiv(k_dim, BLOCK_K), SPLIT_K) * BLOCK_K
        k_begin = split * k_span
        k_end = tl.minimum(k_dim, k_begin + k_span)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        kb_ok = kb < k_dim // 2
        a_mask = kb_ok[:, None] & row_ok[None, :]
        a_even = tl.load(a_cols + (2 * kb)[:, None], mask=a_mask, other=0.0).to(dtype)
        a_odd = tl.load(a_cols + (2 * kb + 1)[:, None], mask=a_mask, other=0.0).to(dtype)
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        w_mask = n_ok[:, None] & kb_ok[None, :]
        s_mask = n_ok[:, None] & (g < k_dim // 32)[None, :]
        for up in tl.static_range(2 if GATED else 1):
            packed = tl.load(w_rows + up * n_out * w_stride_n + kb[None, :], mask=w_mask, other=0)
            scale_bytes = tl.load(s_rows + up * n_out * s_stride_n + g[None, :], mask=s_mask, other=127)
            low, high = _mx_decode_chunk(packed, scale_bytes, dtype, BLOCK_N, BLOCK_K, DECODE)
            if up == 0:
                acc = tl.dot(low, a_even, acc)
                acc = tl.dot(high, a_odd, acc)
            else:
                acc_up = tl.dot(low, a_even, acc_up)
                acc_up = tl.dot(high, a_odd, acc_up)
    _finish_tile(acc, acc_up, a_ptr, bias_ptr, out_ptr, expert, bias_stride_e, out_stride, n, n_ok, n_out, pair, row_ok,
                 alpha, limit, part_ptr, part_stride_s, part_stride_p, GATED, SPLIT_K)


# ---------------------------------------------------------------- regdot on the fragment order (ATOM_MX_FRAG)
@triton.jit
def _frag_decode_ptx(codes, s0, s1):
    """(lo, hi) bf16 [..., 4]: a fragment-order word (4 bytes, atom.ops.mxfp4's FRAG_BITS) -> its four bf16x2
    registers, lo = (r0 lo cols, r1 lo cols) and hi = (r0 hi cols, r1 hi cols), times the block scale: each
    register is a mask (and a rotate, or a multiply that places three shifted copies) of the word, 2^-126 times
    the codes' values, then one bf16x2 multiply by s0 (row r0's (2^(s - 1), 2^(s - 1))) or s1 (row r1's). Exact,
    as _e2m1_bytes_bf16_ptx. s0, s1: int32 bf16x2 bits, the same for the word's four elements. CUDA sm_90+."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t;
        and.b32 t, $4, 0x81C081C0;
        mul.rn.bf16x2 $0, t, $5;
        shf.l.wrap.b32 t, $4, $4, 10;
        and.b32 t, t, 0x81C081C0;
        mul.rn.bf16x2 $1, t, $9;
        shf.l.wrap.b32 t, $4, $4, 13;
        and.b32 t, t, 0x81C081C0;
        mul.rn.bf16x2 $2, t, $5;
        and.b32 t, $4, 0x001B001B;
        mul.lo.u32 t, t, 0x1084;
        and.b32 t, t, 0x81C081C0;
        mul.rn.bf16x2 $3, t, $9;
        }
        """,
        constraints="=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
        args=[codes, s0, s1], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _frag_registers(r0, r1, f0, f1):
    """Two bf16x2 registers (uint32 bits of 2^-126 times two values each; rows r0 and r1) -> float32 [..., 4]
    (r0 low half, r0 high half, r1 low, r1 high) times the rows' scales f0 / f1: the element order of
    _frag_decode_ptx's outputs."""
    a = tl.join(((r0 & 0xFFFF) << 16).to(tl.float32, bitcast=True) * f0,
                (r0 & 0xFFFF0000).to(tl.float32, bitcast=True) * f0)
    b = tl.join(((r1 & 0xFFFF) << 16).to(tl.float32, bitcast=True) * f1,
                (r1 & 0xFFFF0000).to(tl.float32, bitcast=True) * f1)
    v = tl.permute(tl.join(a, b), (0, 1, 3, 2))
    return tl.reshape(v, [v.shape[0], v.shape[1], 4])


@triton.jit
def _frag_decode_tl(codes, s0, s1):
    """_frag_decode_ptx's values in float32, by Triton integer ops (the interpreter, GPUs without the PTX): codes
    uint8 [128, 8, 4], s0 / s1 uint32 [128, 8] (bf16x2 scale bits per word)."""
    w = tl.sum(codes.to(tl.uint32) << (tl.arange(0, 4) * 8).to(tl.uint32)[None, None, :], axis=2)
    m = 0x81C081C0
    r0 = w & m
    r1 = ((w << 10) | (w >> 22)) & m
    r2 = ((w << 13) | (w >> 19)) & m
    r3 = ((w & 0x001B001B) * 0x1084) & m
    f0 = ((s0 & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    f1 = ((s1 & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    return _frag_registers(r0, r1, f0, f1), _frag_registers(r2, r3, f0, f1)


_FRAG_HALF = tl.constexpr(FRAG_HALF_BYTES)  # a jit function reads module globals only as constexprs


@triton.jit
def _frag_offsets(CODE_BYTES: tl.constexpr, WORDS_SPLIT: tl.constexpr):
    """(woff, soff) of a fragment-order step: thread t's first 16 code bytes and its row pair's 8 scale bytes.
    WORDS_SPLIT (pack_fragments' default): the first 16 at 16 t, the last 16 at 2,048 + 16 t (_frag_tile), so a
    warp's 16-byte copy reads 512 contiguous bytes; else at 32 t and 32 t + 16 (stop 41-43's layout: each copy
    used half of every 32-byte sector it fetched)."""
    t = tl.arange(0, 128)
    woff = t[:, None] * (16 if WORDS_SPLIT else 32) + tl.arange(0, 16)[None, :]
    soff = CODE_BYTES + (t // 4)[:, None] * 8 + tl.arange(0, 8)[None, :]
    return woff, soff


@triton.jit
def _frag_tile(step_ptr, woff, soff, dtype: tl.constexpr, PTX: tl.constexpr, WORDS_SPLIT: tl.constexpr):
    """One fragment-order step (atom.ops.mxfp4.pack_fragments) -> the logical [64, 128] weight tile in dtype,
    scaled. Thread t reads its own 32 code bytes (two 16-byte loads: words 0-3 at woff, 4-7 2,048 bytes on,
    or 16 without WORDS_SPLIT: _frag_offsets) and its row pair's 8 scale bytes; the
    reshape / permute chain from (thread = (w, g, c), word j, element (e1, e0), half h) to row 16 w + 8 e1 + g and
    column 16 j + 8 h + 2 c + e0 is a relabelling of registers, so on Hopper the decoded registers feed the
    matrix instruction as they are."""
    if WORDS_SPLIT:
        last = tl.load(step_ptr + _FRAG_HALF + woff)
    else:
        last = tl.load(step_ptr + 16 + woff)
    codes = tl.join(tl.load(step_ptr + woff), last)  # [128, 16, 2]
    codes = tl.reshape(tl.permute(codes, (0, 2, 1)), [128, 8, 4])  # word j = bytes 4 j .. 4 j + 3
    pairs = tl.load(step_ptr + soff).to(tl.uint32) * 0x00800080  # [128, 8]: (block b, row r) at 2 b + r
    s0, s1 = tl.split(tl.reshape(pairs, [128, 4, 2]))
    s0 = tl.reshape(tl.broadcast_to(s0[:, :, None], [128, 4, 2]), [128, 8])  # word j lies in block j // 2
    s1 = tl.reshape(tl.broadcast_to(s1[:, :, None], [128, 4, 2]), [128, 8])
    if PTX:
        lo, hi = _frag_decode_ptx(codes, tl.broadcast_to(s0.to(tl.int32, bitcast=True)[:, :, None], [128, 8, 4]),
                                  tl.broadcast_to(s1.to(tl.int32, bitcast=True)[:, :, None], [128, 8, 4]))
    else:
        lo, hi = _frag_decode_tl(codes, s0, s1)
    v = tl.reshape(tl.join(lo, hi), [4, 8, 4, 8, 2, 2, 2])  # w g c j e1 e0 h
    return tl.reshape(tl.permute(v, (0, 4, 1, 3, 6, 2, 5)), [64, 128]).to(dtype)


# up_tiles: Triton passes an int argument equal to 1 as a constant (a model with one 64-row tile of up rows,
# found on the GPU), which has no .to(); the down GEMM passes 0
@triton.jit(do_not_specialize=["num_pairs", "up_tiles"])
def _expert_gemm_mxf_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, sorted_ids_ptr, padded_end_ptr,
    n_out, k_dim, num_pairs, num_experts, a_row_div, a_stride, w_stride_e, up_tiles, steps,
    bias_stride_e, out_stride, alpha, limit, part_ptr, part_stride_s, part_stride_p,
    GATED: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr,
    PTX: tl.constexpr, STEP_BYTES: tl.constexpr, CODE_BYTES: tl.constexpr, SPLIT_K: tl.constexpr,
    PER_PAIR: tl.constexpr, PDL: tl.constexpr, WORDS_SPLIT: tl.constexpr = True,
):
    """regdot (_expert_gemm_mxr_kernel) on the fragment order: out^T = W A^T for 64 weight rows (one warpgroup's
    matrix instruction, one tile of the copy) and BLOCK_M pairs, K in steps of 128. Each step reads the tile's
    4,096 code bytes and 256 scale bytes in one piece, decodes them with ~1.5 instructions a weight
    (_frag_tile) and dots them with the step's activations, K in its natural order (no even / odd split). The
    gated matrix's up rows are tile up_tiles + n_blk. SPLIT_K and the epilogue as regdot's. IEEE: exact float32
    dots (float32 activations; bf16 / fp16 ones are exact in any case). PER_PAIR (a token's few pairs, all on
    distinct experts): no sort, program_id(0) is the pair and sorted_ids_ptr holds the pairs' expert ids; the
    tile's other rows are masked (the matrix instruction's narrow side costs nothing next to the decode)."""
    pdl_wait(PDL)
    tile = tl.program_id(0)
    n_blk = tl.program_id(1)
    if PER_PAIR:
        expert = tl.load(sorted_ids_ptr + tile).to(tl.int64)
        if expert < 0:  # another rank's expert: no rows
            return
        pair = tile + tl.zeros([BLOCK_M], tl.int64)
        row_ok = tl.arange(0, BLOCK_M) == 0
    else:
        expert, pair, past_end = sorted_tile(sorted_ids_ptr, padded_end_ptr, num_experts, tile, E_PAD, BLOCK_M)
        if past_end:
            return
        row_ok = pair < num_pairs
    a_cols = a_ptr + (pair // a_row_div)[None, :] * a_stride
    n = n_blk * 64 + tl.arange(0, 64)
    n_ok = n < n_out
    woff, soff = _frag_offsets(CODE_BYTES, WORDS_SPLIT)
    w_tile = w_ptr + expert * w_stride_e + n_blk.to(tl.int64) * steps * STEP_BYTES
    up_offset = up_tiles.to(tl.int64) * steps * STEP_BYTES
    dtype = tl.float32 if F32_DOT else a_ptr.dtype.element_ty
    acc = tl.zeros([64, BLOCK_M], tl.float32)
    acc_up = tl.zeros([64, BLOCK_M], tl.float32)
    s_begin = 0
    s_end = steps
    if SPLIT_K > 1:
        span = tl.cdiv(steps, SPLIT_K)
        s_begin = tl.program_id(2) * span
        s_end = tl.minimum(steps, s_begin + span)
    for s in range(s_begin, s_end):
        k = s * 128 + tl.arange(0, 128)
        a = tl.load(a_cols + k[:, None], mask=(k < k_dim)[:, None] & row_ok[None, :], other=0.0).to(dtype)
        step = w_tile + s * STEP_BYTES
        acc = _dot(_frag_tile(step, woff, soff, dtype, PTX, WORDS_SPLIT), a, acc, IEEE)
        if GATED:
            acc_up = _dot(_frag_tile(step + up_offset, woff, soff, dtype, PTX, WORDS_SPLIT), a, acc_up, IEEE)
    _finish_tile(acc, acc_up, a_ptr, bias_ptr, out_ptr, expert, bias_stride_e, out_stride, n, n_ok, n_out, pair, row_ok,
                 alpha, limit, part_ptr, part_stride_s, part_stride_p, GATED, SPLIT_K)


@triton.jit
def _mx_frag_dequant_kernel(frag_ptr, out_ptr, n_rows, k_dim, tiles, halves_tiles, steps, out_stride_e,
                            out_stride_n, STEP_BYTES: tl.constexpr, CODE_BYTES: tl.constexpr, PTX: tl.constexpr,
                            PDL: tl.constexpr):
    """One fragment-order step (64 rows x 128 columns of one expert's matrix) -> its dense values in out's dtype;
    grid (experts x halves x tiles, steps). Rows of the second half land at n_rows + row."""
    pdl_wait(PDL)
    pid = tl.program_id(0)
    s = tl.program_id(1)
    expert = pid // halves_tiles
    half = (pid % halves_tiles) // tiles
    tile = pid % tiles
    woff, soff = _frag_offsets(CODE_BYTES, True)
    step = frag_ptr + (pid.to(tl.int64) * steps + s) * STEP_BYTES
    w = _frag_tile(step, woff, soff, out_ptr.dtype.element_ty, PTX, True)
    rows = tile * 64 + tl.arange(0, 64)
    cols = s * 128 + tl.arange(0, 128)
    out = out_ptr + expert.to(tl.int64) * out_stride_e + (half * n_rows + rows)[:, None] * out_stride_n + cols[None, :]
    tl.store(out, w, mask=(rows < n_rows)[:, None] & (cols < k_dim)[None, :])


def mxfp4_frag_dequantize(frag: torch.Tensor, rows: int, cols: int, halves: int, dtype: torch.dtype) -> torch.Tensor:
    """Fragment-order experts (atom.ops.mxfp4.pack_fragments) of `halves` x [rows, cols] -> dense [E, halves *
    rows, cols] in dtype (a fresh tensor), by the integer decode (_frag_decode_tl), not the PTX one: the
    PTX decode (inline asm, pack=4) takes a thread's 4 consecutive registers as one word's 4 bytes, which holds where
    the tile feeds a dot but not where it is stored: on the H200 (2026-12-05) its bf16 output here was wrong
    (relative error 0.96-2.0; PTX against integer decode 1,352-1,460 apart at 1,024 tokens), while the integer
    decode's float32 output was exact; the GEMM kernel's PTX decode gave the integer decode's bits at 1-128 tokens."""
    experts, halves_tiles, steps, _ = frag.shape
    out = torch.empty(experts, halves * rows, cols, dtype=dtype, device=frag.device)
    _mx_frag_dequant_kernel[(experts * halves_tiles, steps)](
        frag, out, rows, cols, halves_tiles // halves, halves_tiles, steps, out.stride(0), out.stride(1),
        STEP_BYTES=FRAG_STEP_BYTES, CODE_BYTES=FRAG_CODE_BYTES, PTX=False, num_warps=4,
        **pdl_args(frag.device))
    return out


@triton.jit
def _sum_splits(rows, part_stride_s, n_ok, SPLIT_K: tl.constexpr):
    """The SPLIT_K float32 partial sums of rows, added in split order (the same bits every run)."""
    acc = tl.load(rows, mask=n_ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(rows + s * part_stride_s, mask=n_ok, other=0.0)
    return acc


@triton.jit
def _split_k_finish_kernel(part_ptr, a_ptr, bias_ptr, out_ptr, ids_ptr, n_out, part_stride_s, part_stride_p,
                           bias_stride_e, out_stride, alpha, limit, GATED: tl.constexpr, SPLIT_K: tl.constexpr,
                           BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The split-K regdot's epilogue for one pair and BLOCK columns: its SPLIT_K float32 partial sums added in split
    order (_sum_splits), then _epilogue (the activation dtype is a_ptr's)."""
    pdl_wait(PDL)
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    if expert < 0:  # a pair of id -1 (another rank's expert) has no rows: nothing reads its output
        return
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < n_out
    rows = part_ptr + pair * part_stride_p + n
    bias = bias_ptr + expert * bias_stride_e + n
    acc = _sum_splits(rows, part_stride_s, n_ok, SPLIT_K)
    b = tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)
    if GATED:
        acc = _epilogue(acc, _sum_splits(rows + n_out, part_stride_s, n_ok, SPLIT_K),
                        b, tl.load(bias + n_out, mask=n_ok, other=0.0).to(tl.float32), a_ptr.dtype.element_ty,
                        alpha, limit, GATED)
    else:
        acc = _epilogue(acc, acc, b, 0.0, a_ptr.dtype.element_ty, alpha, limit, GATED)
    tl.store(out_ptr + pair * out_stride + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _split_k_sum_topk_kernel(part_ptr, bias_ptr, ids_ptr, w_ptr, out_ptr, n_out, part_stride_s,
                             part_stride_p, bias_stride_e, out_stride, TOP_K: tl.constexpr, SPLIT_K: tl.constexpr,
                             BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The split-K down projection's end and the top-k sum in one kernel, for one token and BLOCK columns: each of
    its pairs' SPLIT_K float32 partial sums added in split order plus the expert's bias, rounded to the activation
    dtype (out's: the down projection's rounding, as _split_k_finish_kernel stores it), weighted in float32 and
    added in k order (moe._sum_topk_kernel's arithmetic, 1-D rows in registers instead of a cross-warp reduction:
    compile without FP contraction). Pairs of id -1 contribute nothing."""
    pdl_wait(PDL)
    t, n, n_ok = token_columns(n_out, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(TOP_K):
        pair = t * TOP_K + k
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        m = n_ok & ((tl.zeros([BLOCK], tl.int64) + expert) >= 0)
        row = part_ptr + pair * part_stride_p + n
        part = tl.load(row, mask=m, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            part += tl.load(row + s * part_stride_s, mask=m, other=0.0)
        bias = tl.load(bias_ptr + expert * bias_stride_e + n, mask=m, other=0.0).to(tl.float32)
        y = (part + bias).to(out_ptr.dtype.element_ty).to(tl.float32)
        acc += y * tl.load(w_ptr + pair)
    tl.store(out_ptr + t * out_stride + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemv_chunk(x_ptr, w_rows, s_rows, n_ok, k0, k_dim, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr,
                PTX: tl.constexpr):
    """Products W[n, k] * x[k] of a K chunk in float32: [BLOCK_N, BLOCK_K] (dense), or [BLOCK_N, BLOCK_K/32]
    for MXFP4, each the sum over one 32-element block times its scale (scaling by a power of two after the
    sum is exact); w_rows: pointers to each row n's start.

    MXFP4 codes are decoded through float16 bits (_e2m1_to_f16: values 2^-14 times the codes', the factor
    restored with the block's scale): on the H200 (kernel_bench.py --gpt-oss-only, 2026-12-02) this took the
    gpt-oss-20b experts at one token from 98.8 to 61.7 us a layer and at four tokens from 319.7 to 174.8 us
    against _e2m1_to_f32's bit building (same results, bit for bit); the GEMV is bound by its decode
    instructions, not by the 53 MB it reads."""
    if MXFP4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ok = kb < k_dim // 2
        packed = tl.load(w_rows + kb[None, :], mask=n_ok[:, None] & ok[None, :], other=0)
        x_even = tl.load(x_ptr + 2 * kb, mask=ok, other=0.0).to(tl.float32)[None, :]
        x_odd = tl.load(x_ptr + 2 * kb + 1, mask=ok, other=0.0).to(tl.float32)[None, :]
        low, high = _e2m1_bytes(packed, PTX)
        prod = low * x_even + high * x_odd
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        scale = _e8m0_to_f32(tl.load(s_rows + g[None, :], mask=n_ok[:, None] & (g < k_dim // 32)[None, :],
                                     other=127))
        out = (tl.sum(tl.reshape(prod, [prod.shape[0], BLOCK_K // 32, 16]), axis=2) * 16384.0) * scale
    else:  # one return for both branches (see _w_chunk)
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = kk < k_dim
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
        out = w * tl.load(x_ptr + kk, mask=ok, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def _pair_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ids_ptr, n_out, k_dim, x_row_div, x_stride, w_stride_e,
                 w_stride_n, s_stride_e, s_stride_n, bias_stride_e, out_stride, alpha, limit,
                 GATED: tl.constexpr, MXFP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ACC_K: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr):
    """Decode: one GEMV per (pair, n block) on the pair's expert. GATED: h[pair] = swigluoai(gate, up) of
    x[pair // x_row_div]; else y[pair] = h[pair] W2^T + b2 in h's dtype (moe._sum_topk weights it)."""
    pdl_wait(PDL)
    pair = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // x_row_div) * x_stride
    w_rows = w_ptr + expert * w_stride_e + n[:, None] * w_stride_n
    s_rows = s_ptr + expert * s_stride_e + n[:, None] * s_stride_n
    acc = tl.zeros([BLOCK_N, ACC_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, ACC_K], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        acc += _gemv_chunk(x_row, w_rows, s_rows, n_ok, k0, k_dim, BLOCK_K, MXFP4, PTX)
        if GATED:
            acc_up += _gemv_chunk(x_row, w_rows + n_out * w_stride_n, s_rows + n_out * s_stride_n, n_ok, k0, k_dim,
                                  BLOCK_K, MXFP4, PTX)
    dtype = x_ptr.dtype.element_ty
    bias = bias_ptr + expert * bias_stride_e + n
    y = (tl.sum(acc, axis=1) + tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)).to(dtype)
    if GATED:
        up = (tl.sum(acc_up, axis=1) + tl.load(bias + n_out, mask=n_ok, other=0.0).to(tl.float32)).to(dtype)
        y = _swigluoai(y.to(tl.float32), up.to(tl.float32), alpha, limit)
    tl.store(out_ptr + pair * out_stride + n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _mx_dequant_kernel(w_ptr, s_ptr, out_ptr, n_rows, k_dim, w_stride_e, w_stride_n, s_stride_e, s_stride_n,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """out[e, r, k] = E2M1(code) * 2^(scale - 127), written in out's dtype (contiguous [E, n_rows, k_dim]); the
    packed rows' byte j holds elements 2j (low nibble) and 2j + 1 (high nibble). Exact wherever the value is
    representable in out's dtype (bf16: every E8M0 scale but the top two)."""
    pdl_wait(PDL)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    g = tl.program_id(1) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    e = tl.program_id(2).to(tl.int64)
    r_ok = r < n_rows
    rows = r.to(tl.int64)[:, None]
    packed = tl.load(w_ptr + e * w_stride_e + rows * w_stride_n + kb[None, :],
                     mask=r_ok[:, None] & (kb < k_dim // 2)[None, :], other=0)
    scale = _e8m0_to_f32(tl.load(s_ptr + e * s_stride_e + rows * s_stride_n + g[None, :],
                                 mask=r_ok[:, None] & (g < k_dim // 32)[None, :], other=127))[:, :, None]
    low, high = _e2m1_bytes(packed, False)  # 2^-14 times the values: 2^14 restored first, the exact E2M1 values
    low = tl.reshape(low * 16384.0, [BLOCK_R, BLOCK_K // 32, 16]) * scale
    high = tl.reshape(high * 16384.0, [BLOCK_R, BLOCK_K // 32, 16]) * scale
    both = tl.join(tl.reshape(low, [BLOCK_R, BLOCK_K // 2]), tl.reshape(high, [BLOCK_R, BLOCK_K // 2]))
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + (e * n_rows + rows) * k_dim + k[None, :],
             tl.reshape(both, [BLOCK_R, BLOCK_K]).to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & (k < k_dim)[None, :])


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, N, K/2] packed E2M1 codes + [E, N, K/32] E8M0 scales -> [E, N, K] in dtype (a fresh tensor)."""
    num_experts, n_rows, half_k = blocks.shape
    k_dim = 2 * half_k
    out = torch.empty(num_experts, n_rows, k_dim, dtype=dtype, device=blocks.device)
    block_r, block_k = 16, 256
    _mx_dequant_kernel[(triton.cdiv(n_rows, block_r), triton.cdiv(k_dim, block_k), num_experts)](
        blocks, scales, out, n_rows, k_dim, blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4, **pdl_args(blocks.device))
    return out


def _check_shapes(x, w13, w2, w13_bias, w2_bias, w13_scale, w2_scale, mxfp4: bool, w13_frag=None,
                  w2_frag=None) -> tuple[int, int]:
    """(hidden, inter) after checking every operand against them."""
    num_experts, two_i = w13_bias.shape[:2]
    inter = two_i // 2
    hidden = x.shape[1]
    packing = 2 if mxfp4 else 1
    expect = {"w13_bias": (w13_bias, (num_experts, two_i)), "w2_bias": (w2_bias, (num_experts, hidden))}
    if w13_frag is None or w13.numel() or w2.numel():  # the fragments alone: the checkpoint layout was dropped
        expect["w13"] = (w13, (num_experts, two_i, hidden // packing))
        expect["w2"] = (w2, (num_experts, hidden, inter // packing))
        if mxfp4:
            expect["w13_scale"] = (w13_scale, (num_experts, two_i, hidden // 32))
            expect["w2_scale"] = (w2_scale, (num_experts, hidden, inter // 32))
    for name, frag, halves, rows, cols in (("w13_frag", w13_frag, 2, inter, hidden),
                                           ("w2_frag", w2_frag, 1, hidden, inter)):
        if frag is not None:
            tiles, steps = -(-rows // FRAG_ROWS), -(-cols // FRAG_COLS)
            expect[name] = (frag, (num_experts, halves * tiles, steps, FRAG_STEP_BYTES))
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape or t.stride(-1) != 1:
            raise ValueError(f"fused_experts_swigluoai: {name} is {tuple(t.shape)} (strides {t.stride()}), "
                             f"expected {shape} with a contiguous last dim")
    return hidden, inter


_ACT_FORMAT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _ptx_decode(x: torch.Tensor) -> bool:
    """Whether the MXFP4 kernels decode with inline PTX (ATOM_MX_PTX, CUDA only, never under the interpreter)."""
    return MX_PTX and x.is_cuda and torch.version.hip is None and not interpreting()


@functools.cache
def _has_bf16x2_mul(device_index: int | None) -> bool:
    """mul.rn.bf16x2 (regdot's bf16 decode) needs sm_90 or newer; Ampere takes the float32 PTX decode."""
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def fragments_for(w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The fragment-order copies of a layer's MXFP4 experts (w13 gate / up halves, w2), or (None, None):
    with ATOM_MX_FRAG=1 for a bf16 model (dtype: its activations; the PTX decode builds bf16, and float32's exact
    dots spill at these tiles) on NVIDIA sm_90+ (the decode's bf16x2 multiply) or under the interpreter, when every
    scale fits the single multiply (E8M0 <= 128, i.e. 2^1)."""
    if not MX_FRAG or w13.numel() == 0 or dtype != torch.bfloat16:
        return None, None
    if not interpreting() and not (w13.is_cuda and torch.version.hip is None and _has_bf16x2_mul(w13.device.index)):
        return None, None
    if max(int(s13.max()), int(s2.max())) > FRAG_MAX_SCALE:
        _warn_once(f"ATOM_MX_FRAG: E8M0 scales above {FRAG_MAX_SCALE} (2^1) in GPT-OSS experts: those layers keep "
                   "reading the checkpoint layout")
        return None, None
    return pack_fragments(w13, s13, halves=2), pack_fragments(w2, s2)


def regdot_decode(x: torch.Tensor) -> str:
    """regdot's decode for activations x: "bf16" (PTX, bf16x2 scaling: bf16 activations on sm_90+, unless
    ATOM_MX_REGDOT_BF16=0), "ptx" (the float32 PTX decode, other CUDA cases) or "f32" (element-wise)."""
    if not _ptx_decode(x):
        return "f32"
    bf16 = MX_REGDOT_BF16 and x.dtype == torch.bfloat16 and _has_bf16x2_mul(x.device.index)
    return "bf16" if bf16 else "ptx"


def experts_path(dtype: torch.dtype, mxfp4: bool, num_pairs: int, ptx: bool = False) -> str:
    """Which kernels fused_experts_swigluoai runs: "dequant" (MXFP4 dequantized, then the dense grouped GEMM),
    "mx_gemm" (MX_GEMM's MXFP4 grouped kernel), "per_pair" (the GEMVs) or "grouped" (_expert_gemm_kernel).
    ptx: the MXFP4 kernels decode with inline PTX (_ptx_decode), which moves the GEMV's limit."""
    if mxfp4 and 0 < MX_DEQUANT_MIN_PAIRS <= num_pairs:
        return "dequant"
    gemv_max = MX_PTX_GEMV_MAX_PAIRS if mxfp4 and ptx else PAIR_GEMV_MAX_PAIRS
    gemm_min = gemv_max + 1 if MX_GEMM_MIN_PAIRS is None else MX_GEMM_MIN_PAIRS
    if mxfp4 and MXFP4_SCALED_DOT and dtype in _ACT_FORMAT and num_pairs >= gemm_min:
        return "mx_gemm"
    return "per_pair" if num_pairs <= gemv_max else "grouped"


def _mx_pair_tile(num_tokens: int) -> dict:
    """Tiles of the MXFP4 per-pair GEMV. H200, gpt-oss-20b experts at one token (kernel_bench.py
    --gpt-oss-only, 2026-12-02): 8 gate / 16 down columns a program with K steps of 512 / 256 took 98.8 us a
    layer against 121.6 for moe._pair_tile's [16 / 64, 256 / 128] and 111.8 for [32 / 32, 256 / 256, 8 warps]:
    the decode is the bottleneck, so more programs (more SMs decoding) win; with the float16-bit decode the same
    tile took 61.7 us (the others 62.4-66.8). At four tokens moe._pair_tile's [16 / 32, 256] won (174.8 us against
    181.8-206.6), as for every other size."""
    if num_tokens == 1:
        return dict(gate_block_n=8, down_block_n=16, block_k=512, down_block_k=256, num_warps=4)
    return _pair_tile(num_tokens)


def _mx_tile(num_pairs: int, num_experts: int, kernel: str) -> dict:
    """Tiles of the MXFP4 grouped GEMMs (kernel: MX_GEMM): block_m tokens (the padding unit of the expert sort),
    block_n expert output columns, block_k the K step in elements."""
    if MX_TILE_OVERRIDE is not None:
        return MX_TILE_OVERRIDE
    per_expert = num_pairs / max(num_experts, 1)
    if kernel == "regdot":
        # H200 sweep of the bf16 decode (mx_paths_bench.py --sweep, 2026-12-02, 32 experts, top-4, us a layer):
        # [16, 64] won at 1 and 4 pairs an expert (8 tokens 236 against 283-684; 32 tokens 336 against 396-1,009),
        # [32, 64] at 16 (128 tokens: 441 against 462 for [32, 128] and 483 for [16, 64]), [32, 128] at 64 (512
        # tokens: 1,003 against 1,035-1,654); 8 warps, K steps of 64 or 256 lost everywhere. From 85 pairs an
        # expert the dequantized path takes over (MX_DEQUANT_MIN_PAIRS) for gpt-oss's 32 experts.
        if per_expert <= 8:
            return dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
        if per_expert <= 16:
            return dict(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=3)
        return dict(block_m=32, block_n=128, block_k=128, num_warps=4, num_stages=3)
    # scaled-dot, H200 sweep (kernel_bench.py --gpt-oss-only, 2026-12-02, 32 experts, top-4): [16 tokens, 64
    # columns] won at 4 pairs an expert (32 tokens: 620 us; [32, 128] 756), [32, 128] at 16 and 128 (128 tokens: 770
    # against 937 for [16, 64]; 1,024 tokens: 3,213 against 3,351-7,296 for the other five tiles); 8 warps and K
    # steps of 256 lost everywhere (second sweep, same day: at 128 pairs an expert [64, 128] took 2,969 us against
    # 3,193 for [32, 128])
    if per_expert <= 8:
        return dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return dict(block_m=32, block_n=128, block_k=128, num_warps=4, num_stages=3)
    return dict(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)


def _mx_split_k(num_tokens: int, kernel: str, frag: bool = False) -> int:
    """How many K ranges regdot splits its GEMMs into (MX_SPLIT_K; "auto": by the batch's tokens, the fragment
    kernel by its own rule)."""
    if kernel != "regdot":
        return 1
    auto = MX_FRAG_SPLIT_K_RULE if frag else MX_SPLIT_K_RULE
    rule = _split_rule(auto if MX_SPLIT_K == "auto" else MX_SPLIT_K)
    return next(split for max_tokens, split in rule if num_tokens <= max_tokens)


def _mx_experts(x, w13, w2, s13, s2, b13, b2, weights, topk_ids, h, y, alpha, limit, f13=None,
                f2=None) -> torch.Tensor:
    num_tokens = x.shape[0]
    num_experts, top_k = b13.shape[0], topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    inter, hidden = h.shape[1], y.shape[1]
    kernel = "regdot" if f13 is not None else MX_GEMM  # the fragments are read by regdot's kernel only
    tile = _mx_tile(num_pairs, num_experts, kernel)
    if f13 is not None and MX_FRAG_BLOCK_M and MX_TILE_OVERRIDE is None:
        tile = dict(tile, block_m=MX_FRAG_BLOCK_M)
    block_m = tile["block_m"]
    decode = regdot_decode(x) if kernel == "regdot" else None
    split_k = _mx_split_k(num_tokens, kernel, frag=f13 is not None)
    ids = topk_ids.reshape(-1).contiguous()
    per_pair = f13 is not None and num_pairs <= MX_FRAG_PER_PAIR_MAX_PAIRS
    if per_pair:  # one token's pairs: no sort, no tiles past the experts' runs (padded_end: unread)
        sorted_ids, padded_end, num_tiles = ids, ids, num_pairs
    else:
        sorted_ids, padded_end = _align_by_expert(topk_ids, num_experts, block_m)
        num_tiles = sorted_ids.numel() // block_m

    def gemm(a, w, s, b, out, n_out, k_dim, row_div, gated, frag=None):
        grid = (num_tiles, triton.cdiv(n_out, tile["block_n"]))
        args = None if frag is not None else (  # the checkpoint layout may be empty beside the fragments
            a, w, s, b, out, sorted_ids, padded_end, n_out, k_dim, num_pairs, num_experts, row_div, a.stride(0),
            w.stride(0), w.stride(1), s.stride(0), s.stride(1), b.stride(0), out.stride(0), alpha, limit)
        if kernel == "regdot":
            part, part_strides = out, (0, 0)  # any pointer without the split
            if split_k > 1:
                part = torch.empty(split_k, num_pairs, (2 if gated else 1) * n_out, dtype=torch.float32,
                                   device=a.device)
                part_strides = part.stride(0), part.stride(1)
            if frag is not None:
                up_tiles = frag.shape[1] // 2 if gated else 0
                # one plain matrix of gate and up rows (MX_FRAG_UNGATED): its split sums land where the gated
                # kernel's would, [split, pair, gate | up]
                plain = gated and split_k > 1 and MX_FRAG_UNGATED and n_out % FRAG_ROWS == 0
                rows, gated_kernel = (2 * n_out, False) if plain else (n_out, gated)
                _expert_gemm_mxf_kernel[(num_tiles, triton.cdiv(rows, FRAG_ROWS), split_k)](
                    a, frag, b, out, sorted_ids, padded_end, rows, k_dim, num_pairs, num_experts, row_div,
                    a.stride(0), frag.stride(0), 0 if plain else up_tiles, frag.shape[2], b.stride(0), out.stride(0),
                    alpha, limit, part, *part_strides, GATED=gated_kernel, E_PAD=triton.next_power_of_2(num_experts),
                    BLOCK_M=block_m, F32_DOT=interpreting(), IEEE=dot_ieee(a.dtype), PTX=decode == "bf16",
                    STEP_BYTES=FRAG_STEP_BYTES, CODE_BYTES=FRAG_CODE_BYTES, SPLIT_K=split_k, PER_PAIR=per_pair,
                    WORDS_SPLIT=MX_FRAG_WORDS_SPLIT, num_warps=4, num_stages=tile["num_stages"],
                    **pdl_args(a.device))
            else:
                _expert_gemm_mxr_kernel[(*grid, split_k)](
                    *args, part, *part_strides, GATED=gated,
                    E_PAD=triton.next_power_of_2(num_experts), BLOCK_M=block_m, BLOCK_N=tile["block_n"],
                    BLOCK_K=tile["block_k"], F32_DOT=interpreting(), DECODE=decode, SPLIT_K=split_k,
                    num_warps=tile["num_warps"], num_stages=tile["num_stages"], **pdl_args(a.device))
            if split_k > 1 and not gated and MX_SPLIT_SUM_TOPK:  # the down projection: its end joins the top-k sum
                return part
            if split_k > 1:
                block = 256
                _split_k_finish_kernel[(num_pairs, triton.cdiv(n_out, block))](
                    part, a, b, out, ids, n_out, *part_strides, b.stride(0), out.stride(0),
                    alpha, limit, GATED=gated, SPLIT_K=split_k, BLOCK=block, num_warps=4, **pdl_args(part.device))
            return None
        _expert_gemm_mx_kernel[grid](
            *args, GATED=gated, ACT_FORMAT=_ACT_FORMAT[x.dtype], E_PAD=triton.next_power_of_2(num_experts),
            BLOCK_M=block_m, BLOCK_N=tile["block_n"], BLOCK_K=tile["block_k"], num_warps=tile["num_warps"],
            num_stages=tile["num_stages"], **pdl_args(a.device))
        return None

    gemm(x, w13, s13, b13, h, inter, hidden, top_k, True, f13)
    part = gemm(h, w2, s2, b2, y, hidden, inter, 1, False, f2)
    if part is None:
        return _sum_topk(y, ids, num_tokens, top_k, x.dtype, weights)
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    block = 256
    _split_k_sum_topk_kernel[(num_tokens * triton.cdiv(hidden, block),)](
        part, b2, ids, weights, out, hidden, part.stride(0), part.stride(1), b2.stride(0), out.stride(0),
        TOP_K=top_k, SPLIT_K=split_k, BLOCK=block, num_warps=4, enable_fp_fusion=False, **pdl_args(x.device))
    return out


@register("fused_experts_swigluoai", "triton")
def fused_experts_swigluoai(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_bias: torch.Tensor,
    w2_bias: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    alpha: float,
    limit: float,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_frag: torch.Tensor | None = None,
    w2_frag: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k w_k * expert_{id_k}(x): per-pair GEMVs at decode sizes, expert-sorted grouped GEMMs beyond.
    w13_frag / w2_frag: the same MXFP4 weights in fragment order (atom.ops.mxfp4.pack_fragments), which every path
    then reads (regdot's kernel on them below MX_DEQUANT_MIN_PAIRS, their dequantization above); w13 / w2 and
    their scales may then be empty (the layer drops the checkpoint layout)."""
    mxfp4 = w13_scale is not None
    if mxfp4 != (w2_scale is not None):
        raise ValueError("fused_experts_swigluoai: give both MXFP4 scales (w13_scale, w2_scale) or neither")
    if (w13_frag is None) != (w2_frag is None) or (w13_frag is not None and not mxfp4):
        raise ValueError("fused_experts_swigluoai: the fragment-order copies (w13_frag, w2_frag) come both or not "
                         "at all, and only with MXFP4 weights")
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return torch.empty(0, w2_bias.shape[1], dtype=x.dtype, device=x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    hidden, inter = _check_shapes(x, w13, w2, w13_bias, w2_bias, w13_scale, w2_scale, mxfp4, w13_frag, w2_frag)
    num_experts = w13_bias.shape[0]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    weights = topk_weights.reshape(-1).float().contiguous()
    s13 = w13_scale if mxfp4 else w13  # any pointer when dense
    s2 = w2_scale if mxfp4 else w2
    alpha, limit = float(alpha), float(limit)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # each pair's expert output, unweighted

    ptx = mxfp4 and _ptx_decode(x)
    path = experts_path(x.dtype, mxfp4, num_pairs, ptx)
    if w13_frag is not None and path != "dequant":  # the fragments serve every size below the prefill's bound
        path = "mx_gemm"
    if path == "mx_gemm":
        return _mx_experts(x, w13, w2, s13, s2, w13_bias, w2_bias, weights, topk_ids, h, y, alpha, limit,
                           w13_frag, w2_frag)

    if path == "per_pair":
        ids = topk_ids.reshape(-1).contiguous()
        tile = PAIR_TILE_OVERRIDE or (_mx_pair_tile(num_tokens) if mxfp4 else _pair_tile(num_tokens))

        def pair(a, w, s, b, out, n_out, k_dim, row_div, gated, block_n, block_k):
            _pair_kernel[(num_pairs, triton.cdiv(n_out, block_n))](
                a, w, s, b, out, ids, n_out, k_dim, row_div, a.stride(0), w.stride(0), w.stride(1),
                s.stride(0), s.stride(1), b.stride(0), out.stride(0), alpha, limit, GATED=gated, MXFP4=mxfp4,
                BLOCK_N=block_n, BLOCK_K=block_k, ACC_K=block_k // 32 if mxfp4 else block_k, PTX=ptx,
                num_warps=tile["num_warps"], **pdl_args(a.device))

        pair(x, w13, s13, w13_bias, h, inter, hidden, top_k, True, tile["gate_block_n"], tile["block_k"])
        pair(h, w2, s2, w2_bias, y, hidden, inter, 1, False, tile["down_block_n"],
             tile.get("down_block_k", tile["block_k"]))
        return _sum_topk(y, ids, num_tokens, top_k, x.dtype, weights)

    # prefill sizes: MXFP4 experts dequantized, one projection at a time, then the dense grouped GEMM
    dequant = path == "dequant"
    tile = GEMM_TILE_OVERRIDE or _gemm_tile(num_pairs, num_experts, max_block_m=64)  # its kernel: no n_major
    block_m, bn, bk = tile["block_m"], tile["block_n"], max(64, tile["block_k"])  # MXFP4: half-K dots >= 32
    sorted_ids, padded_end = _align_by_expert(topk_ids, num_experts, block_m)
    num_tiles = sorted_ids.numel() // block_m
    ieee = dot_ieee(x.dtype)

    def gemm(a, w, s, b, out, n_out, k_dim, row_div, gated, frag=None):
        packed = mxfp4 and not dequant
        if dequant and frag is not None:
            w = s = mxfp4_frag_dequantize(frag, n_out, k_dim, 2 if gated else 1, a.dtype)
        elif dequant:
            w = s = mxfp4_dequantize(w, s, a.dtype)
        rows = block_m + (2 if gated else 1) * bn
        k_step, stages = fit_tile(tile["num_stages"], bk, lambda k: (rows * k * a.element_size(), 0), a.device)
        _expert_gemm_kernel[(num_tiles, triton.cdiv(n_out, bn))](
            a, w, s, b, out, sorted_ids, padded_end, n_out, k_dim, num_pairs, num_experts, row_div,
            a.stride(0), w.stride(0), w.stride(1), s.stride(0), s.stride(1), b.stride(0), out.stride(0), alpha,
            limit, GATED=gated, MXFP4=packed, E_PAD=triton.next_power_of_2(num_experts), BLOCK_M=block_m,
            BLOCK_N=bn, BLOCK_K=max(k_step, 64 if packed else 16), F32_DOT=interpreting(), IEEE=ieee,
            num_warps=tile["num_warps"], num_stages=stages, **pdl_args(a.device))

    gemm(x, w13, s13, w13_bias, h, inter, hidden, top_k, True, w13_frag)
    gemm(h, w2, s2, w2_bias, y, hidden, inter, 1, False, w2_frag)
    return _sum_topk(y, topk_ids.reshape(-1).contiguous(), num_tokens, top_k, x.dtype, weights)
