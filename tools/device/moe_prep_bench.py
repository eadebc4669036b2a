"""The MoE path's glue kernels at qwen3-30b-a3b's sizes, old against new, in one process (run on the GPU).

- The chunk scan of `moe._align_by_expert`'s "scan" path (prefills above 2,048 pairs): torch.cumsum over dim 0
  (until stop 53; 357 us a layer in the H100's batch-128 FP8 prefill profile) against `_align_scan_kernel`.
- The top-k sum `moe._sum_topk`: the kernel it had until stop 53 (a [8, 256] tile of the k rows reduced with
  tl.sum over axis 0 across the program's warps, 4; also on 1, 2 and 8 warps) against the shipped one (the k
  rows added one after another as 1-D loads in registers). Outputs compared bit for bit ("same"): the order of
  the k additions differs, so the tile's results differ from the shipped kernel's in the last bits (the shipped
  kernel adds in k order).

Each timed alone (PDL off), median of --reps CUDA-event timings; GB/s and % of the device copy rate.

    PYTHONPATH=packages/atom-core/src:tools/device python3 tools/device/moe_prep_bench.py --out $OUT/moe_prep.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from atom.ops.triton_kernels import moe as tk_moe
from row_quant_sweep import copy_rate, timed


@triton.jit
def _sum_topk_2d_kernel(y_ptr, ids_ptr, w_ptr, out_ptr, n_out, top_k, y_stride, out_stride, K_PAD: tl.constexpr,
                        BLOCK: tl.constexpr):
    """moe._sum_topk_kernel as it was before stop 53 (WEIGHTED, no PDL): program (token, column block)."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    k = tl.arange(0, K_PAD)
    ids = tl.load(ids_ptr + t * top_k + k, mask=k < top_k, other=-1)
    m = ((k < top_k) & (ids >= 0))[:, None] & (n[None, :] < n_out)
    y = tl.load(y_ptr + (t * top_k + k[:, None]) * y_stride + n[None, :], mask=m, other=0.0).to(tl.float32)
    y = y * tl.load(w_ptr + t * top_k + k, mask=k < top_k, other=0.0)[:, None]
    tl.store(out_ptr + t * out_stride + n, tl.sum(y, axis=0).to(out_ptr.dtype.element_ty), mask=n < n_out)


def measure(tokens: int, a: argparse.Namespace, rate: float, dev: torch.device) -> list[dict]:
    rows = []
    pairs = tokens * a.top_k
    g = torch.Generator(device=dev).manual_seed(tokens)
    y = torch.randn(pairs, a.hidden, generator=g, device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, a.experts, (pairs,), generator=g, device=dev, dtype=torch.int32)
    w = torch.rand(pairs, generator=g, device=dev)
    block = 256
    out_old = torch.empty(tokens, a.hidden, dtype=torch.bfloat16, device=dev)

    def old():
        _sum_topk_2d_kernel[(tokens, triton.cdiv(a.hidden, block))](
            y, ids, w, out_old, a.hidden, a.top_k, y.stride(0), out_old.stride(0),
            K_PAD=triton.next_power_of_2(a.top_k), BLOCK=block, num_warps=4, enable_fp_fusion=False)
        return out_old

    def new():
        return tk_moe._sum_topk(y, ids, tokens, a.top_k, torch.bfloat16, w)

    variants = [("sum_topk_tile_4w (old)", old), ("sum_topk (shipped)", new)]
    for blk, warps in ((256, 1), (256, 2), (256, 8)):
        out_v = torch.empty(tokens, a.hidden, dtype=torch.bfloat16, device=dev)

        def warps_variant(blk=blk, warps=warps, out_v=out_v):
            _sum_topk_2d_kernel[(tokens, triton.cdiv(a.hidden, blk))](
                y, ids, w, out_v, a.hidden, a.top_k, y.stride(0), out_v.stride(0),
                K_PAD=triton.next_power_of_2(a.top_k), BLOCK=blk, num_warps=warps, enable_fp_fusion=False)
            return out_v
        variants.append((f"sum_topk_2d_{blk}_{warps}w", warps_variant))
    old()
    ref = new()
    same = torch.equal(out_old, ref)
    nbytes = pairs * a.hidden * 2 + tokens * a.hidden * 2
    for name, fn in variants:
        got = fn()
        us = timed(fn, a.reps)
        rows.append(dict(kernel=name, tokens=tokens, us=us, gbps=nbytes / us / 1e3,
                         pct_copy=100 * nbytes / us / 1e3 / rate,
                         bit_identical=torch.equal(got, ref)))
    if pairs > tk_moe._ALIGN_KERNEL_MAX_PAIRS:
        chunks = triton.cdiv(pairs, tk_moe._ALIGN_CHUNK)
        e_pad = triton.next_power_of_2(a.experts + 1)
        counts = torch.randint(0, 9, (chunks, e_pad), generator=g, device=dev, dtype=torch.int32)
        scan_t = torch.zeros(chunks + 1, e_pad, dtype=torch.int32, device=dev)
        scan_k = torch.empty(chunks + 1, e_pad, dtype=torch.int32, device=dev)
        block_e = min(e_pad, 16)

        def torch_scan():
            torch.cumsum(counts, 0, dtype=torch.int32, out=scan_t[1:])

        def kernel_scan():
            tk_moe._align_scan_kernel[(e_pad // block_e,)](counts, scan_k, chunks, E_PAD=e_pad, BLOCK_E=block_e,
                                                           ROWS=256, PDL=False, num_warps=4)

        torch_scan()
        kernel_scan()
        same = torch.equal(scan_t, scan_k)
        for name, fn in (("scan_torch_cumsum", torch_scan), ("scan_kernel", kernel_scan)):
            rows.append(dict(kernel=name, tokens=tokens, chunks=chunks, us=timed(fn, a.reps), bit_identical=same))
        ids2 = ids.reshape(tokens, a.top_k).long()  # the torch path scatters int64 counts
        for path in ("scan", "torch"):
            tk_moe.ALIGN_PATH_OVERRIDE = path
            rows.append(dict(kernel=f"align_by_expert_{path}", tokens=tokens,
                             us=timed(lambda: tk_moe._align_by_expert(ids2, a.experts, 64), a.reps)))
        tk_moe.ALIGN_PATH_OVERRIDE = None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="128,2048,16384")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    rate = copy_rate(dev)
    rows = []
    for tokens in (int(t) for t in a.tokens.split(",")):
        rows += measure(tokens, a, rate, dev)
    print(f"{torch.cuda.get_device_name()}: copy rate {rate:,.0f} GB/s")
    for r in rows:
        extra = f"  {r['gbps']:7,.0f} GB/s {r['pct_copy']:5.1f}%" if "gbps" in r else ""
        same = "" if "bit_identical" not in r else f"  same={r['bit_identical']}"
        print(f"{r['kernel']:<24} tokens {r['tokens']:>6}  {r['us']:9.1f} us{extra}{same}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_gbps=rate, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
