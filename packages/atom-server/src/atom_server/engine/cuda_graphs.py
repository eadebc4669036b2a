"""CUDA graphs for decode-only batches (one token per sequence).

A decode step is one H2D copy, one graph replay and one small D2H copy. Each captured graph runs the
forward, the LM head on every row and the greedy argmax, so plain greedy batches never leave the graph;
other sampling reads the captured logits.

Inputs live in one device byte buffer, mirrored by one pinned host buffer with the same layout, so the
whole step's input is a single non-blocking copy (the leading `last` field is written by the graphs only):
    last int64[n] | ids int64[n] | src int64[n] | positions int64[n] | slots int64[n] | seq_lens int32[n]
    | block tables int32[n, width]
`last` and `ids` form one token array: row i's input token is tokens[src[i]], so a row takes either the
id the host wrote (src = n + i) or the token that the previous graph replay sampled at row j (src = j),
without the host ever seeing it (async scheduling: the next step is launched before this one is read).
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
        self.header_start = 8 * n  # the H2D copy starts after `last`
        self.header_bytes = 44 * n
        self.nbytes = self.header_bytes + 4 * n * width
        self.raw = torch.zeros(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pinned)
        self.tokens = self.raw[0:16 * n].view(torch.int64)  # last | ids
        self.ids = self.raw[8 * n:16 * n].view(torch.int64)
        self.src = self.raw[16 * n:24 * n].view(torch.int64)
        self.positions = self.raw[24 * n:32 * n].view(torch.int64)
        self.slots = self.raw[32 * n:40 * n].view(torch.int64)
        self.seq_lens = self.raw[40 * n:44 * n].view(torch.int32)
        self.tables = self.raw[44 * n:].view(torch.int32).view(n, width)

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
        self.h_src = h.src.numpy()
        self.h_tables = h.tables.numpy()
        self.h_slots[:] = -1
        self.h_lens[:] = 1
        self.h_src[:] = range(n, 2 * n)
        self.dev.src.copy_(h.src)
        # What the device's block-table rows hold: (seq id, table generation) and how many entries.
        self.row_owner: list[tuple[int, int] | None] = [None] * n
        self.row_blocks = [0] * n
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Two pinned landing buffers for sampled tokens: one step's copy may be pending while the next runs.
        self.tokens_host = [torch.zeros(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.tokens_ready = [torch.cuda.Event() for _ in range(2)]
        self._turn = 0
        self.copied = torch.cuda.Event()  # the last H2D copy is done: the pinned buffer may be rewritten
        # bs -> (graph, logits [bs, V], greedy tokens [bs])
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._capture()

    def _metadata(self, bs: int) -> PagedAttentionMetadata:
        d = self.dev
        return PagedAttentionMetadata(slot_mapping=d.slots[:bs], block_tables=d.tables[:bs],
                                      query_start_loc=self.qsl[:bs + 1], seq_lens=d.seq_lens[:bs],
                                      max_query_len=1, max_seq_len=self.max_model_len)

    def _body(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dev
        ids = d.tokens[d.src[:bs]]
        hidden = self.model(ids, d.positions[:bs])
        logits = self.model.compute_logits(hidden)
        tokens = logits.argmax(dim=-1)
        d.tokens[:bs].copy_(tokens)  # `last`, for a next step launched before the host reads these
        return logits, tokens

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

    def prepare(self, seqs, prev_rows: dict[int, int] | None = None) -> int:
        """Write the decode inputs of seqs (each computes its last token) and copy them to the device.
        A sequence whose last token is still pending takes the token the previous replay sampled in its
        row (prev_rows: seq id -> row). Returns the padded batch size."""
        n = len(seqs)
        bs = self.padded(n)
        self.copied.synchronize()  # the previous copy has left the pinned buffer
        B = self.block_size
        ids, pos, slots, lens, tables = self.h_ids, self.h_pos, self.h_slots, self.h_lens, self.h_tables
        src, base = self.h_src, self.max_bs
        owner, nblocks = self.row_owner, self.row_blocks
        lo, hi = n, 0
        for i, s in enumerate(seqs):
            toks = s.token_ids
            length = len(toks)
            p = length - 1
            table = s.block_table
            if s.pending:
                src[i] = prev_rows[s.seq_id]
            else:
                src[i] = base + i
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
            src[n:bs] = range(base + n, base + bs)
        d, h = self.dev.raw, self.host.raw
        start, end = self.host.header_start, self.host.header_bytes
        if hi > lo:
            a, b = self.host.row_bytes(lo, hi)
            if a == end:  # contiguous with the header: one copy
                end = b
            else:
                d[a:b].copy_(h[a:b], non_blocking=True)
        d[start:end].copy_(h[start:end], non_blocking=True)
        self.copied.record()
        return bs

    def replay(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the graph of padded size bs on the prepared inputs: (logits [bs, V], greedy tokens [bs])."""
        graph, logits, tokens = self.graphs[bs]
        graph.replay()
        return logits, tokens

    def fetch_tokens(self, tokens: torch.Tensor, n: int) -> int:
        """Start the D2H copy of n greedy tokens; returns a ticket for tokens_list()."""
        t = self._turn
        self._turn ^= 1
        self.tokens_ready[t].synchronize()  # its last reader is done (a no-op unless the caller skipped one)
        self.tokens_host[t][:n].copy_(tokens[:n], non_blocking=True)
        self.tokens_ready[t].record()
        return t

    def tokens_list(self, ticket: int, n: int) -> list[int]:
        self.tokens_ready[ticket].synchronize()
        return self.tokens_host[ticket][:n].tolist()
