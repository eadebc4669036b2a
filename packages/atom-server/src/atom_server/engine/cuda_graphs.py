"""CUDA graphs for decode-only batches (one token per sequence).

A decode step is one H2D copy, one graph replay and one small D2H copy. Each captured graph runs the
forward, the LM head on every row and the greedy argmax, so plain greedy batches never leave the graph;
other sampling reads the captured logits.

Inputs live in one device byte buffer, mirrored by one pinned host buffer with the same layout, so the
whole step's input is a single non-blocking copy:
    ids int64[n] | positions int64[n] | slots int64[n] | seq_lens int32[n] | block tables int32[n, width]
Block-table rows are written on the host only when a row's sequence or its block count changed, and only
the changed rows are copied. One graph per padded batch size, captured with attention metadata covering
max_model_len, so the same graph serves any context length; padding rows write nowhere (slot -1).
"""

from __future__ import annotations

import logging

import torch

from atom.forward_context import set_forward_context
from atom.layers.attention import PagedAttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, limit: int = 512) -> list[int]:
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


class _IOBuffers:
    """Typed views over one byte buffer (device or pinned host) in the layout of the module doc."""

    def __init__(self, n: int, width: int, device: torch.device, pinned: bool):
        self.n, self.width = n, width
        self.header_bytes = 28 * n
        self.nbytes = self.header_bytes + 4 * n * width
        self.raw = torch.zeros(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pinned)
        self.ids = self.raw[0:8 * n].view(torch.int64)
        self.positions = self.raw[8 * n:16 * n].view(torch.int64)
        self.slots = self.raw[16 * n:24 * n].view(torch.int64)
        self.seq_lens = self.raw[24 * n:28 * n].view(torch.int32)
        self.tables = self.raw[28 * n:].view(torch.int32).view(n, width)

    def row_bytes(self, lo: int, hi: int) -> tuple[int, int]:
        """Byte range of block-table rows [lo, hi)."""
        return self.header_bytes + 4 * lo * self.width, self.header_bytes + 4 * hi * self.width


class DecodeGraphs:
    def __init__(self, model, device: torch.device, max_num_seqs: int, max_model_len: int, block_size: int):
        self.model = model
        self.device = device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_bs = n = self.sizes[-1]
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.width = -(-max_model_len // block_size)
        self.dev = _IOBuffers(n, self.width, device, pinned=False)
        self.host = _IOBuffers(n, self.width, torch.device("cpu"), pinned=True)
        self.dev.slots.fill_(-1)
        self.dev.seq_lens.fill_(1)
        h = self.host
        self.h_ids, self.h_pos, self.h_slots, self.h_lens = (h.ids.numpy(), h.positions.numpy(), h.slots.numpy(),
                                                             h.seq_lens.numpy())
        self.h_tables = h.tables.numpy()
        self.h_slots[:] = -1
        self.h_lens[:] = 1
        # What the device's block-table rows hold: (seq id, table generation) and how many entries.
        self.row_owner: list[tuple[int, int] | None] = [None] * n
        self.row_blocks = [0] * n
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.tokens_host = torch.zeros(n, dtype=torch.int64, pin_memory=True)
        self.tokens_host_np = self.tokens_host.numpy()
        self.copied = torch.cuda.Event()  # the last H2D copy is done: the pinned buffer may be rewritten
        self.tokens_ready = torch.cuda.Event()
        # bs -> (graph, logits [bs, V], greedy tokens [bs])
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._capture()

    def _metadata(self, bs: int) -> PagedAttentionMetadata:
        d = self.dev
        return PagedAttentionMetadata(slot_mapping=d.slots[:bs], block_tables=d.tables[:bs],
                                      query_start_loc=self.qsl[:bs + 1], seq_lens=d.seq_lens[:bs],
                                      max_query_len=1, max_seq_len=self.max_model_len)

    def _body(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(self.dev.ids[:bs], self.dev.positions[:bs])
        logits = self.model.compute_logits(hidden)
        return logits, logits.argmax(dim=-1)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            with set_forward_context(self._metadata(bs)):
                self._body(bs)  # warm-up (autotuning, lazy init)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits, tokens = self._body(bs)
            self.graphs[bs] = (graph, logits, tokens)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs

    def padded(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def prepare(self, seqs) -> int:
        """Write the decode inputs of seqs (each computes its last token) and copy them to the device.
        Returns the padded batch size."""
        n = len(seqs)
        bs = self.padded(n)
        self.copied.synchronize()  # the previous copy has left the pinned buffer
        B = self.block_size
        ids, pos, slots, lens, tables = self.h_ids, self.h_pos, self.h_slots, self.h_lens, self.h_tables
        owner, nblocks = self.row_owner, self.row_blocks
        lo, hi = n, 0
        for i, s in enumerate(seqs):
            toks = s.token_ids
            length = len(toks)
            p = length - 1
            table = s.block_table
            ids[i] = toks[p]
            pos[i] = p
            lens[i] = length
            slots[i] = table[p // B] * B + p % B
            nb = len(table)
            key = (s.seq_id, s.table_gen)
            if owner[i] != key:
                tables[i, :nb] = table
                owner[i], nblocks[i] = key, nb
            elif nblocks[i] != nb:
                tables[i, nblocks[i]:nb] = table[nblocks[i]:nb]
                nblocks[i] = nb
            else:
                continue
            lo = min(lo, i)
            hi = i + 1
        if bs > n:  # padding rows: write nowhere, attend to one (any) cached slot
            slots[n:bs] = -1
            lens[n:bs] = 1
        d, h = self.dev.raw, self.host.raw
        end = self.host.header_bytes
        if hi > lo:
            a, b = self.host.row_bytes(lo, hi)
            if a == end:  # contiguous with the header: one copy
                end = b
            else:
                d[a:b].copy_(h[a:b], non_blocking=True)
        d[:end].copy_(h[:end], non_blocking=True)
        self.copied.record()
        return bs

    def replay(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the graph of padded size bs on the prepared inputs: (logits [bs, V], greedy tokens [bs])."""
        graph, logits, tokens = self.graphs[bs]
        graph.replay()
        return logits, tokens

    def fetch_tokens(self, tokens: torch.Tensor, n: int) -> None:
        """Start the D2H copy of n greedy tokens; read them with tokens_list() after."""
        self.tokens_host[:n].copy_(tokens[:n], non_blocking=True)
        self.tokens_ready.record()

    def tokens_list(self, n: int) -> list[int]:
        self.tokens_ready.synchronize()
        return self.tokens_host_np[:n].tolist()
