"""Decode attention at serving contexts, as atom-server's CUDA graphs run it: max_seq_len = max_model_len
(the graph is captured once for every context), the split count from the engine's rule, GPU time of a graph
replay. Compares the split rules of atom.ops.triton_kernels.attention: each sequence's keys in equal parts
(SPLIT_PER_SEQUENCE, the default) against parts of the graph's span (the old rule), and the old rule given the
batch's real longest context (what an eager step passes). Bytes read (KV; MLA: latent cache, kv_b_proj,
queries and output) / time against the copy rate.

    PYTHONPATH=packages/atom-core/src python3 tools/device/attn_decode_bench.py [--batches 1,16,64,128]
        [--contexts 512,1536,3072] [--max-model-len 4096] [--heads 32,8,128] [--mla]

--mla: the DeepSeek-V2-Lite latent attention (mla_decode) instead of the GQA kernel.
--prep: Qwen3's decode prep (qk-norm, rope, the KV write) as its own kernel before the attention
(qk_norm_rope_cache + paged_attention_impl, atom-server's default) against inside it (paged_attention_impl's
prep, ATOM_ATTN_FUSED_DECODE_PREP=1), each captured `--layers` times in a row in one graph (the boundaries
between kernels count, as in a step); us per layer. Run it with ATOM_PDL=0 too: with PDL a kernel's time
includes its wait for the one before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import copy_bandwidth, graph_time, mla, paged  # noqa: E402

from atom.ops.triton_kernels import attention as tk  # noqa: E402


def _graph_width(tables: torch.Tensor, max_model_len: int, block_size: int = 16) -> torch.Tensor:
    """A block table as wide as a graph's (max_model_len // block_size columns)."""
    wide = torch.zeros(tables.shape[0], max_model_len // block_size, dtype=torch.int32, device=tables.device)
    wide[:, :tables.shape[1]] = tables
    return wide


def _contexts(batch: int, ctx: int) -> list[int]:
    return torch.randint(max(1, ctx // 2), ctx + ctx // 2, (batch,)).tolist()  # mean ctx, +-50%


def gqa_case(batch, ctx, heads, max_model_len):
    hq, hkv, d = heads
    args, nbytes = paged(batch, 1, _contexts(batch, ctx), hq, hkv, d)
    q, kc, vc, tables, qsl, seq, scale = args[:7]
    wide = _graph_width(tables, max_model_len)

    def run(max_seq_len):
        return lambda: tk.paged_attention_impl(q, kc, vc, wide, qsl, seq, scale, None, None, 1, max_seq_len)

    return run, int(seq.max()), nbytes, tk._decode_splits(q.device, batch, hkv, max_model_len, 64)


def mla_case(batch, ctx, max_model_len):
    from atom.ops.triton_kernels import mla as tm

    q_nope, q_pe, cache, w, tables, _, seq, scale, real_max, nbytes = mla(batch, 1, _contexts(batch, ctx))
    wide = _graph_width(tables, max_model_len)

    def run(max_seq_len):
        return lambda: tm.mla_decode_impl(q_nope, q_pe, cache, w, wide, seq, scale, max_seq_len)

    return run, real_max, nbytes, None


def prep_case(batch, ctx, heads, max_model_len, layers):
    """(two kernels, one kernel): `layers` decode preps + attentions in a row, each layer its own cache."""
    from atom.ops.attention import DecodePrep
    from atom.ops.triton_kernels.qk_norm_rope_cache import qk_norm_rope_cache

    hq, hkv, d = heads
    ctxs = _contexts(batch, ctx)
    per_layer = [paged(batch, 1, ctxs, hq, hkv, d) for _ in range(layers)]
    dev, dt = per_layer[0][0][0].device, per_layer[0][0][0].dtype
    seq = per_layer[0][0][5]
    positions = (seq - 1).long()
    cos_sin = torch.randn(max_model_len, d, device=dev, dtype=torch.float32)
    qw, kw = torch.rand(d, device=dev, dtype=dt) + 0.5, torch.rand(d, device=dev, dtype=dt) + 0.5
    raw = [(torch.randn(batch, hq * d, device=dev, dtype=dt), torch.randn(batch, hkv * d, device=dev, dtype=dt),
            torch.randn(batch, hkv * d, device=dev, dtype=dt)) for _ in range(layers)]
    layer_args = []
    for (args, _), (q, k, v) in zip(per_layer, raw):
        _, kc, vc, tables, qsl, lens, scale = args[:7]
        # each sequence's new key goes to the slot after its cached ones: the last block-table entry it uses
        last = (lens - 1).long()
        slots = tables[torch.arange(batch, device=dev), last // 16].long() * 16 + last % 16
        layer_args.append((q, k, v, kc, vc, _graph_width(tables, max_model_len), qsl, lens, scale, slots))

    def two():
        for q, k, v, kc, vc, wide, qsl, lens, scale, slots in layer_args:
            q2, _ = qk_norm_rope_cache(positions, q, k, v, qw, kw, 1e-6, d, cos_sin, True, kc, vc, slots)
            tk.paged_attention_impl(q2.view(batch, hq, d), kc, vc, wide, qsl, lens, scale, None, None, 1,
                                    max_model_len)

    def one():
        for q, k, v, kc, vc, wide, qsl, lens, scale, slots in layer_args:
            tk.paged_attention_impl(q.view(batch, hq, d), kc, vc, wide, qsl, lens, scale, None, None, 1,
                                    max_model_len, prep=DecodePrep(positions, k, v, qw, kw, 1e-6, cos_sin, True,
                                                                   slots))

    return two, one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--contexts", default="512,1536,3072")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim (qwen3-8b)")
    ap.add_argument("--mla", action="store_true")
    ap.add_argument("--prep", action="store_true", help="the decode prep as its own kernel against inside attention")
    ap.add_argument("--layers", type=int, default=8, help="--prep: layers captured in a row in one graph")
    ap.add_argument("--out")
    ns = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    heads = tuple(int(x) for x in ns.heads.split(","))
    print(f"copy rate {bw:,.0f} GB/s; max_model_len {ns.max_model_len}; {'MLA' if ns.mla else f'GQA {heads}'}")
    if ns.prep:
        print(f"{ns.layers} layers a graph, PDL {os.environ.get('ATOM_PDL', 'default')}")
        print("batch  ctx(mean)  prep kernel + attention us/layer   prep inside attention us/layer   saved us/layer")
        for b in (int(x) for x in ns.batches.split(",")):
            for c in (int(x) for x in ns.contexts.split(",")):
                if c * 3 // 2 > ns.max_model_len:
                    continue
                two, one = prep_case(b, c, heads, ns.max_model_len, ns.layers)
                t2, t1 = (graph_time(f) * 1e3 / ns.layers for f in (two, one))
                print(f"{b:5d}  {c:9d}  {t2:30.2f}   {t1:30.2f}   {t2 - t1:12.2f}", flush=True)
        return
    print("batch  ctx(mean)  splits  per-seq us (% copy)   span us (% copy)   span=real max us   per-seq speed-up")
    rows = []
    for b in (int(x) for x in ns.batches.split(",")):
        for c in (int(x) for x in ns.contexts.split(",")):
            if c * 3 // 2 > ns.max_model_len:
                continue
            run, real_max, nbytes, splits = (mla_case(b, c, ns.max_model_len) if ns.mla
                                             else gqa_case(b, c, heads, ns.max_model_len))
            res = {}
            for name, per_seq, span in (("per_seq", True, ns.max_model_len), ("span", False, ns.max_model_len),
                                        ("span_real", False, real_max)):
                tk.SPLIT_PER_SEQUENCE = per_seq
                res[name] = graph_time(run(span)) * 1e3
            tk.SPLIT_PER_SEQUENCE = True
            pct = {k: nbytes / (v * 1e-6) / 1e9 / bw * 100 for k, v in res.items()}
            rows.append(dict(batch=b, ctx=c, splits=splits, us=res, pct_copy=pct, kv_bytes=nbytes))
            print(f"{b:5d}  {c:9d}  {splits if splits else '-':>6}  {res['per_seq']:8.1f} ({pct['per_seq']:4.0f}%)"
                  f"   {res['span']:8.1f} ({pct['span']:4.0f}%)   {res['span_real']:8.1f}"
                  f"          x{res['span'] / res['per_seq']:.2f}", flush=True)
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(dict(copy_gbps=bw, max_model_len=ns.max_model_len, mla=ns.mla, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
