"""Sweep the paged-attention tile settings on the GPU (prints one line per setting, best last per case).

PYTHONPATH=packages/atom-core/src python3 tools/device/attn_sweep.py
"""

from __future__ import annotations

import itertools

import torch

from atom.ops.registry import resolve
from atom.ops.triton_kernels import attention as tk_attn
from kernel_bench import graph_time, paged


def sweep(tile_dict, grid, cases, label):
    default = dict(tile_dict)
    attn = resolve("paged_attention", "triton")
    for name, (batch, q_len, ctx), flops_or_bytes in cases:
        args, nbytes = paged(batch, q_len, [ctx] * batch)
        results = []
        for values in itertools.product(*grid.values()):
            tile_dict.clear()
            tile_dict.update(default)
            tile_dict.update(dict(zip(grid, values)))
            try:
                ms = graph_time(lambda: attn(*args))
            except Exception as e:  # e.g. out of shared memory for this tile
                print(f"{label} {name} {dict(tile_dict)} failed: {type(e).__name__}")
                continue
            rate = flops_or_bytes(nbytes) / ms / 1e9
            results.append((ms, dict(tile_dict), rate))
        for ms, tile, rate in sorted(results, key=lambda r: -r[0]):
            print(f"{label} {name} {ms * 1e3:8.1f} us  {rate:8.1f}  {tile}")
    tile_dict.clear()
    tile_dict.update(default)


def main():
    torch.manual_seed(0)
    sweep(tk_attn.DECODE_TILE,
          dict(block_n=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3], programs_per_sm=[2, 8]),
          [("bs1 ctx32768", (1, 1, 32767), lambda b: b * 1e3),
           ("bs32 ctx4096", (32, 1, 4095), lambda b: b * 1e3),
           ("bs128 ctx4096", (128, 1, 4095), lambda b: b * 1e3)], "decode GB/s")
    sweep(tk_attn.PREFILL_TILE,
          dict(block_m=[64, 128], block_n=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3]),
          [("bs4 q1024", (4, 1024, 0), lambda b: 4 * 4 * 1024 * 1025 / 2 * 32 * 128),
           ("bs1 q4096", (1, 4096, 0), lambda b: 4 * 4096 * 4097 / 2 * 32 * 128)], "prefill TFLOP/s")


if __name__ == "__main__":
    main()
