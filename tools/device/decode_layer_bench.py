"""Where the one-launch decode layer's time goes: `_decode_layer_kernel` on a preset's shapes (random bf16 weights,
one sequence of --context keys), launched with its phases cut after phase 0, 1, ... 4 (decode_layer's last_phase;
the barriers on), each cut captured 28 times back to back in a CUDA graph (as a step's layers, every launch its own
weights so nothing stays in L2), replayed; us a launch by CUDA events, median of 20 replays
(skinny_gemm_variants.timed_us). The differences between cuts are
the phases' costs (a phase's time includes the barrier before it). With --stream B and / or --loop-ahead N the cuts
run again with the early stream at B bytes a program (ATOM_DECODE_LAYER_STREAM; each launch given the next launch's
qkv weight) and the K loops asking L2 for the chunk N steps on (ATOM_DECODE_LAYER_LOOP_AHEAD). Each cut is its own
compile (~5-10 s).

    python tools/device/decode_layer_bench.py [--preset qwen3-0.6b] [--context 256] [--layers 28] [--stream 262144] \
        [--loop-ahead 1]
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
        for last in range(dl.NUM_PHASES):
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
    p = num_sms(dev)
    bars = [dl.counters(hkv, dev) for _ in range(opts.layers)]
    for mode, warps in ((1, 1), (1, dl.NUM_WARPS), (2, 1), (2, dl.NUM_WARPS)):
        def barriers(_w=warps, _m=mode):
            for b in bars:
                _barriers_only_kernel[(p,)](b, P=p, MODE=_m, FLAGS_AT=dl.flags_at(hkv), num_warps=_w)

        print(f"4 barriers alone, form {mode} (ATOM_DECODE_LAYER_BARRIER), {warps} warps: "
              f"{timed_us(barriers, opts.layers):6.2f} us a launch")

if __name__ == "__main__":
    main()
