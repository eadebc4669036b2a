"""A whole dense decoder layer of a one-token decode step in one persistent kernel (issue 16's fixed cost).

At batch 1 a layer's work is small (qwen3-0.6b: 31 MB of weights, 9-10 us at the copy rate) and ATOM ran it as
8-10 kernels, each paying ~3-4 us of launch, ramp and drain (KERNEL_NOTES stop 64: at 0.6b a GEMM's ~4.7 us is
neither its DRAM latency nor its stream). Here one launch of `P` programs (one an SM, all resident) runs the
layer's five phases with a grid-wide barrier between them:

  0. residual + x -> RMSNorm -> qkv rows (each program its share of the qkv weight's rows; every program computes
     the norm of the whole 1 x H row itself, which is a few KB from L2)
  1. attention: a program a (KV head, split), its step metadata and first key tile loaded before the barrier: the
     query heads' qk-norm and rope, the new key's norm, rope and cache store (by the program whose keys end at it,
     put into its preloaded tile from registers), the split's partial softmax state; the last program to finish a
     KV head's splits (an acq_rel count a head) merges them into the attention output
  2. o_proj rows of the attention output
  3. residual + o -> RMSNorm -> gate and up rows of the program's intermediate slice -> act(gate) * up
  4. down_proj rows

Each program loads its next phase's first weight chunk into registers, and asks L2 for the rest (up to
PREFETCH_BYTES), before it waits at the barrier (weights are constant), so the weight stream of a phase overlaps the
previous phase's tail and the barrier. The layer's output (down_proj's rows) and its residual are the next layer's
input; the next launch's programs load their first qkv chunk before their PDL wait.

The early stream (STREAM_BYTES, ATOM_DECODE_LAYER_STREAM; 0, off, until measured): at its start a program also asks
L2 for its rows of the later phases' weights (o_proj, gate_up, down, in that order, up to STREAM_BYTES), and after
barrier 2 for its rows of the next layer's qkv weight (`next_qkv_w`, up to STREAM_BYTES), so that DRAM streams the
layer's weights from the launch's start through the attention, the barriers and the next launch's start instead of
a phase at a time (qwen3-0.6b: a program's share of a layer is ~232 KB, the layer's 31 MB fit in L2).

Roundings follow the unfused layer (the module path, atom.models.decoder): the residual sums, the norms' outputs,
each linear's output, the attention output and act(gate) are rounded to the model dtype where the module rounds
them; only the linears' float32 summation order differs (one program sums a row's K in chunks).

The grid barrier (`_grid_sync`): a counter a barrier, each program adds 1 (release, GPU scope) and reads it back
(acquire) until it holds P (ATOM_DECODE_LAYER_BARRIER=2: the last to arrive sets a flag the others poll instead).
The counters reset themselves: program 0 zeroes barrier k-1's counter (or flag) after it passed barrier k (every
program has left k-1 by then) and the last barrier's at the start of the next launch of the same layer. A launch
needs all P programs resident at once: P is at most the SM count, one program an SM. Under the interpreter (which
runs programs one after the other) there is no barrier: the phases run as five launches (PHASE_LO / PHASE_HI), the
same code and arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.envs import env_int
from atom.ops.triton_kernels.activation import _act
from atom.ops.triton_kernels.attention import (
    _dot_operand,
    _holds_new_key,
    _key_tile,
    _kv_offsets,
    _load_k,
    _load_v,
    _new_key_rows,
    _norm_rope_rows,
    _program_keys,
    _split_span,
)
from atom.ops.triton_kernels.common import dot_ieee, interpreting, num_sms
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait, prefetch_line_l2

NUM_PHASES = 5
NUM_BARRIERS = NUM_PHASES - 1
NUM_BARRIERS_C = tl.constexpr(NUM_BARRIERS)  # the KV heads' split counts follow the barriers' counters
# Elements of one weight chunk a program holds (a phase's first chunk is loaded before the barrier): 32,768 bf16
# is 64 KB, 256 bytes a thread at 8 warps. ATOM_DECODE_LAYER_CHUNK overrides it for A/B runs.
CHUNK_ELEMS = max(env_int("ATOM_DECODE_LAYER_CHUNK", 32768, 1 << 20, "weight elements a program's chunk"), 1024)
# Bytes of a phase's later weight chunks a program asks L2 for before the barrier (132 programs: ~8.4 MB of L2 at 64
# KB). ATOM_DECODE_LAYER_PREFETCH sets it (0: none).
PREFETCH_BYTES = env_int("ATOM_DECODE_LAYER_PREFETCH", 65536, 1 << 24, "bytes a program")
# The grid barrier's form (_grid_sync): 1, every program polls the counter the adds go to; 2, the last to arrive sets
# a flag on a line of its own, which the others poll. ATOM_DECODE_LAYER_BARRIER for A/B runs (1 until measured).
BARRIER = max(env_int("ATOM_DECODE_LAYER_BARRIER", 1, 2, "1 counter, 2 flag"), 1)
# Bytes of the later phases' weights (and, apart, of the next layer's qkv weight) a program asks L2 for early (the
# module docstring's early stream). ATOM_DECODE_LAYER_STREAM sets it (0: off).
STREAM_BYTES = env_int("ATOM_DECODE_LAYER_STREAM", 0, 1 << 24, "bytes a program")
# Weight chunks ahead a K loop's step asks L2 for (LOOP_AHEAD; 0: none). A phase whose rows a program holds in more
# than one chunk (qwen3-8b: every phase, 64 KB chunks) loads a chunk into registers and then sums it, so without it
# a program's loads stop while it sums. ATOM_DECODE_LAYER_LOOP_AHEAD sets it (0 until measured).
LOOP_AHEAD = env_int("ATOM_DECODE_LAYER_LOOP_AHEAD", 0, 8, "chunks")
NUM_WARPS = max(env_int("ATOM_DECODE_LAYER_WARPS", 8, 32, "warps a program"), 1)
ATTN_BLOCK_N = 64  # keys a tile in the attention phase


@triton.jit
def _grid_sync(bar_ptr, k: tl.constexpr, P: tl.constexpr, GRID_SYNC: tl.constexpr, FLAGS_AT: tl.constexpr):
    """Barrier k of the launch: returns when all P programs have arrived, with their stores before it visible.
    GRID_SYNC 0: none (the interpreter's phase launches). 1: each program adds 1 to counter k (release) and reads it
    back (acquire) until it holds P; program 0 then zeroes counter k-1 (every program has left it). 2: the program
    whose add (acq_rel) completes the count zeroes the counter and sets flag k (release, on a line of its own); the
    others poll the flag (acquire), not the counter the adds go to; program 0 then zeroes flag k-1."""
    if GRID_SYNC > 0:
        tl.debug_barrier()  # every thread's stores of this program issued before the arrival
        if GRID_SYNC == 1:
            seen = tl.atomic_add(bar_ptr + k, 1, sem="release", scope="gpu") + 1
            while seen < P:  # acquire reads (an add of 0 whose value is used: one with its value unused is dropped)
                seen = tl.atomic_add(bar_ptr + k, 0, sem="acquire", scope="gpu")
        else:
            if tl.atomic_add(bar_ptr + k, 1, sem="acq_rel", scope="gpu") == P - 1:
                tl.store(bar_ptr + k, 0)
                tl.atomic_xchg(bar_ptr + FLAGS_AT + 32 * k, 1, sem="release", scope="gpu")
            seen = tl.atomic_add(bar_ptr + FLAGS_AT + 32 * k, 0, sem="acquire", scope="gpu")
            while seen == 0:
                seen = tl.atomic_add(bar_ptr + FLAGS_AT + 32 * k, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
        if k > 0:
            if tl.program_id(0) == 0:
                if GRID_SYNC == 1:
                    tl.store(bar_ptr + (k - 1), 0)
                else:
                    tl.store(bar_ptr + FLAGS_AT + 32 * (k - 1), 0)


@triton.jit
def _rows_of(pid, N, R: tl.constexpr, T: tl.constexpr):
    """This program's rows of an N-row weight: R consecutive ones from pid * R, as a T-wide (power of two) tile."""
    r = tl.arange(0, T)
    rows = pid * R + r
    return rows, (r < R) & (rows < N)


@triton.jit
def _w_chunk(w_ptr, rows, row_ok, K, k0, KB: tl.constexpr):
    """Rows x columns [k0, k0 + KB) of a row-major [N, K] weight."""
    k = k0 + tl.arange(0, KB)
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k[None, :], mask=row_ok[:, None] & (k < K)[None, :],
                   other=0.0)


