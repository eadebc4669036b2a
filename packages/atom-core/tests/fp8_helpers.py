"""Shared builders of the FP8 tests (test_fp8_ops.py, test_triton_fp8.py)."""

from __future__ import annotations

import torch

from atom.ops import quant_fp8 as Q


def make_fp8_experts(e: int, hidden: int, inter: int, block_size, dtype=torch.float8_e4m3fn, device="cpu"):
    """(w13, w2, w13_scale, w2_scale): random float experts quantized as checkpoints hold them (gate and up
    as two tensors whose block scales stack). block_size None: per-channel scales [E, N, 1]."""
    w13 = torch.randn(e, 2 * inter, hidden, device=device) / hidden**0.5
    w2 = torch.randn(e, hidden, inter, device=device) / inter**0.5
    scheme = "block" if block_size else "channel"
    bs = block_size or (128, 128)
    q13, s13, q2, s2 = [], [], [], []
    for i in range(e):
        parts = [Q.quantize_weight_fp8(w13[i, j * inter:(j + 1) * inter], scheme, bs, dtype) for j in (0, 1)]
        q13.append(torch.cat([p[0] for p in parts]))
        s13.append(torch.cat([p[1] for p in parts]))
        qq, ss = Q.quantize_weight_fp8(w2[i], scheme, bs, dtype)
        q2.append(qq)
        s2.append(ss)
    return torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2)
