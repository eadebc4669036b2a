"""CUDA graphs for decode-only batches (one token per sequence).

A decode step is one H2D copy, one graph replay and one small D2H copy. Each captured graph runs the
forward, the LM head on every row and the greedy argmax, so plain greedy batches never leave the graph;
other sampling reads the captured logits.

Inputs live in one device byte buffer, mirrored by one pinned host buffer with the same layout, so the
whole step's input is a single non-blocking copy (the leading `last` field is written by the graphs only):
    last int64[n] | ids int64[n] | src int64[n] | positions int64[n] | slots int64[n] | seq_lens int32[n]
    | block tables int32[n, width]
With a window pool (block_manager.py) the sliding-window layers' slots and tables join it:
    ... | slots int64[n] | window slots int64[n] | seq_lens int32[n] | block tables | window tables int32[n, width]
`last` and `ids` form one token array: row i's input token is tokens[src[i]], so a row takes either the
id the host wrote (src = n + i) or the token that the previous graph replay sampled at row j (src = j),
without the host ever seeing it (async scheduling: the next step is launched before this one is read).
Block-table rows are written on the host only when a row's table changed (another sequence in the row, a
replaced table, or more blocks: BlockTables' `state` tells), and only the changed rows are copied. One
graph per padded batch size, captured with attention metadata covering max_model_len, so the same graph
serves any context length; padding rows write nowhere (slot -1).

The inputs come from a StepInput (step_input.py) and the runner's BlockTables; the attention metadata
is made by the attention implementation's builder (`build_for_graph`, once per size, over the static
buffers). With capture=False the same buffers, copies and body run without a graph (each "replay" runs
the body eagerly): CPU tests exercise this input plumbing against the eager path.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from atom.distributed import get_tp_group
from atom.forward_context import set_forward_context
from atom.layers.attention import AttentionInputs, AttentionMetadataBuilder
from atom_server import startup
from atom_server.engine.block_tables import BlockTables
from atom_server.engine.step_input import StepInput

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, limit: int = 512) -> list[int]:
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


class _HostEvent:
    """What a CUDA event gives the host, for devices whose copies are synchronous (CPU)."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _event(device: torch.device):
    return torch.cuda.Event() if device.type == "cuda" else _HostEvent()


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges in increasing order with touching ones joined (fewer copies)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class _IOBuffers:
    """Typed views over one byte buffer (device or pinned host) in the layout of the module doc."""

    def __init__(self, n: int, width: int, device: torch.device, pinned: bool, windowed: bool = False):
        self.n, self.width = n, width
        self.header_start = 8 * n  # the H2D copy starts after `last`
        w = 8 * n if windowed else 0  # window slots
        self.header_bytes = 44 * n + w
        self.table_bytes = 4 * n * width
        self.nbytes = self.header_bytes + self.table_bytes * (2 if windowed else 1)
        self.raw = torch.zeros(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pinned)
        self.tokens = self.raw[0:16 * n].view(torch.int64)  # last | ids
        self.ids = self.raw[8 * n:16 * n].view(torch.int64)
        self.src = self.raw[16 * n:24 * n].view(torch.int64)
        self.positions = self.raw[24 * n:32 * n].view(torch.int64)
        self.slots = self.raw[32 * n:40 * n].view(torch.int64)
        self.window_slots = self.raw[40 * n:40 * n + w].view(torch.int64) if windowed else None
        self.seq_lens = self.raw[40 * n + w:44 * n + w].view(torch.int32)
        h, t = self.header_bytes, self.table_bytes
        self.tables = self.raw[h:h + t].view(torch.int32).view(n, width)
        self.window_tables = self.raw[h + t:h + 2 * t].view(torch.int32).view(n, width) if windowed else None

    def row_bytes(self, lo: int, hi: int, window: bool = False) -> tuple[int, int]:
        """Byte range of block-table rows [lo, hi) (window: of the window tables)."""
        start = self.header_bytes + (self.table_bytes if window else 0)
        return start + 4 * lo * self.width, start + 4 * hi * self.width


