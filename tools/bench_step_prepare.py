"""Host-side cost of turning a scheduled decode batch into model inputs, per step, on CPU (no model).

    python tools/bench_step_prepare.py [--context 200] [--steps 300]

graph:  the async-launch check + StepInputBuilder.build + the runner's block-table update + the decode
        graphs' prepare (pinned-buffer writes and the H2D copy; here a CPU copy, nothing captured)
eager:  build + the runner's input arrays and attention tensors (what runs before the model call)
encode: msgpack encode + decode of the step (what a tensor-parallel broadcast would add per step)
Median microseconds per step over --steps decode steps of batch 1/32/256 sequences that grow by one
token per step (so block-table tails are sent whenever a sequence crosses a block).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from atom.layers.attention import AttentionInputs, PagedAttentionMetadataBuilder
from atom_server.engine.block_manager import BlockManager
from atom_server.engine.block_tables import BlockTables, positions_of
from atom_server.engine.cuda_graphs import DecodeGraphs
from atom_server.engine.scheduler import ScheduledBatch, Scheduler
from atom_server.engine.sequence import Sequence, SeqStatus
from atom_server.engine.step_input import StepInputBuilder, decode, encode, is_greedy_decode
from atom_server.sampling_params import SamplingParams

BLOCK = 16
MAX_LEN = 4096


class _NoModel:
    """DecodeGraphs needs a model only to capture or replay; prepare() never calls it."""


def _setup(n: int, context: int):
    bm = BlockManager(n * (MAX_LEN // BLOCK) + 8, BLOCK, enable_prefix_caching=False)
    sched = Scheduler(bm, n, 1 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_LEN - context - 1, ignore_eos=True)
    seqs = []
    for i in range(n):
        s = Sequence(i, str(i), 0, list(range(3, 3 + context)), params, frozenset(), MAX_LEN)
        bm.admit(s, [])
        bm.ensure_slots(s, context)
        s.num_computed_tokens = context - 1
        s.status = SeqStatus.RUNNING
        seqs.append(s)
    return bm, StepInputBuilder(sched), seqs


def _advance(bm: BlockManager, seqs: list[Sequence]) -> ScheduledBatch:
    for s in seqs:
        s.num_computed_tokens = s.num_tokens
        s.token_ids.append(7)
        bm.ensure_slots(s, s.num_tokens)
    return ScheduledBatch(list(seqs), [1] * len(seqs))


def bench(n: int, context: int, steps: int) -> dict[str, float]:
    out: dict[str, list[float]] = {"graph": [], "eager": [], "encode": []}
    width = -(-MAX_LEN // BLOCK)
    builder = PagedAttentionMetadataBuilder([])
    graphs = DecodeGraphs(_NoModel(), builder, torch.device("cpu"), n, MAX_LEN, BLOCK, capture=False)
    bm, inputs, seqs = _setup(n, context)
    tables = BlockTables(width, BLOCK)
    for _ in range(steps):
        batch = _advance(bm, seqs)
        t0 = time.perf_counter()
        assert graphs.can_run(n) and is_greedy_decode(batch)
        step = inputs.build(batch)
        tables.apply(step)
        graphs.prepare(step, tables, tables.rows(step.seq_ids))
        out["graph"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decode(encode(step))
        out["encode"].append(time.perf_counter() - t0)
    bm, inputs, seqs = _setup(n, context)
    tables = BlockTables(width, BLOCK)
    for _ in range(steps):
        batch = _advance(bm, seqs)
        t0 = time.perf_counter()
        step = inputs.build(batch)
        tables.apply(step)
        rows = tables.rows(step.seq_ids)
        qsl, seq_lens, positions = positions_of(step)
        slots = tables.slots(rows, positions)
        w = int(tables.num_blocks[rows].max())
        builder.build(AttentionInputs(
            slot_mapping=torch.from_numpy(slots), block_tables=torch.from_numpy(tables.table[rows, :w]),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)), seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
            max_query_len=1, max_seq_len=int(seq_lens.max())))
        torch.from_numpy(np.asarray(step.token_ids, dtype=np.int64))
        torch.from_numpy(positions)
        torch.tensor((qsl[1:] - 1).tolist())  # the rows whose logits are sampled
        out["eager"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    for n in (1, 32, 256):
        r = bench(n, args.context, args.steps)
        print(f"batch {n:4d}: graph {r['graph']:8.1f} us   eager {r['eager']:8.1f} us   "
              f"encode+decode {r['encode']:7.1f} us")


if __name__ == "__main__":
    main()
