"""Where the one-launch decode layer's time goes: `_decode_layer_kernel` on a preset's shapes (random bf16 weights,
one sequence of --context keys), launched with its phases cut after phase 0, 1, ... 4 (decode_layer's last_phase;
the barriers on), each cut captured 28 times back to back in a CUDA graph (as a step's layers, every launch its own
weights so nothing stays in L2), replayed; us a launch by CUDA events, median of 20 replays
(skinny_gemm_variants.timed_us). The differences between cuts are
the phases' costs (a phase's time includes the barrier before it). With --stream B and / or --loop-ahead N the cuts
run again with the early stream at B bytes a program (ATOM_DECODE_LAYER_STREAM; each launch given the next launch's
qkv weight) and the K loops asking L2 for the chunk N steps on (ATOM_DECODE_LAYER_LOOP_AHEAD). Each cut is its own
compile (~5-10 s). Then the kernel's weight reads alone (the same programs, rows and chunks, no barriers, no other
work; with --loop-ahead also with the requests ahead): the floor of its weight stream, us a launch and GB/s; and the
four barriers alone in both forms.

    python tools/device/decode_layer_bench.py [--preset qwen3-0.6b] [--context 256] [--layers 28] [--stream 262144] \
        [--loop-ahead 1] [--full-only] [--reads-sweep]

--full-only times the whole launch only (no cuts: one compile a form), for sweeps of ATOM_DECODE_LAYER_WARPS and
ATOM_DECODE_LAYER_CHUNK from the environment. --reads-sweep times the weight reads alone over programs (1, 2 and 4
an SM: the reads need no residency), warps (4, 8) and chunk elements (16K, 32K, 64K): stop 67 measured the reads
alone at half the copy rate at qwen3-0.6b (1.5 of 3.0 TB/s on the H100) and at the copy rate at qwen3-8b, so
whether more loads in flight an SM (more programs or warps, larger chunks) lift the small shape's stream is the
question before the kernel changes its grid.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl
from atom.ops.triton_kernels import decode_layer as dl
from atom.ops.triton_kernels.common import num_sms

sys.path.insert(0, os.path.dirname(__file__))
from skinny_gemm_variants import timed_us  # noqa: E402 - us a call, CUDA graph replays (median of 20)


@triton.jit
def _barriers_only_kernel(bar_ptr, P: tl.constexpr, MODE: tl.constexpr, FLAGS_AT: tl.constexpr):
    """The launch's grid barriers with no work between them (their cost alone)."""
    if tl.program_id(0) == 0:  # what the layer kernel does at its start: the previous launch's last word
        if MODE == 1:
            tl.store(bar_ptr + 3, 0)
        else:
            tl.store(bar_ptr + FLAGS_AT + 96, 0)
    dl._grid_sync(bar_ptr, 0, P, MODE, FLAGS_AT)
    dl._grid_sync(bar_ptr, 1, P, MODE, FLAGS_AT)
    dl._grid_sync(bar_ptr, 2, P, MODE, FLAGS_AT)
    dl._grid_sync(bar_ptr, 3, P, MODE, FLAGS_AT)


