"""CUDA graphs for decode batches (one token per sequence) and speculative verify batches (q tokens each).

A decode step is one H2D copy, one graph replay and one small D2H copy. Each captured graph runs the
forward, the LM head on every row and the greedy argmax, so plain greedy batches never leave the graph;
other sampling reads the captured logits.

Verify graphs (speculative decoding, `verify_q` = K + 1): one graph per padded batch size runs the target over
q tokens per row (paged attention reads q queries per row: query_start_loc is the static 0, q, 2q, ...) and
writes the logits and greedy argmax of every position into static output buffers shared by all sizes
(logits_out, best_out: one allocation, however many sizes). A row with d < K drafts is padded
at the front: its q - 1 - d extra tokens sit at positions it has already computed and write no KV (slot -1),
so the row's real queries read the cached entries there, and their outputs are ignored (prepare_verify; a row
needs seq_len >= q for that). With `keep_hidden` (the MTP drafter reads them) both kinds also write the hidden
states of every entry into hidden_out.

Inputs live in one device byte buffer, mirrored by one pinned host buffer with the same layout, so the
whole step's input is a single non-blocking copy (the leading `last` field is written by the graphs only).
For n rows and t token entries (t = n, or n * verify_q with verify graphs):
    last int64[t] | ids int64[t] | src int64[t] | positions int64[t] | slots int64[t] | seq_lens int32[n]
    | block tables int32[n, width]
With a window pool (block_manager.py) the sliding-window layers' slots and tables join it:
    ... | slots int64[t] | window slots int64[t] | seq_lens int32[n] | block tables | window tables int32[n, width]
`last` and `ids` form one token array: row i's input token is tokens[src[i]], so a row takes either the
id the host wrote (src = t + i) or the token that the previous graph replay sampled at row j (src = j),
without the host ever seeing it (async scheduling: the next step is launched before this one is read).
Block-table rows are written on the host only when a row's table changed (another sequence in the row, a
replaced table, or more blocks: BlockTables' `state` tells), and only the changed rows are copied. One
graph per padded batch size (and per kind: decode, verify), captured with attention metadata covering
max_model_len, so the same graph serves any context length; padding rows write nowhere (slot -1). Every graph
(and the MTP drafter's, mtp_graphs.py) is captured into one memory pool, largest first. `replays` counts the
replays of each kind and `short_rows` the verify rows padded in front (tests and benchmarks check which path
the steps took).

The inputs come from a StepInput (step_input.py) and the runner's BlockTables; the attention metadata
is made by the attention implementation's builder (`build_for_graph`, once per size, over the static
buffers). With capture=False the same buffers, copies and body run without a graph (each "replay" runs
the body eagerly): CPU tests exercise this input plumbing against the eager path.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

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


# Verify graphs compute K + 1 tokens a row: each costs K + 1 times a decode graph to capture and to pad, so their
# batch buckets are coarser (geometric, ratio <= 1.5 past 16) than the decode graphs' steps of 16.
_VERIFY_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def verify_capture_sizes(max_num_seqs: int, limit: int = 512) -> list[int]:
    top = min(max_num_seqs, limit)
    sizes = [s for s in _VERIFY_BUCKETS if s <= top]
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
    """Typed views over one byte buffer (device or pinned host) in the layout of the module doc: n rows,
    t token entries (t >= n)."""

    def __init__(self, n: int, width: int, device: torch.device, pinned: bool, windowed: bool = False,
                 tokens: int | None = None):
        t = n if tokens is None else tokens
        self.n, self.t, self.width = n, t, width
        self.header_start = 8 * t  # the H2D copy starts after `last`
        w = 8 * t if windowed else 0  # window slots
        self.header_bytes = 40 * t + w + 4 * n
        self.table_bytes = 4 * n * width
        self.nbytes = self.header_bytes + self.table_bytes * (2 if windowed else 1)
        self.raw = torch.zeros(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pinned)
        self.tokens = self.raw[0:16 * t].view(torch.int64)  # last | ids
        self.ids = self.raw[8 * t:16 * t].view(torch.int64)
        self.src = self.raw[16 * t:24 * t].view(torch.int64)
        self.positions = self.raw[24 * t:32 * t].view(torch.int64)
        self.slots = self.raw[32 * t:40 * t].view(torch.int64)
        self.window_slots = self.raw[40 * t:40 * t + w].view(torch.int64) if windowed else None
        self.seq_lens = self.raw[40 * t + w:40 * t + w + 4 * n].view(torch.int32)
        h, tb = self.header_bytes, self.table_bytes
        self.tables = self.raw[h:h + tb].view(torch.int32).view(n, width)
        self.window_tables = self.raw[h + tb:h + 2 * tb].view(torch.int32).view(n, width) if windowed else None

    def row_bytes(self, lo: int, hi: int, window: bool = False) -> tuple[int, int]:
        """Byte range of block-table rows [lo, hi) (window: of the window tables)."""
        start = self.header_bytes + (self.table_bytes if window else 0)
        return start + 4 * lo * self.width, start + 4 * hi * self.width


class DecodeGraphs:
    def __init__(self, model, builder: AttentionMetadataBuilder, device: torch.device, max_num_seqs: int,
                 max_model_len: int, block_size: int, capture: bool = True, windowed: bool = False, *,
                 sizes: list[int] | None = None, verify_q: int | None = None, keep_hidden: bool = False):
        """sizes: the decode graphs' batch sizes (default capture_sizes). verify_q: also verify graphs of that many
        tokens per row (K + 1), at verify_capture_sizes. keep_hidden: decode graphs write their hidden states into
        hidden_out too (what the MTP drafter reads)."""
        self.model = model
        self.builder = builder
        self.device = device
        self.capture = capture
        self.sizes = sizes or capture_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.verify_q = verify_q
        self.verify_sizes = verify_capture_sizes(max_num_seqs) if verify_q else []
        self.max_verify_bs = self.verify_sizes[-1] if verify_q else 0
        n = max(self.max_bs, self.max_verify_bs)
        t = max(n, self.max_verify_bs * (verify_q or 1))
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.width = -(-max_model_len // block_size)
        pinned = device.type == "cuda"
        self.windowed = windowed
        self.dev = _IOBuffers(n, self.width, device, pinned=False, windowed=windowed, tokens=t)
        self.host = _IOBuffers(n, self.width, torch.device("cpu"), pinned=pinned, windowed=windowed, tokens=t)
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
        self.own_src = np.arange(t, 2 * t, dtype=np.int64)  # token i reads the id the host wrote
        self.h_src[:] = self.own_src
        self.dev.src.copy_(h.src)
        self._src_own = True  # h_src holds own_src in every entry
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
        # Outputs every graph of a kind writes (one allocation for all sizes), allocated by the first body that
        # writes them (the warm-up of the largest graph when capturing), in the dtype and width the model gives.
        self.keep_hidden = keep_hidden
        self.hidden_out: torch.Tensor | None = None
        self.logits_out: torch.Tensor | None = None
        self.best_out = torch.zeros(max(self.max_verify_bs * (verify_q or 1), 1), dtype=torch.int64, device=device)
        if verify_q:
            self._q_range = np.arange(verify_q, dtype=np.int64)
            self.verify_qsl = torch.arange(0, (n + 1) * verify_q, verify_q, dtype=torch.int32, device=device)
            self.verify_metadata = {bs: self.builder.build_for_graph(self._verify_inputs(bs))
                                    for bs in self.verify_sizes}
        # bs -> (graph, logits [bs, V], greedy tokens [bs]); empty without capture
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.verify_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays: Counter[str] = Counter()  # replays by kind ("decode", "verify"; the MTP graphs add theirs)
        self.short_rows = 0  # rows of verify replays with fewer than K drafts (padded in front)
        self.pool = None
        # Tensor parallel: every rank captures the same sizes in the same order, the collectives inside (the
        # warm-up runs them eagerly first, so the communicators exist). NCCL's watchdog thread queries CUDA
        # events meanwhile: only this thread's calls may be held against the capture.
        self.capture_mode = "thread_local" if get_tp_group().world_size > 1 else "global"
        if capture:
            self.pool = torch.cuda.graph_pool_handle()
            self._capture()

    def _inputs(self, bs: int) -> AttentionInputs:
        d = self.dev
        inputs = AttentionInputs(slot_mapping=d.slots[:bs], block_tables=d.tables[:bs],
                                 query_start_loc=self.qsl[:bs + 1], seq_lens=d.seq_lens[:bs],
                                 max_query_len=1, max_seq_len=self.max_model_len)
        if self.windowed:
            inputs.window_slot_mapping, inputs.window_block_tables = d.window_slots[:bs], d.window_tables[:bs]
        return inputs

    def _verify_inputs(self, bs: int) -> AttentionInputs:
        d = self.dev
        t = bs * self.verify_q
        inputs = AttentionInputs(slot_mapping=d.slots[:t], block_tables=d.tables[:bs],
                                 query_start_loc=self.verify_qsl[:bs + 1], seq_lens=d.seq_lens[:bs],
                                 max_query_len=self.verify_q, max_seq_len=self.max_model_len)
        if self.windowed:
            inputs.window_slot_mapping, inputs.window_block_tables = d.window_slots[:t], d.window_tables[:bs]
        return inputs

    def _body(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dev
        ids = d.tokens[d.src[:bs]]
        hidden = self.model(ids, d.positions[:bs])
        if self.keep_hidden:
            self._keep(hidden, bs)
        logits = self.model.compute_logits(hidden)
        tokens = logits.argmax(dim=-1)
        d.tokens[:bs].copy_(tokens)  # `last`, for a next step launched before the host reads these
        return logits, tokens

    def _verify_body(self, bs: int) -> None:
        d = self.dev
        t = bs * self.verify_q
        hidden = self.model(d.ids[:t], d.positions[:t])
        logits = self.model.compute_logits(hidden)
        if self.logits_out is None:
            self.logits_out = torch.empty(self.best_out.shape[0], logits.shape[-1], dtype=logits.dtype,
                                          device=logits.device)
        if self.keep_hidden:
            self._keep(hidden, t)
        self.logits_out[:t].copy_(logits)
        self.best_out[:t].copy_(logits.argmax(dim=-1))

    def _keep(self, hidden: torch.Tensor, count: int) -> None:
        if self.hidden_out is None:
            self.hidden_out = torch.zeros(self.dev.t, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        self.hidden_out[:count].copy_(hidden)

    def capture_graph(self, label: str, body: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
        """Warm up body (autotuning, lazy init, Triton JIT of this shape's specialisations), then capture it into
        the shared pool; returns (graph, what the captured body returned). body sets its own forward context."""
        with startup.subphase(label):
            body()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=self.capture_mode):
                out = body()
            torch.cuda.synchronize()
        return graph, out

    def _in_context(self, md, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            with set_forward_context(md):
                return fn()
        return run

    @torch.inference_mode()
    def _capture(self) -> None:
        if self.verify_q:  # the largest graphs first, so smaller ones reuse their memory
            # warm-ups (and the MTP graphs' after these): a verify row's q queries at positions >= 0; every step
            # rewrites the lengths before its replay
            self.dev.seq_lens.fill_(self.verify_q)
            for bs in reversed(self.verify_sizes):
                graph, _ = self.capture_graph(f"CUDA graph verify bs={bs} q={self.verify_q}", self._in_context(
                    self.verify_metadata[bs], lambda bs=bs: self._verify_body(bs)))
                self.verify_graphs[bs] = graph
        for bs in reversed(self.sizes):
            graph, (logits, tokens) = self.capture_graph(f"CUDA graph bs={bs}", self._in_context(
                self.metadata[bs], lambda bs=bs: self._body(bs)))
            self.graphs[bs] = (graph, logits, tokens)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)
        if self.verify_q:
            logger.info("captured CUDA graphs for speculative verify steps (%d tokens per row) at batch sizes %s; "
                        "their logits buffer: %.2f GiB", self.verify_q, self.verify_sizes,
                        self.logits_out.numel() * self.logits_out.element_size() / (1 << 30))

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs

    def padded(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def verify_padded(self, n: int) -> int:
        return next(s for s in self.verify_sizes if s >= n)

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
        else:
            self._own_sources()
        if bs > n:  # padding rows: write nowhere, attend to one (any) cached slot
            self.h_slots[n:bs] = -1
            if self.windowed:
                self.h_wslots[n:bs] = -1
            lens[n:bs] = 1
            self.h_src[n:bs] = self.own_src[n:bs]
            ids[n:bs] = 0
        self._copy_inputs(n, tables, rows)
        return bs

    def prepare_verify(self, step: StepInput, tables: BlockTables, rows: np.ndarray) -> tuple[int, np.ndarray]:
        """Write the inputs of a verify step (row i computes q_i = 1 + its drafts <= verify_q tokens, and has
        seq_len >= verify_q) in the verify graphs' layout: row i's tokens are entries i * q .. i * q + q - 1, its
        real ones last. Returns (padded batch size, the entry of each of the step's tokens)."""
        q = self.verify_q
        n = step.num_rows
        bs = self.verify_padded(n)
        t = bs * q
        self.copied.synchronize()
        qsl = np.asarray(step.query_start_loc, dtype=np.int64)
        q_lens = np.diff(qsl)
        seq_lens = np.asarray(step.seq_lens, dtype=np.int64)
        self.h_lens[:n] = seq_lens
        self.h_lens[n:bs] = q  # padding rows: q queries over q (stale but valid) cached slots, writing nowhere
        pos = self.h_pos[:t].reshape(bs, q)
        pos[:n] = seq_lens[:, None] - q + self._q_range
        pos[n:] = self._q_range
        block, offset = np.divmod(pos[:n], self.block_size)
        pad = self._q_range[None, :] < (q - q_lens)[:, None]  # [n, q]: the front padding of short rows
        slots = self.h_slots[:t].reshape(bs, q)
        slots[:n] = tables.table[rows[:, None], block].astype(np.int64) * self.block_size + offset
        slots[:n][pad] = -1
        slots[n:] = -1
        if self.windowed:
            wslots = self.h_wslots[:t].reshape(bs, q)
            wslots[:n] = tables.window[rows[:, None], block].astype(np.int64) * self.block_size + offset
            wslots[:n][pad] = -1
            wslots[n:] = -1
        entries = np.repeat(np.arange(n, dtype=np.int64) * q + q - q_lens - qsl[:-1], q_lens) + np.arange(qsl[-1])
        ids = self.h_ids[:t]
        ids[:] = 0
        ids[entries] = step.token_ids
        self._own_sources()
        self._copy_inputs(n, tables, rows)
        self.short_rows += int((q_lens < q).sum())
        return bs, entries

    def _own_sources(self) -> None:
        if not self._src_own:
            self.h_src[:] = self.own_src
            self._src_own = True

    def _copy_inputs(self, n: int, tables: BlockTables, rows: np.ndarray) -> None:
        """Copy the header and the block-table rows that changed since the device got them."""
        state = tables.state[rows]
        changed = np.flatnonzero(self.row_state[:n] != state)
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

    def replay(self, bs: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the graph of padded size bs (n real rows) on the prepared inputs: (logits [bs, V], greedy
        tokens [bs])."""
        md = self.metadata[bs]
        self.builder.prepare_replay(md, n)
        self.replays["decode"] += 1
        if not self.capture:
            with set_forward_context(md):
                return self._body(bs)
        graph, logits, tokens = self.graphs[bs]
        graph.replay()
        return logits, tokens

    def replay_verify(self, bs: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the verify graph of padded size bs (n real rows) on the prepared inputs: (logits [bs * q, V],
        greedy tokens [bs * q]) of every entry (views of the shared outputs; with keep_hidden, hidden_out holds the
        hidden states)."""
        md = self.verify_metadata[bs]
        self.builder.prepare_replay(md, n)
        self.replays["verify"] += 1
        if self.capture:
            self.verify_graphs[bs].replay()
        else:
            with set_forward_context(md):
                self._verify_body(bs)
        t = bs * self.verify_q
        return self.logits_out[:t], self.best_out[:t]

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