class DecodeGraphs:
    def __init__(self, model, builder: AttentionMetadataBuilder, device: torch.device, max_num_seqs: int,
                 max_model_len: int, block_size: int, capture: bool = True, windowed: bool = False):
        self.model = model
        self.builder = builder
        self.device = device
        self.capture = capture
        self.sizes = capture_sizes(max_num_seqs)
        self.max_bs = n = self.sizes[-1]
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.width = -(-max_model_len // block_size)
        pinned = device.type == "cuda"
        self.windowed = windowed
        self.dev = _IOBuffers(n, self.width, device, pinned=False, windowed=windowed)
        self.host = _IOBuffers(n, self.width, torch.device("cpu"), pinned=pinned, windowed=windowed)
        self.dev.slots.fill_(-1)
        self.dev.seq_lens.fill_(1)
        h = self.host
        self.h_ids, self.h_pos, self.h_slots, self.h_lens = (h.ids.numpy(), h.positions.numpy(), h.slots.numpy(),
                                                             h.seq_lens.numpy())
        self.h_src = h.src.numpy()
        self.h_tables = h.tables.numpy()
        if windowed:
            self.dev.window_slots.fill_(-1)
            self.h_wslots, self.h_wtables = h.window_slots.numpy(), h.window_tables.numpy()
            self.h_wslots[:] = -1
        self.h_slots[:] = -1
        self.h_lens[:] = 1
        self.own_src = np.arange(n, 2 * n, dtype=np.int64)  # row i reads the id the host wrote
        self.h_src[:] = self.own_src
        self.dev.src.copy_(h.src)
        self._src_own = True  # h_src holds own_src in every row
        hs, he = h.header_start, h.header_bytes
        self._header = (self.dev.raw[hs:he], h.raw[hs:he])  # the part of the layout copied every step
        # What the device's block-table rows hold: the BlockTables state they were copied from (0: nothing).
        self.row_state = np.zeros(n, dtype=np.int64)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Two pinned landing buffers for sampled tokens: one step's copy may be pending while the next runs.
        self.tokens_host = [torch.zeros(n, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self.tokens_ready = [_event(device) for _ in range(2)]
        self._turn = 0
        self.copied = _event(device)  # the last H2D copy is done: the pinned buffer may be rewritten
        self.metadata = {bs: self.builder.build_for_graph(self._inputs(bs)) for bs in self.sizes}
        # bs -> (graph, logits [bs, V], greedy tokens [bs]); empty without capture
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        if capture:
            self._capture()

    def _inputs(self, bs: int) -> AttentionInputs:
        d = self.dev
        inputs = AttentionInputs(slot_mapping=d.slots[:bs], block_tables=d.tables[:bs],
                                 query_start_loc=self.qsl[:bs + 1], seq_lens=d.seq_lens[:bs],
                                 max_query_len=1, max_seq_len=self.max_model_len)
        if self.windowed:
            inputs.window_slot_mapping, inputs.window_block_tables = d.window_slots[:bs], d.window_tables[:bs]
        return inputs

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
        # Tensor parallel: every rank captures the same sizes in the same order, the collectives inside (the
        # warm-up runs them eagerly first, so the communicators exist). NCCL's watchdog thread queries CUDA
        # events meanwhile: only this thread's calls may be held against the capture.
        mode = "thread_local" if get_tp_group().world_size > 1 else "global"
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            with startup.subphase(f"CUDA graph bs={bs}"), set_forward_context(self.metadata[bs]):
                self._body(bs)  # warm-up (autotuning, lazy init, Triton JIT of this size's specialisations)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                    logits, tokens = self._body(bs)
                torch.cuda.synchronize()
            self.graphs[bs] = (graph, logits, tokens)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs

    def padded(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def prepare(self, step: StepInput, tables: BlockTables, rows: np.ndarray) -> int:
        """Write the inputs of a decode step (every row computes its last token; rows: each row's
        BlockTables row) and copy them to the device. A row with step.prev_rows[i] >= 0 takes the token
        the previous replay sampled in that row. Returns the padded batch size."""
        n = step.num_rows
        bs = self.padded(n)
        self.copied.synchronize()  # the previous copy has left the pinned buffer
        lens = self.h_lens
        lens[:n] = step.seq_lens
        pos = self.h_pos[:n]
        np.subtract(lens[:n], 1, out=pos, casting="unsafe")
        block, offset = np.divmod(pos, self.block_size)
        slots = self.h_slots[:n]
        np.multiply(tables.table[rows, block], self.block_size, out=slots, casting="unsafe")
        slots += offset
        if self.windowed:
            wslots = self.h_wslots[:n]
            np.multiply(tables.window[rows, block], self.block_size, out=wslots, casting="unsafe")
            wslots += offset
        ids = self.h_ids
        ids[:n] = step.token_ids
        if step.prev_rows is not None:
            prev = np.asarray(step.prev_rows, dtype=np.int64)
            self.h_src[:n] = np.where(prev >= 0, prev, self.own_src[:n])
            # A pending row's id is the -1 placeholder; the graph reads the previous replay's token instead,
            # but the slot stays in ids and a later, smaller step can read it as a padding row: never
            # leave an id the embedding cannot look up.
            np.maximum(ids[:n], 0, out=ids[:n])
            self._src_own = False
        elif not self._src_own:
            self.h_src[:] = self.own_src
            self._src_own = True
        state = tables.state[rows]
        changed = np.flatnonzero(self.row_state[:n] != state)
        if bs > n:  # padding rows: write nowhere, attend to one (any) cached slot
            self.h_slots[n:bs] = -1
            if self.windowed:
                self.h_wslots[n:bs] = -1
            lens[n:bs] = 1
            self.h_src[n:bs] = self.own_src[n:bs]
            ids[n:bs] = 0
        if changed.size:
            self.h_tables[changed] = tables.table[rows[changed]]
            ranges = [(self.host.header_start, self.host.header_bytes),
                      self.host.row_bytes(int(changed[0]), int(changed[-1]) + 1)]
            if self.windowed:
                self.h_wtables[changed] = tables.window[rows[changed]]
                ranges.append(self.host.row_bytes(int(changed[0]), int(changed[-1]) + 1, window=True))
            self.row_state[changed] = state[changed]
            d, h = self.dev.raw, self.host.raw
            for a, b in _merged(ranges):
                d[a:b].copy_(h[a:b], non_blocking=True)
        else:
            self._header[0].copy_(self._header[1], non_blocking=True)
        self.copied.record()
        return bs

    def replay(self, bs: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the graph of padded size bs (n real rows) on the prepared inputs: (logits [bs, V], greedy
        tokens [bs])."""
        md = self.metadata[bs]
        self.builder.prepare_replay(md, n)
        if not self.capture:
            with set_forward_context(md):
                return self._body(bs)
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