@triton.jit
def _rows_times(w_ptr, rows, row_ok, K, w_first, x_ptr, KB: tl.constexpr, LINE: tl.constexpr, AHEAD: tl.constexpr,
                ASM: tl.constexpr):
    """These rows of a row-major [N, K] weight times the K-vector at x_ptr, in float32: the first chunk from registers
    (w_first, loaded before the barrier), the others loaded here, each step asking L2 for the chunk AHEAD steps on
    (0: none)."""
    k = tl.arange(0, KB)
    acc = tl.sum(w_first.to(tl.float32) * tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)[None, :], axis=1)
    for k0 in range(KB, K, KB):
        if AHEAD > 0:
            _prefetch_lines(w_ptr, rows, row_ok, K, k0 + AHEAD * KB, LINE, KB // LINE, ASM)
        x = tl.load(x_ptr + k0 + k, mask=k0 + k < K, other=0.0).to(tl.float32)
        acc += tl.sum(_w_chunk(w_ptr, rows, row_ok, K, k0, KB).to(tl.float32) * x[None, :], axis=1)
    return acc


@triton.jit
def _residual(a_ptr, b_ptr, k, ok, HAS_B: tl.constexpr):
    """(a + b)[k] rounded to a's dtype (a residual sum, as norm.rms_norm_row); a alone without HAS_B."""
    a = tl.load(a_ptr + k, mask=ok, other=0.0)
    if HAS_B:
        a = (a.to(tl.float32) + tl.load(b_ptr + k, mask=ok, other=0.0).to(tl.float32)).to(a.dtype)
    return a


@triton.jit
def _rstd(a_ptr, b_ptr, H, eps, BLOCK_H: tl.constexpr, HAS_B: tl.constexpr):
    """1 / rms of the residual sum a + b, in float32."""
    c = tl.arange(0, BLOCK_H)
    s = _residual(a_ptr, b_ptr, c, c < H, HAS_B).to(tl.float32)
    return tl.rsqrt(tl.sum(s * s, axis=0) / H + eps)


@triton.jit
def _normed_chunk(a_ptr, b_ptr, w_ptr, rstd, H, k0, KB: tl.constexpr, HAS_B: tl.constexpr):
    """Columns [k0, k0 + KB) of RMSNorm(a + b) * w as the norm kernel stores them (norm.rms_norm_row's
    roundings), in float32 (0 past H)."""
    k = k0 + tl.arange(0, KB)
    ok = k < H
    s = _residual(a_ptr, b_ptr, k, ok, HAS_B)
    n = (s.to(tl.float32) * rstd).to(s.dtype).to(tl.float32) * tl.load(w_ptr + k, mask=ok, other=0.0).to(tl.float32)
    return n.to(s.dtype).to(tl.float32)


@triton.jit
def _store_residual(a_ptr, b_ptr, out_ptr, H, BLOCK_H: tl.constexpr, HAS_B: tl.constexpr):
    c = tl.arange(0, BLOCK_H)
    tl.store(out_ptr + c, _residual(a_ptr, b_ptr, c, c < H, HAS_B), mask=c < H)


@triton.jit
def _merge_group(part_m_ptr, part_l_ptr, part_acc_ptr, kvh, filled, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                 S: tl.constexpr, D: tl.constexpr):
    """The attention output of KV head kvh's GROUP query heads ([GROUP_P, D] float32): their `filled` splits' partial
    softmax states merged (attention._merge_splits_kernel's arithmetic). All splits' loads are independent (the
    split loop is unrolled, masked past `filled`)."""
    g = tl.arange(0, GROUP_P)
    s = tl.arange(0, S)
    d = tl.arange(0, D)
    g_ok = g < GROUP
    head = kvh * GROUP + g
    ok = g_ok[:, None] & (s < filled)[None, :]
    base = head[:, None] * S + s[None, :]
    m = tl.load(part_m_ptr + base, mask=ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + base, mask=ok, other=0.0)
    m_max = tl.max(m, axis=1)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_ref[:, None])
    l_tot = tl.sum(l_s * w, axis=1)
    acc = tl.zeros([GROUP_P, D], tl.float32)
    rows_ok = g_ok[:, None] & (d < D)[None, :]
    split_of = tl.zeros([GROUP_P, D], tl.int32)
    for k in tl.static_range(S):
        w_k = tl.sum(tl.where(s[None, :] == k, w, 0.0), axis=1)
        a = tl.load(part_acc_ptr + (head * S + k)[:, None] * D + d[None, :], mask=rows_ok & (split_of + k < filled),
                    other=0.0)
        acc += a * w_k[:, None]
    return acc / tl.where(l_tot == 0.0, 1.0, l_tot)[:, None]