@triton.jit
def _stream_rows(w_ptr, pid, N, K, R: tl.constexpr, T: tl.constexpr, KB: tl.constexpr, LINE: tl.constexpr,
                 AHEAD: tl.constexpr):
    """Sum of this program's rows of a row-major [N, K] weight, read chunk by chunk as the layer kernel reads them
    (decode_layer's _rows_of / _w_chunk tiles), each step asking L2 for the chunk AHEAD on (0: none)."""
    rows, ok = dl._rows_of(pid, N, R, T)
    acc = tl.zeros([T], tl.float32)
    for k0 in range(0, K, KB):
        if AHEAD > 0:
            dl._prefetch_lines(w_ptr, rows, ok, K, k0 + AHEAD * KB, LINE, KB // LINE, True)
        acc += tl.sum(dl._w_chunk(w_ptr, rows, ok, K, k0, KB).to(tl.float32), axis=1)
    return tl.sum(acc, axis=0)


@triton.jit
def _stream_only_kernel(wqkv_ptr, wo_ptr, wgu_ptr, wd_ptr, out_ptr, H, INTER, NQKV, KO,
                        R_QKV: tl.constexpr, T_QKV: tl.constexpr, KB_QKV: tl.constexpr, R_H: tl.constexpr,
                        T_H: tl.constexpr, KB_O: tl.constexpr, R_GU: tl.constexpr, T_GU: tl.constexpr,
                        KB_GU: tl.constexpr, KB_D: tl.constexpr, LINE: tl.constexpr, AHEAD: tl.constexpr):
    """The layer kernel's weight reads alone (the same programs, rows and chunks; gate and up as one tile of twice
    the rows), no barriers and no other work: the floor of its weight stream."""
    pid = tl.program_id(0)
    acc = _stream_rows(wqkv_ptr, pid, NQKV, H, R_QKV, T_QKV, KB_QKV, LINE, AHEAD)
    acc += _stream_rows(wo_ptr, pid, H, KO, R_H, T_H, KB_O, LINE, AHEAD)
    acc += _stream_rows(wgu_ptr, pid, 2 * INTER, H, 2 * R_GU, 2 * T_GU, KB_GU, LINE, AHEAD)
    acc += _stream_rows(wd_ptr, pid, H, INTER, R_H, T_H, KB_D, LINE, AHEAD)
    tl.store(out_ptr + pid, acc)


SHAPES = {  # hidden, query heads, KV heads, head_dim, intermediate (decode_layer_sass.py takes them from here)
    "qwen3-0.6b": (1024, 16, 8, 128, 3072),
    "qwen3-8b": (4096, 32, 8, 128, 12288),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--stream", type=int, default=0, help="the second form's early stream, bytes a program")
    ap.add_argument("--loop-ahead", type=int, default=0, help="the second form's K loop L2 requests, chunks ahead")
    ap.add_argument("--full-only", action="store_true", help="the whole launch only, no cuts")
    ap.add_argument("--reads-sweep", action="store_true",
                    help="the weight reads alone over programs an SM, warps and chunk elements")
    opts = ap.parse_args()
    hidden, hq, hkv, d, inter = SHAPES[opts.preset]
    dev, dt = torch.device("cuda"), torch.bfloat16
    nqkv = (hq + 2 * hkv) * d
    page, blocks = 16, triton.cdiv(opts.context, 16) + 1

    def w(*shape):
        return (torch.randn(*shape, device=dev) * shape[-1] ** -0.5).to(dt)

    layers = [dict(qkv=w(nqkv, hidden), o=w(hidden, hq * d), gu=w(2 * inter, hidden), down=w(hidden, inter),
                   kc=torch.randn(blocks, page, hkv, d, device=dev).to(dt),
                   vc=torch.randn(blocks, page, hkv, d, device=dev).to(dt),
                   bar=dl.counters(hkv, dev)) for _ in range(opts.layers)]
    norm = torch.ones(hidden, device=dev, dtype=dt)
    qn = torch.ones(d, device=dev, dtype=dt)
    cs = torch.rand(4096, d, device=dev)
    pos = torch.tensor([opts.context - 1], device=dev)
    seq = torch.tensor([opts.context], device=dev, dtype=torch.int32)
    slot = torch.tensor([opts.context - 1], device=dev)
    table = torch.arange(blocks, device=dev, dtype=torch.int32)[None]
    x = torch.randn(1, hidden, device=dev).to(dt)
    res = torch.randn(1, hidden, device=dev).to(dt)
    print(f"{torch.cuda.get_device_name()}, {opts.preset}, context {opts.context}, {num_sms(dev)} programs, "
          f"{dl.NUM_WARPS} warps, chunk {dl.CHUNK_ELEMS}")
    forms = [(0, 0)] + ([(opts.stream, opts.loop_ahead)] if opts.stream or opts.loop_ahead else [])
    for stream, ahead in forms:
        prev = 0.0
        for last in range(dl.NUM_PHASES - 1 if opts.full_only else 0, dl.NUM_PHASES):
            for L in layers:  # fresh counters: a cut launch leaves its own last barrier's set
                L["bar"] = dl.counters(hkv, dev)

            def step(_last=last, _stream=stream, _ahead=ahead):
                h, r = x, res
                for i, L in enumerate(layers):
                    nxt = layers[i + 1]["qkv"] if _stream and i + 1 < len(layers) else None
                    dl.decode_layer(
                        h, r, input_norm_w=norm, post_norm_w=norm, eps=1e-6, qkv_w=L["qkv"], qkv_b=None,
                        q_norm_w=qn, k_norm_w=qn, qk_eps=1e-6, cos_sin=cs, is_neox=True, positions=pos,
                        seq_lens=seq, slot_mapping=slot, block_tables=table, k_cache=L["kc"], v_cache=L["vc"],
                        scale=d**-0.5, num_heads=hq, num_kv_heads=hkv, o_w=L["o"], gate_up_w=L["gu"],
                        down_w=L["down"], act=0, barriers=L["bar"], max_seq_len=4096, last_phase=_last,
                        next_qkv_w=nxt, stream=_stream, loop_ahead=_ahead)

            t = timed_us(step, opts.layers)
            print(f"early stream {stream:>7} B, loop ahead {ahead}, phases 0..{last}: {t:7.2f} us a launch "
                  f"(+{t - prev:6.2f})")
            prev = t
    sms = num_sms(dev)
    nbytes = sum(layers[0][k].numel() * layers[0][k].element_size() for k in ("qkv", "o", "gu", "down"))

    def reads_alone(p: int, ahead: int, warps: int) -> float:
        """us a launch of the weight reads alone at p programs (tiles at the module's CHUNK_ELEMS)."""
        t = dl.tiles(hidden, inter, hq, hkv, d, 2, p, dl.decode_splits(p, hkv, 4096))
        sink = torch.empty(p, device=dev)

        def stream():
            for L in layers:
                _stream_only_kernel[(p,)](L["qkv"], L["o"], L["gu"], L["down"], sink, hidden, inter, nqkv, hq * d,
                                          R_QKV=t["R_QKV"], T_QKV=t["T_QKV"], KB_QKV=t["KB_QKV"], R_H=t["R_H"],
                                          T_H=t["T_H"], KB_O=t["KB_O"], R_GU=t["R_GU"], T_GU=t["T_GU"],
                                          KB_GU=t["KB_GU"], KB_D=t["KB_D"], LINE=t["LINE"], AHEAD=ahead,
                                          num_warps=warps)

        return timed_us(stream, opts.layers)

    for ahead in sorted({0, opts.loop_ahead}):
        us = reads_alone(sms, ahead, dl.NUM_WARPS)
        print(f"the weight reads alone (loop ahead {ahead}): {us:6.2f} us a launch, {nbytes / us / 1e3:6.0f} GB/s "
              f"({nbytes / 1e6:.1f} MB)")
    if opts.reads_sweep:
        chunk0 = dl.CHUNK_ELEMS
        try:
            for chunk in (16384, 32768, 65536):
                dl.CHUNK_ELEMS = chunk  # tiles() reads it: the chunks' columns
                for per_sm in (1, 2, 4):
                    for warps in (4, 8):
                        us = reads_alone(per_sm * sms, 0, warps)
                        print(f"reads alone, {per_sm} program(s) an SM, {warps} warps, chunk {chunk:>6}: "
                              f"{us:6.2f} us a launch, {nbytes / us / 1e3:6.0f} GB/s")
        finally:
            dl.CHUNK_ELEMS = chunk0
    bars = [dl.counters(hkv, dev) for _ in range(opts.layers)]
    for mode, warps in ((1, 1), (1, dl.NUM_WARPS), (2, 1), (2, dl.NUM_WARPS)):
        def barriers(_w=warps, _m=mode):
            for b in bars:
                _barriers_only_kernel[(sms,)](b, P=sms, MODE=_m, FLAGS_AT=dl.flags_at(hkv), num_warps=_w)

        print(f"4 barriers alone, form {mode} (ATOM_DECODE_LAYER_BARRIER), {warps} warps: "
              f"{timed_us(barriers, opts.layers):6.2f} us a launch")

if __name__ == "__main__":
    main()
