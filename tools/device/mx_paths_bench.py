"""The MXFP4 expert paths side by side at gpt-oss-20b shapes, in a few minutes (a short device call).

For each token count: the per-pair GEMV (element-wise and PTX decode), regdot (element-wise, PTX float32 and PTX
bf16 decode), regdot on the fragment-order copy (regdot_frag, ATOM_MX_FRAG: _expert_gemm_mxf_kernel, at every size
from 1 token, so that it also meets the GEMV), scaled-dot (tl.dot_scaled) and dequantize + the dense grouped GEMM,
each with its default tile, as
CUDA-graph replays (us per layer call), and each one's max difference from the first path run at that size.
--sweep adds regdot's tiles and its K splits (default decode) at a few sizes; --sweep-kernels frag_split the
fragment kernel's K splits and token tiles, frag_ungated the same with gate and up as one plain matrix (--frag-tiles,
--frag-splits narrow both). --routing random (default) spreads
the pairs over the 32 experts, so a batch touches every expert from about 16 tokens on; --routing concentrated
sends every token to the same 4 experts, which is what a random-weight engine (load_format=dummy, ATOM's and
vLLM's benchmarks) does: the router's bias decides, so each of those experts gets the whole batch.

    PYTHONPATH=packages/atom-core/src python3 tools/device/mx_paths_bench.py [--tokens 32,128,1024] [--sweep] \
        [--routing concentrated]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench_cudagraph

from atom.ops import moe as ref_moe
from atom.ops.mxfp4 import pack_fragments
from atom.ops.registry import resolve
from atom.ops.triton_kernels import moe_swigluoai as tk

K = 4  # top-k; the experts: gpt-oss-20b's 32 of 2880 x 2880 (--device cpu: 8 of 64 x 64, see main)
BIG = 10**9
GEMV = dict(MX_GEMM_MIN_PAIRS=BIG, PAIR_GEMV_MAX_PAIRS=BIG, MX_PTX_GEMV_MAX_PAIRS=BIG, MX_DEQUANT_MIN_PAIRS=0)
GEMM = dict(MXFP4_SCALED_DOT=True, MX_GEMM_MIN_PAIRS=1, MX_DEQUANT_MIN_PAIRS=0)
PATHS = {  # name: (module settings, token counts it runs at)
    "per_pair": (dict(GEMV, MX_PTX=False), lambda t: t <= 16),
    "per_pair_ptx": (dict(GEMV, MX_PTX=True), lambda t: t <= 16),
    "regdot": (dict(GEMM, MX_GEMM="regdot", MX_PTX=False), lambda t: 4 <= t <= 1024),
    "regdot_ptx": (dict(GEMM, MX_GEMM="regdot", MX_PTX=True, MX_REGDOT_BF16=False), lambda t: 4 <= t <= 1024),
    "regdot_bf16": (dict(GEMM, MX_GEMM="regdot", MX_PTX=True, MX_REGDOT_BF16=True), lambda t: 1 <= t),
    "regdot_frag": (dict(GEMM, MX_GEMM="regdot", MX_PTX=True, MX_REGDOT_BF16=True), lambda t: t <= 1024),
    # the same at one token with the expert sort and its grid (per-pair programs off): what the per-pair mode saves
    "regdot_frag_sorted": (dict(GEMM, MX_GEMM="regdot", MX_PTX=True, MX_REGDOT_BF16=True,
                                MX_FRAG_PER_PAIR_MAX_PAIRS=0), lambda t: t == 1),
    # stop 41-43's code layout (each thread's 32 bytes together: half-used 32-byte sectors), for the A/B
    "regdot_frag_contig": (dict(GEMM, MX_GEMM="regdot", MX_PTX=True, MX_REGDOT_BF16=True, MX_FRAG_WORDS_SPLIT=False),
                           lambda t: t <= 1024),
    # gate and up as one plain matrix of 64-row tiles (ATOM_MX_FRAG_UNGATED; only where K is split, <= 192 tokens)
    "regdot_frag_ungated": (dict(GEMM, MX_GEMM="regdot", MX_PTX=True, MX_REGDOT_BF16=True, MX_FRAG_UNGATED=True),
                            lambda t: 2 <= t <= 192),
    "scaled_dot": (dict(GEMM, MX_GEMM="scaled_dot"), lambda t: t >= 4),
    "dequant": (dict(GEMM, MX_DEQUANT_MIN_PAIRS=1), lambda t: t >= 128),
}
SWEEP_TOKENS = (8, 32, 128, 512)
SWEEP = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
         for bm, bn, bk, w, st in ((16, 64, 128, 4, 3), (16, 128, 128, 4, 3), (32, 64, 128, 4, 3),
                                   (32, 128, 128, 4, 3), (32, 128, 256, 8, 3), (64, 128, 128, 4, 3),
                                   (64, 128, 128, 8, 3), (16, 64, 256, 4, 2), (32, 128, 64, 4, 4))]
# the fragment kernel: tokens a tile (its 64 weight rows are fixed), pipeline stages, K split
FRAG_SWEEP = [(dict(block_m=bm, block_n=64, block_k=128, num_warps=4, num_stages=st), split)
              for bm, st in ((16, 3), (32, 3), (64, 3), (16, 4), (16, 5), (32, 4)) for split in (1, 2, 3, 4, 6)]
# regdot's K split (ATOM_MX_SPLIT_K) with two tiles: (block_m, block_n, split_k)
SPLIT_SWEEP = [(dict(block_m=bm, block_n=bn, block_k=128, num_warps=4, num_stages=3), split)
               for bm, bn in ((16, 64), (32, 64)) for split in (1, 2, 3, 4, 6)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,4,8,16,32,64,128,512,1024")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--sweep", action="store_true",
                    help="regdot's tiles and K splits (default decode) at 8 / 32 / 128 / 512")
    ap.add_argument("--routing", choices=("random", "concentrated"), default="random")
    ap.add_argument("--sweep-tokens", default=",".join(map(str, SWEEP_TOKENS)))
    ap.add_argument("--sweep-kernels", default="regdot,split", help="regdot: its tiles; split: its K splits")
    ap.add_argument("--frag-tiles", help="the fragment sweeps' tiles as TOKENSxSTAGES, e.g. 16x3,16x4 (default: all)")
    ap.add_argument("--frag-splits", help="the fragment sweeps' K splits, e.g. 2,3,4 (default: all)")
    ap.add_argument("--out")
    ap.add_argument("--once", action="store_true",
                    help="run each path 3 times, untimed (for a profiler: ncu --launch-skip 4 --launch-count 2 "
                         "takes the third call's two GEMMs)")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1 (no timings)")
    opts = ap.parse_args()
    if opts.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu runs the kernels under the interpreter: set TRITON_INTERPRET=1")
    frag_sweep = [(tile, split) for tile, split in FRAG_SWEEP
                  if (not opts.frag_tiles or f"{tile['block_m']}x{tile['num_stages']}" in opts.frag_tiles.split(","))
                  and (not opts.frag_splits or str(split) in opts.frag_splits.split(","))]
    torch.manual_seed(0)
    dev = opts.device
    E, H, I = (32, 2880, 2880) if dev == "cuda" else (8, 64, 64)
    op = resolve("fused_experts_swigluoai", "triton")
    w13 = torch.randint(0, 256, (E, 2 * I, H // 2), dtype=torch.uint8, device=dev)
    s13 = torch.randint(118, 125, (E, 2 * I, H // 32), dtype=torch.uint8, device=dev)
    w2 = torch.randint(0, 256, (E, H, I // 2), dtype=torch.uint8, device=dev)
    s2 = torch.randint(118, 125, (E, H, I // 32), dtype=torch.uint8, device=dev)
    b13 = torch.randn(E, 2 * I, device=dev, dtype=torch.bfloat16) * 0.1
    b2 = torch.randn(E, H, device=dev, dtype=torch.bfloat16) * 0.1
    frags = (pack_fragments(w13, s13, halves=2), pack_fragments(w2, s2))  # regdot_frag's copy
    contig = (pack_fragments(w13, s13, halves=2, split_words=False), pack_fragments(w2, s2, split_words=False))
    names = {key for settings, _ in PATHS.values() for key in settings} | {"MX_TILE_OVERRIDE", "MX_SPLIT_K"}
    saved = {name: getattr(tk, name) for name in names}
    rows = []

    def run(tokens, name, settings, args, want, tile=None):
        for key, value in saved.items():
            setattr(tk, key, value)
        for key, value in settings.items():
            setattr(tk, key, value)
        tk.MX_TILE_OVERRIDE = tile
        if name.startswith("regdot_frag"):
            args = args + (contig if settings.get("MX_FRAG_WORDS_SPLIT") is False else frags)
        try:
            out = op(*args).float()
            if opts.once:  # calls 2 and 3, for a profiler's --launch-skip
                op(*args)
                op(*args)
                if out.is_cuda:
                    torch.cuda.synchronize()
            us = do_bench_cudagraph(lambda: op(*args), rep=200) * 1e3 if out.is_cuda and not opts.once else 0.0
            row = dict(tokens=tokens, path=name, routing=opts.routing, us=us,
                       diff=0.0 if want is None else (out - want).abs().max().item())
        except Exception as exc:  # a path or tile the compiler refuses
            out, row = want, dict(tokens=tokens, path=name, error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
        if tile:
            row["tile"] = tile
        rows.append(row)
        print(json.dumps(row), flush=True)
        return out

    try:
        for tokens in [int(t) for t in opts.tokens.split(",")]:
            x = torch.randn(tokens, H, device=dev, dtype=torch.bfloat16)
            tw, tid = ref_moe.moe_topk_softmax(torch.randn(tokens, E, device=dev), K, True)
            if opts.routing == "concentrated":
                tid = (torch.arange(K, device=dev) * (E // K) + 1).to(tid).expand(tokens, K).contiguous()
            args = (x, w13, w2, b13, b2, tw, tid, 1.702, 7.0, s13, s2)
            want = None
            for name in opts.paths.split(","):
                settings, sizes = PATHS[name]
                if sizes(tokens):
                    out = run(tokens, name, settings, args, want)
                    want = out if want is None else want  # the first path run at this size is the reference
            if opts.sweep and tokens in [int(t) for t in opts.sweep_tokens.split(",")]:
                kernels = opts.sweep_kernels.split(",")
                for tile in SWEEP if "regdot" in kernels else ():
                    run(tokens, "regdot_tile", PATHS["regdot_bf16"][0], args, want, tile)
                for tile, split in SPLIT_SWEEP if "split" in kernels else ():
                    run(tokens, f"regdot_split{split}", dict(PATHS["regdot_bf16"][0], MX_SPLIT_K=str(split)), args,
                        want, tile)
                # the fragment kernel reads block_m (tokens a tile; 64: a batch routed to 4 experts decodes each
                # weight once) and num_stages (more bytes in flight once the decode is cheap)
                for tile, split in frag_sweep if "frag_split" in kernels else ():
                    run(tokens, f"regdot_frag_split{split}", dict(PATHS["regdot_frag"][0], MX_SPLIT_K=str(split)),
                        args, want, tile)
                for tile, split in frag_sweep if "frag_ungated" in kernels else ():  # K split only
                    if split > 1:
                        run(tokens, f"regdot_frag_ungated_split{split}",
                            dict(PATHS["regdot_frag_ungated"][0], MX_SPLIT_K=str(split)), args, want, tile)
    finally:
        for key, value in saved.items():
            setattr(tk, key, value)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