@triton.jit
def _prefetch_lines(w_ptr, rows, row_ok, K, c0, LINE: tl.constexpr, LINES: tl.constexpr, ASM: tl.constexpr):
    """Ask L2 for LINES 128-byte lines from column c0 of these rows of a row-major [N, K] weight (those past K
    masked), without waiting: loaded later, they come from L2. c0 = a phase's first chunk (KB: that chunk is loaded
    into registers) for the rest of a phase's weight before its barrier; 0 for the early stream; a later chunk's
    in a K loop (LOOP_AHEAD). LINE: elements a line; LINES: a power of two (0: none). Off under the interpreter (no
    inline assembly there)."""
    if ASM:
        if LINES > 0:
            col = c0 + tl.arange(0, LINES) * LINE
            ok = row_ok[:, None] & (col < K)[None, :]
            prefetch_line_l2(tl.where(ok, w_ptr + rows[:, None].to(tl.int64) * K + col[None, :], w_ptr))


@triton.jit
def _decode_layer_kernel(
    x_ptr, res_ptr, res1_ptr, res_out_ptr, out_ptr, in_w_ptr, post_w_ptr, eps,
    wqkv_ptr, bqkv_ptr, qkv_ptr, qn_w_ptr, kn_w_ptr, qk_eps, cs_ptr, cs_stride, rot_half,
    pos_ptr, seq_lens_ptr, slot_ptr, bt_ptr, kc_ptr, vc_ptr,
    kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
    part_m_ptr, part_l_ptr, part_acc_ptr, scale, attn_ptr, wo_ptr, o_ptr, wgu_ptr, act_ptr, wd_ptr, bar_ptr,
    nqkv_ptr, H, INTER, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, P: tl.constexpr,
    R_QKV: tl.constexpr, T_QKV: tl.constexpr, KB_QKV: tl.constexpr,
    R_H: tl.constexpr, T_H: tl.constexpr, KB_O: tl.constexpr,
    R_GU: tl.constexpr, T_GU: tl.constexpr, KB_GU: tl.constexpr,
    KB_D: tl.constexpr,
    S: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, GROUP_M: tl.constexpr, GROUP_P: tl.constexpr,
    KV_ALIGN: tl.constexpr, LINE: tl.constexpr, LINES_QKV: tl.constexpr, LINES_O: tl.constexpr,
    LINES_GU: tl.constexpr, LINES_D: tl.constexpr, EL_O: tl.constexpr, EL_GU: tl.constexpr, EL_D: tl.constexpr,
    EL_NEXT: tl.constexpr, LOOP_AHEAD: tl.constexpr, ASM: tl.constexpr,
    HAS_RES: tl.constexpr, QKV_BIAS: tl.constexpr, QK_NORM: tl.constexpr, IS_NEOX: tl.constexpr,
    ACT: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr,
    PHASE_LO: tl.constexpr, PHASE_HI: tl.constexpr, GRID_SYNC: tl.constexpr, FLAGS_AT: tl.constexpr,
    PDL: tl.constexpr,
):
    """See the module docstring. One decode row: x, res [H] (res unread without HAS_RES: the first layer, whose
    residual is x); writes res1 (x + res, program 0), qkv, the attention partials, o, act (scratch), res_out (res1
    + o, program 0) and out (down_proj's output) [H]. PHASE_LO..PHASE_HI: the phases this launch runs. EL_*: the early
    stream's lines a row (o_proj, gate_up, down from the start; the next layer's qkv at nqkv_ptr after barrier 2).
    LOOP_AHEAD: a K loop's step asks L2 for the chunk that many steps on (0: none)."""
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    GROUP: tl.constexpr = HQ // HKV
    KO: tl.constexpr = HQ * D
    NQKV: tl.constexpr = (HQ + 2 * HKV) * D

    q_rows, q_ok = _rows_of(pid, NQKV, R_QKV, T_QKV)
    if PHASE_LO == 0:  # the first chunk of this program's qkv rows (the rest into L2): constant weights, before the
        w0 = _w_chunk(wqkv_ptr, q_rows, q_ok, H, 0, KB_QKV)  # PDL wait
        _prefetch_lines(wqkv_ptr, q_rows, q_ok, H, KB_QKV, LINE, LINES_QKV, ASM)
        # the early stream: the later phases' rows into L2 now (their own loads come after the barriers)
        e_rows, e_ok = _rows_of(pid, H, R_H, T_H)  # o_proj's and down_proj's
        g_rows, g_ok = _rows_of(pid, INTER, R_GU, T_GU)
        if PHASE_HI >= 2:
            _prefetch_lines(wo_ptr, e_rows, e_ok, KO, 0, LINE, EL_O, ASM)
        if PHASE_HI >= 3:
            _prefetch_lines(wgu_ptr, g_rows, g_ok, H, 0, LINE, EL_GU, ASM)
            _prefetch_lines(wgu_ptr, g_rows + INTER, g_ok, H, 0, LINE, EL_GU, ASM)
        if PHASE_HI == 4:
            _prefetch_lines(wd_ptr, e_rows, e_ok, INTER, 0, LINE, EL_D, ASM)
    pdl_wait(PDL)

    # ---- phase 0: residual + x -> RMSNorm -> qkv rows ----
    if PHASE_LO == 0:
        # the previous launch of this layer left its last barrier's counter (1) or flag (2) set: program 0 zeroes that
        # of this launch's last barrier (PHASE_HI - 1; below 3 where decode_layer's last_phase cut the launch short)
        if (GRID_SYNC > 0) & (PHASE_HI > 0):
            if pid == 0:
                if GRID_SYNC == 1:
                    tl.store(bar_ptr + (PHASE_HI - 1), 0)
                else:
                    tl.store(bar_ptr + FLAGS_AT + 32 * (PHASE_HI - 1), 0)
        rstd = _rstd(x_ptr, res_ptr, H, eps, BLOCK_H, HAS_RES)
        if pid == 0:
            _store_residual(x_ptr, res_ptr, res1_ptr, H, BLOCK_H, HAS_RES)
        acc = tl.sum(w0.to(tl.float32) * _normed_chunk(x_ptr, res_ptr, in_w_ptr, rstd, H, 0, KB_QKV, HAS_RES)[None, :],
                     axis=1)
        for k0 in range(KB_QKV, H, KB_QKV):
            if LOOP_AHEAD > 0:
                _prefetch_lines(wqkv_ptr, q_rows, q_ok, H, k0 + LOOP_AHEAD * KB_QKV, LINE, KB_QKV // LINE, ASM)
            w = _w_chunk(wqkv_ptr, q_rows, q_ok, H, k0, KB_QKV)
            acc += tl.sum(w.to(tl.float32)
                          * _normed_chunk(x_ptr, res_ptr, in_w_ptr, rstd, H, k0, KB_QKV, HAS_RES)[None, :], axis=1)
        if QKV_BIAS:
            acc += tl.load(bqkv_ptr + q_rows, mask=q_ok, other=0.0).to(tl.float32)
        tl.store(qkv_ptr + q_rows, acc.to(dtype), mask=q_ok)

    # ---- phase 1: attention, a program a (KV head, split) (HKV * S <= P) ----
    if (PHASE_LO <= 1) & (PHASE_HI >= 1):
        # before the barrier: the step's metadata (host-written) and this program's first key tile (earlier steps'
        # keys: written by completed kernels; the new key's slot is read stale and replaced from registers)
        seq_len = tl.load(seq_lens_ptr).to(tl.int32)
        pos = tl.load(pos_ptr).to(tl.int64)
        slot = tl.load(slot_ptr).to(tl.int64)
        d = tl.arange(0, D)
        d_ok = tl.full([D], 1, tl.int1)
        row0 = pid * 0  # the block table's one row
        kvh = pid // S
        split = pid % S
        has_item = pid < HKV * S
        lo, hi = _program_keys(seq_len, 1, 0, split, 0, 0, 1, False, S, BLOCK_N)
        hi = tl.where(has_item, hi, lo)
        _, k_ok0, k_off0, v_off0 = _kv_offsets(lo, hi, bt_ptr, row0, 0, kvh, kc_stride_b, kc_stride_s, kc_stride_h,
                                               vc_stride_b, vc_stride_s, vc_stride_h, BLOCK_N, PAGE, False,
                                               KV_ALIGN, True)
        k_pre = _load_k(kc_ptr, k_off0, k_ok0, d, d_ok, True)
        v_pre = _load_v(vc_ptr, v_off0, k_ok0, d, d_ok, True)
        if PHASE_LO < 1:
            _grid_sync(bar_ptr, 0, P, GRID_SYNC, FLAGS_AT)
        if lo < hi:
            cs_row = cs_ptr + pos * cs_stride
            r = tl.arange(0, GROUP_M)
            row_ok = r < GROUP
            qk_scale = scale * 1.4426950408889634
            head = kvh * GROUP + r
            q_row = qkv_ptr + head[:, None] * D
            q = _norm_rope_rows(q_row, row_ok[:, None], d, qn_w_ptr, qk_eps, cs_row, D, rot_half, QK_NORM, IS_NEOX,
                                q_row, 0, 0)
            if F32_DOT:
                q = q.to(tl.float32)
            new_at = -1
            k_new_dot = _dot_operand(tl.zeros([D], tl.float32).to(dtype), dtype, F32_DOT, False, False)
            v_new_dot = k_new_dot
            if _holds_new_key(lo, hi, seq_len, slot):  # this program's keys end at the new one: store it first
                k_new, v_new = _new_key_rows(qkv_ptr + KO, qkv_ptr + KO + HKV * D, qkv_ptr, qkv_ptr, 0, kvh, D, 0, 0,
                                             tl.full([1, 1], 1, tl.int1), d, d_ok, kn_w_ptr, qk_eps, cs_row, rot_half,
                                             QK_NORM, IS_NEOX, 0, 0)
                blk = slot // PAGE
                in_blk = slot % PAGE
                tl.store(kc_ptr + blk * kc_stride_b + in_blk * kc_stride_s + kvh * kc_stride_h + d[None, :], k_new)
                tl.store(vc_ptr + blk * vc_stride_b + in_blk * vc_stride_s + kvh * vc_stride_h + d[None, :], v_new)
                new_at = seq_len - 1  # in the preloaded tile it replaces what the early load saw
                k_new_dot = _dot_operand(tl.reshape(k_new, [D]), dtype, F32_DOT, False, False)
                v_new_dot = _dot_operand(tl.reshape(v_new, [D]), dtype, F32_DOT, False, False)
                tl.debug_barrier()  # visible to every thread of the program before a later tile reads it
            m_i = tl.full([GROUP_M], float("-inf"), tl.float32)
            l_i = tl.zeros([GROUP_M], tl.float32)
            acc_a = tl.zeros([GROUP_M, D], tl.float32)
            m_i, l_i, acc_a = _key_tile(q, m_i, l_i, acc_a, lo, hi, 0, kc_ptr, vc_ptr, bt_ptr, row0, 0, kvh,
                                        kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
                                        d, d_ok, scale, qk_scale, 0.0, 0, dtype, BLOCK_N, PAGE, False, KV_ALIGN,
                                        F32_DOT, False, False, IEEE, False, False, 1, True, True, k_pre, v_pre,
                                        new_at, k_new_dot, v_new_dot)
            first = lo + BLOCK_N
            hi_full = lo + (hi - lo) // BLOCK_N * BLOCK_N
            for start in range(first, hi_full, BLOCK_N):
                m_i, l_i, acc_a = _key_tile(q, m_i, l_i, acc_a, start, hi, 0, kc_ptr, vc_ptr, bt_ptr, row0, 0, kvh,
                                            kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s,
                                            vc_stride_h, d, d_ok, scale, qk_scale, 0.0, 0, dtype, BLOCK_N, PAGE,
                                            False, KV_ALIGN, F32_DOT, False, False, IEEE, False, False, 1, False)
            if (hi_full < hi) & (hi_full >= first):
                m_i, l_i, acc_a = _key_tile(q, m_i, l_i, acc_a, hi_full, hi, 0, kc_ptr, vc_ptr, bt_ptr, row0, 0, kvh,
                                            kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s,
                                            vc_stride_h, d, d_ok, scale, qk_scale, 0.0, 0, dtype, BLOCK_N, PAGE,
                                            False, KV_ALIGN, F32_DOT, False, False, IEEE, False, False, 1, True)
            part = head * S + split
            tl.store(part_m_ptr + part, m_i, mask=row_ok)
            tl.store(part_l_ptr + part, l_i, mask=row_ok)
            tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc_a, mask=row_ok[:, None])
            # the last of the KV head's splits to finish merges them (its count: release of this program's
            # partials, acquire of the others'), and zeroes the count for the next launch
            tl.debug_barrier()
            done = tl.atomic_add(bar_ptr + NUM_BARRIERS_C + kvh, 1, sem="acq_rel", scope="gpu")
            filled = tl.cdiv(seq_len, _split_span(seq_len, S, BLOCK_N))
            if done == filled - 1:
                o_g = _merge_group(part_m_ptr, part_l_ptr, part_acc_ptr, kvh, filled, GROUP, GROUP_P, S, D)
                g = tl.arange(0, GROUP_P)
                tl.store(attn_ptr + (kvh * GROUP + g)[:, None] * D + d[None, :], o_g.to(dtype),
                         mask=(g < GROUP)[:, None])
                tl.store(bar_ptr + NUM_BARRIERS_C + kvh, 0)

    # ---- phase 2: o_proj rows of the attention output ----
    if (PHASE_LO <= 2) & (PHASE_HI >= 2):
        o_rows, o_ok = _rows_of(pid, H, R_H, T_H)
        wo0 = _w_chunk(wo_ptr, o_rows, o_ok, KO, 0, KB_O)
        _prefetch_lines(wo_ptr, o_rows, o_ok, KO, KB_O, LINE, LINES_O, ASM)
        if PHASE_LO < 2:
            _grid_sync(bar_ptr, 1, P, GRID_SYNC, FLAGS_AT)
        o = _rows_times(wo_ptr, o_rows, o_ok, KO, wo0, attn_ptr, KB_O, LINE, LOOP_AHEAD, ASM)
        tl.store(o_ptr + o_rows, o.to(dtype), mask=o_ok)

    # ---- phase 3: residual + o -> RMSNorm -> gate / up rows -> act(gate) * up ----
    if (PHASE_LO <= 3) & (PHASE_HI >= 3):
        i_rows, i_ok = _rows_of(pid, INTER, R_GU, T_GU)
        wg0 = _w_chunk(wgu_ptr, i_rows, i_ok, H, 0, KB_GU)
        wu0 = _w_chunk(wgu_ptr, i_rows + INTER, i_ok, H, 0, KB_GU)
        _prefetch_lines(wgu_ptr, i_rows, i_ok, H, KB_GU, LINE, LINES_GU, ASM)
        _prefetch_lines(wgu_ptr, i_rows + INTER, i_ok, H, KB_GU, LINE, LINES_GU, ASM)
        if PHASE_LO < 3:
            _grid_sync(bar_ptr, 2, P, GRID_SYNC, FLAGS_AT)
        # the early stream: this program's rows of the next layer's qkv weight (its launch loads them first)
        _prefetch_lines(nqkv_ptr, q_rows, q_ok, H, 0, LINE, EL_NEXT, ASM)
        rstd2 = _rstd(o_ptr, res1_ptr, H, eps, BLOCK_H, True)
        if pid == 0:
            _store_residual(o_ptr, res1_ptr, res_out_ptr, H, BLOCK_H, True)
        n = _normed_chunk(o_ptr, res1_ptr, post_w_ptr, rstd2, H, 0, KB_GU, True)[None, :]
        g = tl.sum(wg0.to(tl.float32) * n, axis=1)
        u = tl.sum(wu0.to(tl.float32) * n, axis=1)
        for k0 in range(KB_GU, H, KB_GU):
            if LOOP_AHEAD > 0:
                _prefetch_lines(wgu_ptr, i_rows, i_ok, H, k0 + LOOP_AHEAD * KB_GU, LINE, KB_GU // LINE, ASM)
                _prefetch_lines(wgu_ptr, i_rows + INTER, i_ok, H, k0 + LOOP_AHEAD * KB_GU, LINE, KB_GU // LINE, ASM)
            n = _normed_chunk(o_ptr, res1_ptr, post_w_ptr, rstd2, H, k0, KB_GU, True)[None, :]
            g += tl.sum(_w_chunk(wgu_ptr, i_rows, i_ok, H, k0, KB_GU).to(tl.float32) * n, axis=1)
            u += tl.sum(_w_chunk(wgu_ptr, i_rows + INTER, i_ok, H, k0, KB_GU).to(tl.float32) * n, axis=1)
        gate = g.to(dtype).to(tl.float32)
        a = _act(gate, ACT).to(dtype).to(tl.float32) * u.to(dtype).to(tl.float32)
        tl.store(act_ptr + i_rows, a.to(dtype), mask=i_ok)

    # ---- phase 4: down_proj rows ----
    if PHASE_HI == 4:
        d_rows, dr_ok = _rows_of(pid, H, R_H, T_H)
        wd0 = _w_chunk(wd_ptr, d_rows, dr_ok, INTER, 0, KB_D)
        _prefetch_lines(wd_ptr, d_rows, dr_ok, INTER, KB_D, LINE, LINES_D, ASM)
        if PHASE_LO < 4:
            _grid_sync(bar_ptr, 3, P, GRID_SYNC, FLAGS_AT)
        y = _rows_times(wd_ptr, d_rows, dr_ok, INTER, wd0, act_ptr, KB_D, LINE, LOOP_AHEAD, ASM)
        tl.store(out_ptr + d_rows, y.to(dtype), mask=dr_ok)


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _chunk(k: int, rows_tile: int, tiles: int = 1) -> int:
    """Columns a weight chunk: a power of two, at most the whole (padded) K, about CHUNK_ELEMS over the tiles."""
    return max(16, min(triton.next_power_of_2(k), _pow2_floor(CHUNK_ELEMS // (rows_tile * tiles))))


def _rows_tile(n: int, programs: int) -> tuple[int, int]:
    r = triton.cdiv(n, programs)
    return r, triton.next_power_of_2(r)


def grid_programs(device: torch.device) -> int:
    """Programs a launch: one an SM (all must be resident at once for the barriers)."""
    return num_sms(device)


def decode_splits(programs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Attention splits of a KV head: a power of two, (KV heads x splits) <= programs, none shorter than a key tile."""
    most = max(1, triton.cdiv(max_seq_len, ATTN_BLOCK_N))
    return max(1, min(_pow2_floor(max(programs // num_kv_heads, 1)), triton.next_power_of_2(most), 64))


def tiles(hidden: int, inter: int, num_heads: int, num_kv_heads: int, head_dim: int, elem_size: int, programs: int,
          splits: int, stream: int = 0, next_layer: bool = False) -> dict:
    """The kernel's shape constexprs: each phase's rows a program (R_*; R_H for o_proj's and down_proj's H rows) and
    their power-of-two tile (T_*), its weight chunk's columns (KB_*: about CHUNK_ELEMS elements; the first is loaded
    before the barrier) and the 128-byte lines a row past that chunk (LINES_*: asked into L2 before the barrier),
    the early stream's lines a row (EL_*: within `stream` bytes a program, o_proj, gate_up, down in that order from
    the launch's start; the next layer's qkv, `next_layer`, within `stream` again, after barrier 2), the attention's
    splits and groups."""
    ko = num_heads * head_dim
    nqkv = ko + 2 * num_kv_heads * head_dim
    r_qkv, t_qkv = _rows_tile(nqkv, programs)
    r_h, t_h = _rows_tile(hidden, programs)
    r_gu, t_gu = _rows_tile(inter, programs)
    kb = dict(KB_QKV=_chunk(hidden, t_qkv), KB_O=_chunk(ko, t_h), KB_GU=_chunk(hidden, t_gu, 2),
              KB_D=_chunk(inter, t_h))
    line = 128 // elem_size

    def lines(k: int, first: int, rows: int, tiles: int = 1, budget: int = PREFETCH_BYTES) -> int:
        """Lines a row from column `first`, a power of two, within `budget` bytes a program (before a barrier:
        PREFETCH_BYTES, what L2 holds for all programs at once; qwen3-8b's gate_up rows would be 100 MB)."""
        if k <= first:
            return 0
        most = budget // (128 * rows * tiles)
        return min(triton.next_power_of_2(triton.cdiv(k - first, line)), _pow2_floor(most) if most else 0)

    early, left = {}, stream
    for name, k, rows, n in (("EL_O", ko, t_h, 1), ("EL_GU", hidden, t_gu, 2), ("EL_D", inter, t_h, 1)):
        early[name] = lines(k, 0, rows, n, left)
        left -= early[name] * 128 * rows * n
    early["EL_NEXT"] = lines(hidden, 0, t_qkv, 1, stream) if next_layer else 0

    def late(k: int, first: int, rows: int, tiles: int, el: int) -> int:
        """The phase's lines past its first chunk, none where the early stream asked for the whole rows."""
        return 0 if el * line >= k else lines(k, first, rows, tiles)

    group = num_heads // num_kv_heads
    return dict(H=hidden, INTER=inter, HQ=num_heads, HKV=num_kv_heads, D=head_dim,
                BLOCK_H=triton.next_power_of_2(hidden), P=programs, R_QKV=r_qkv, T_QKV=t_qkv, R_H=r_h, T_H=t_h,
                R_GU=r_gu, T_GU=t_gu, **kb, S=splits, BLOCK_N=ATTN_BLOCK_N,
                GROUP_M=max(16, triton.next_power_of_2(group)), GROUP_P=triton.next_power_of_2(group), LINE=line,
                LINES_QKV=lines(hidden, kb["KB_QKV"], t_qkv), LINES_O=late(ko, kb["KB_O"], t_h, 1, early["EL_O"]),
                LINES_GU=late(hidden, kb["KB_GU"], t_gu, 2, early["EL_GU"]),
                LINES_D=late(inter, kb["KB_D"], t_h, 1, early["EL_D"]), **early)


def flags_at(num_kv_heads: int) -> int:
    """Where the barriers' flags (GRID_SYNC 2) start in the counters: after the counters and the KV heads' counts, on
    a 128-byte line of their own, one line a flag."""
    return 32 * triton.cdiv(NUM_BARRIERS + num_kv_heads, 32)


def counters_needed(num_kv_heads: int) -> int:
    return flags_at(num_kv_heads) + 32 * NUM_BARRIERS


def counters(num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """A layer's counters for decode_layer's `barriers`: one a grid barrier, one a KV head (its finished splits), and
    the barriers' flags (flags_at)."""
    return torch.zeros(counters_needed(num_kv_heads), dtype=torch.int32, device=device)


def decode_layer(
    x: torch.Tensor, residual: torch.Tensor | None, *, input_norm_w: torch.Tensor, post_norm_w: torch.Tensor,
    eps: float, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None, q_norm_w: torch.Tensor | None,
    k_norm_w: torch.Tensor | None, qk_eps: float, cos_sin: torch.Tensor, is_neox: bool, positions: torch.Tensor,
    seq_lens: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, scale: float, num_heads: int, num_kv_heads: int, o_w: torch.Tensor, gate_up_w: torch.Tensor,
    down_w: torch.Tensor, act: int, barriers: torch.Tensor, max_seq_len: int, programs: int | None = None,
    splits: int | None = None, last_phase: int = NUM_PHASES - 1, next_qkv_w: torch.Tensor | None = None,
    stream: int | None = None, loop_ahead: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer of a one-row decode step (x [1, H] the previous layer's output or the embedding,
    residual [1, H] or None for the first layer): returns (down_proj's output, the new residual), both [1, H],
    what DecoderLayer.forward returns. barriers: this layer's int32 counters (`counters`: the barriers' and each KV
    head's split count), zero before the first launch (each launch leaves them for the next). max_seq_len: the longest context this launch may see (a CUDA
    graph's max_model_len) sizes the attention splits. last_phase < 4 stops the launch early (its outputs then
    unwritten; tools/device/decode_layer_bench.py times the phases so). next_qkv_w: the next layer's qkv weight
    (as qkv_w), which the early stream asks into L2 after barrier 2; stream: the early stream's bytes a program
    (None: STREAM_BYTES; 0: off); loop_ahead: chunks a K loop asks L2 for ahead (None: LOOP_AHEAD). None of them
    changes a result."""
    device = x.device
    hidden = x.shape[-1]
    head_dim = k_cache.shape[-1]
    inter = down_w.shape[1]
    nqkv = (num_heads + 2 * num_kv_heads) * head_dim
    if x.shape != (1, hidden) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"decode_layer: x must be one row [1, H] in a float dtype, got {x.dtype} {tuple(x.shape)}")
    if head_dim != triton.next_power_of_2(head_dim) or num_heads % num_kv_heads:
        raise ValueError(f"decode_layer: head_dim {head_dim} must be a power of two and {num_heads} query heads a "
                         f"multiple of {num_kv_heads} KV heads")
    for name, w, shape in (("qkv", qkv_w, (nqkv, hidden)), ("o_proj", o_w, (hidden, num_heads * head_dim)),
                           ("gate_up", gate_up_w, (2 * inter, hidden)), ("down", down_w, (hidden, inter))):
        if tuple(w.shape) != shape or not w.is_contiguous() or w.dtype != x.dtype:
            raise ValueError(f"decode_layer: {name} weight must be a contiguous {x.dtype} {shape}, got "
                             f"{w.dtype} {tuple(w.shape)}")
    if next_qkv_w is not None and (next_qkv_w.shape != qkv_w.shape or next_qkv_w.dtype != qkv_w.dtype
                                   or not next_qkv_w.is_contiguous()):
        raise ValueError(f"decode_layer: the next layer's qkv weight must be a contiguous {qkv_w.dtype} "
                         f"{tuple(qkv_w.shape)}, got {next_qkv_w.dtype} {tuple(next_qkv_w.shape)}")
    if k_cache.dtype != x.dtype or v_cache.dtype != x.dtype:
        raise ValueError(f"decode_layer: the KV cache must be in the model dtype {x.dtype}, got {k_cache.dtype}")
    if barriers.dtype != torch.int32 or barriers.numel() < counters_needed(num_kv_heads):
        raise ValueError(f"decode_layer: barriers must be int32 with {counters_needed(num_kv_heads)} counters "
                         "(decode_layer.counters)")
    if not 0 <= last_phase < NUM_PHASES:
        raise ValueError(f"decode_layer: last_phase must be 0..{NUM_PHASES - 1}, got {last_phase}")
    p = programs or grid_programs(device)
    s = splits or decode_splits(p, num_kv_heads, max_seq_len)
    if num_kv_heads * s > p or s & (s - 1):
        raise ValueError(f"decode_layer: {num_kv_heads} KV heads x {s} splits (a power of two) must fit {p} programs")
    ko = num_heads * head_dim
    kv_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3])
    f = dict(dtype=x.dtype, device=device)
    res1, res_out, out = (torch.empty(1, hidden, **f) for _ in range(3))
    qkv = torch.empty(nqkv, **f)
    o = torch.empty(hidden, **f)
    attn = torch.empty(ko, **f)
    act_buf = torch.empty(inter, **f)
    part_m = torch.empty(num_heads, s, dtype=torch.float32, device=device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(num_heads, s, head_dim, dtype=torch.float32, device=device)
    cs = cos_sin if cos_sin.stride(-1) == 1 else cos_sin.contiguous()
    qn = q_norm_w if q_norm_w is not None else input_norm_w  # any pointer without qk-norm (never read)
    kn = k_norm_w if k_norm_w is not None else qn
    common = dict(
        **tiles(hidden, inter, num_heads, num_kv_heads, head_dim, x.element_size(), p, s,
                STREAM_BYTES if stream is None else int(stream), next_qkv_w is not None),
        PAGE=k_cache.shape[1], KV_ALIGN=16 if all(st % 16 == 0 for st in kv_strides) else 1,
        HAS_RES=residual is not None, QKV_BIAS=qkv_b is not None, QK_NORM=q_norm_w is not None,
        IS_NEOX=bool(is_neox), ACT=act, F32_DOT=interpreting(), IEEE=dot_ieee(x.dtype), ASM=not interpreting(),
        LOOP_AHEAD=LOOP_AHEAD if loop_ahead is None else int(loop_ahead),
        num_warps=NUM_WARPS,
    )
    args = (x, residual if residual is not None else x, res1, res_out, out, input_norm_w, post_norm_w, float(eps),
            qkv_w, qkv_b if qkv_b is not None else qkv_w, qkv, qn, kn, float(qk_eps), cs, cs.stride(0),
            cs.shape[-1] // 2, positions, seq_lens, slot_mapping, block_tables, k_cache, v_cache, *kv_strides,
            part_m, part_l, part_acc, float(scale), attn, o_w, o, gate_up_w, act_buf, down_w, barriers,
            next_qkv_w if next_qkv_w is not None else qkv_w)
    if interpreting() or device.type != "cuda":  # programs run one after the other: a launch a phase
        for phase in range(last_phase + 1):
            _decode_layer_kernel[(p,)](*args, **common, PHASE_LO=phase, PHASE_HI=phase, GRID_SYNC=0,
                                       FLAGS_AT=flags_at(num_kv_heads), PDL=False)
    else:
        _decode_layer_kernel[(p,)](*args, **common, PHASE_LO=0, PHASE_HI=last_phase, GRID_SYNC=BARRIER,
                                   FLAGS_AT=flags_at(num_kv_heads), **pdl_args(device))
    return out, res_out

