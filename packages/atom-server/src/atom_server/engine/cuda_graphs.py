"""CUDA graphs for decode-only batches (one token per sequence): launch-bound small batches replay a
captured forward instead of hundreds of kernel launches.

One graph per padded batch size, captured with attention metadata that covers max_model_len so the
same graph serves any context length; padding rows write nowhere (slot -1) and are ignored.
"""

from __future__ import annotations

import logging

import torch

from atom.forward_context import set_forward_context
from atom.layers.attention import PagedAttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, limit: int = 256) -> list[int]:
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    def __init__(self, model, device: torch.device, max_num_seqs: int, max_model_len: int, block_size: int):
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        width = -(-max_model_len // block_size)
        n = self.max_bs
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture()

    def _metadata(self, bs: int) -> PagedAttentionMetadata:
        return PagedAttentionMetadata(slot_mapping=self.slots[:bs], block_tables=self.tables[:bs],
                                      query_start_loc=self.qsl[:bs + 1], seq_lens=self.seq_lens[:bs],
                                      max_query_len=1, max_seq_len=self.max_model_len)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            md = self._metadata(bs)
            with set_forward_context(md):
                self.model(self.ids[:bs], self.positions[:bs])  # warm-up (autotuning, lazy init)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.model(self.ids[:bs], self.positions[:bs])
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs

    def run(self, ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        n = len(ids)
        bs = next(s for s in self.sizes if s >= n)
        width = max(len(t) for t in tables)
        self.ids[:n].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        self.slots[:n].copy_(torch.tensor(slots), non_blocking=True)
        self.seq_lens[:n].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        self.tables[:n, :width].copy_(torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                                      non_blocking=True)
        if bs > n:  # padding rows: write nowhere, attend to one (any) cached slot
            self.slots[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        graph, out = self.graphs[bs]
        graph.replay()
        return out[:n]
