"""CUDA graphs for the forward of eager steps: prefills, prefill chunks beside decodes, and any step the decode and
verify graphs do not take, up to `max_tokens` tokens (ATOM_PREFILL_GRAPH_TOKENS, default 1,024).

Why: an eager forward launches its kernels from Python. On the H200 (2026-12-06, tools/device/prefill_profile.py)
a 128-token prefill of qwen3-8b took 42 ms with FP8 weights and 19 ms in bf16, of which the GPU worked 4.6 / 5.3
ms: ~480 / ~380 launches at 40-90 us of host time each. vLLM replays graphs there (9.1 ms on the H100).

One graph per token bucket T (powers of two from 16 up to max_tokens, and max_tokens) computes the hidden states of
T token entries for up to R = min(max_num_seqs, T) + 1 rows. A step of t <= T tokens in n < R rows puts its tokens in
entries [0, t) and its rows in rows [0, n); the padding entries [t, T) form one padding row n (ids 0, positions 0..
modulo max_model_len, slot -1: no KV written; its own T - t keys over a zeroed block-table row, i.e. block 0: stale
but finite values, as the verify graphs' padding reads); rows past n have no queries (query_start_loc stays at T)
and their attention programs return at once (the (row, query tile) grid of the Triton attention: no rows x
longest-row programs). The metadata says max_query_len = T and max_seq_len = max_model_len, so every kernel
launches for the bucket, not for the step. The host then reads the first t hidden states: the LM head, sampling,
prompt logprobs and speculative verification run as in an eager step (model_runner._execute_eager).

Inputs live in one device byte buffer mirrored by a pinned host buffer (one copy for the token and row fields, one
2-D copy for the block-table rows the step uses):
    ids int64[Tm] | positions int64[Tm] | slots int64[Tm] | (window slots int64[Tm]) | query_start_loc int32[Rm + 1]
    | seq_lens int32[Rm] | (pad to 8 bytes) | block tables int32[Rm, width] | (window tables int32[Rm, width])
for the largest bucket Tm and its rows Rm; a smaller bucket's graph reads prefixes of each field. All graphs share
the decode graphs' memory pool (captured largest first). With capture=False the same buffers and body run without
a graph (CPU tests of the plumbing against the eager path).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from atom.envs import env_int
from atom.forward_context import set_forward_context
from atom.layers.attention import AttentionInputs, AttentionMetadataBuilder
from atom_server.engine.block_tables import BlockTables

logger = logging.getLogger(__name__)

MIN_BUCKET = 16


def max_graph_tokens(max_num_batched_tokens: int) -> int:
    """ATOM_PREFILL_GRAPH_TOKENS (default 1,024; 0: no prefill graphs), at most the step's token budget."""
    return min(env_int("ATOM_PREFILL_GRAPH_TOKENS", 1024, 1 << 16, "tokens"), max_num_batched_tokens)


def token_buckets(max_tokens: int) -> list[int]:
    if max_tokens <= 0:
        return []
    sizes = []
    s = MIN_BUCKET
    while s < max_tokens:
        sizes.append(s)
        s *= 2
    sizes.append(max_tokens)
    return sizes


def rows_of(tokens: int, max_num_seqs: int) -> int:
    """Rows of a bucket: every sequence a step may hold (at most one a token) and the padding row. Never equal to
    the bucket's tokens (the torch attention reads tokens == rows as a decode batch)."""
    rows = min(max_num_seqs, tokens) + 1
    return rows + 1 if rows == tokens else rows


class PrefillGraphs:
    def __init__(self, model, builder: AttentionMetadataBuilder, device: torch.device, max_num_seqs: int,
                 max_model_len: int, block_size: int, max_tokens: int, *,
                 capture_graph: Callable[[str, Callable[[], object]], tuple] | None = None, windowed: bool = False):
        """capture_graph: the decode graphs' (DecodeGraphs.capture_graph: warm-up, then capture into their pool);
        None runs the bodies without capture (ATOM_DECODE_GRAPHS=static)."""
        self.model = model
        self.builder = builder
        self.device = device
        self.capture = capture_graph is not None
        self.sizes = token_buckets(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.rows = {t: rows_of(t, max_num_seqs) for t in self.sizes}
        self.max_model_len = max_model_len
        self.block_size = block_size
        # a padding row of up to max_tokens keys reads that many pages (more than max_model_len's when it is shorter)
        self.width = max(-(-max_model_len // block_size), -(-self.max_tokens // block_size))
        self.windowed = windowed
        tm, rm = self.max_tokens, self.rows[self.max_tokens]
        fields = [("ids", 8, tm), ("positions", 8, tm), ("slots", 8, tm)]
        if windowed:
            fields.append(("window_slots", 8, tm))
        fields += [("qsl", 4, rm + 1), ("seq_lens", 4, rm)]
        offsets, at = {}, 0
        for name, size, count in fields:
            offsets[name] = (at, size, count)
            at += size * count
        self.header_bytes = at = -(-at // 8) * 8
        self.table_at = at
        at += 4 * rm * self.width * (2 if windowed else 1)
        pinned = device.type == "cuda"
        self.dev = torch.zeros(at, dtype=torch.uint8, device=device)
        self.host = torch.zeros(at, dtype=torch.uint8, pin_memory=pinned)
        dtypes = {8: torch.int64, 4: torch.int32}

        def views(raw):
            v = {name: raw[a:a + size * count].view(dtypes[size]) for name, (a, size, count) in offsets.items()}
            tb = 4 * rm * self.width
            v["tables"] = raw[self.table_at:self.table_at + tb].view(torch.int32).view(rm, self.width)
            if windowed:
                v["window_tables"] = raw[self.table_at + tb:self.table_at + 2 * tb].view(torch.int32).view(
                    rm, self.width)
            return v

        self.d, self.h = views(self.dev), views(self.host)
        self.hn = {k: t.numpy() for k, t in self.h.items()}
        self.copied = torch.cuda.Event() if pinned else None
        self.metadata = {t: self.builder.build_for_graph(self._inputs(t)) for t in self.sizes}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays: Counter[int] = Counter()  # replays by bucket
        if capture_graph is not None:
            self._capture(capture_graph)

    def _inputs(self, t: int) -> AttentionInputs:
        d, r = self.d, self.rows[t]
        inputs = AttentionInputs(slot_mapping=d["slots"][:t], block_tables=d["tables"][:r],
                                 query_start_loc=d["qsl"][:r + 1], seq_lens=d["seq_lens"][:r],
                                 max_query_len=t, max_seq_len=self.max_model_len)
        if self.windowed:
            inputs.window_slot_mapping, inputs.window_block_tables = d["window_slots"][:t], d["window_tables"][:r]
        return inputs

    def _body(self, t: int) -> torch.Tensor:
        return self.model(self.d["ids"][:t], self.d["positions"][:t])

    def bucket(self, num_tokens: int, num_rows: int) -> int | None:
        """The bucket that runs a step of num_tokens tokens in num_rows rows, or None (eager)."""
        if num_tokens > self.max_tokens:
            return None
        t = next(s for s in self.sizes if s >= num_tokens)
        return t if num_rows < self.rows[t] else None

    @torch.inference_mode()
    def _capture(self, capture_graph) -> None:
        for t in reversed(self.sizes):  # the largest first, so smaller ones reuse its memory
            # warm-up and capture read one padding row of all t entries (every step rewrites the fields it uses)
            self._write_padding(t, 0, 0)
            self.dev.copy_(self.host)

            def body(t=t, md=self.metadata[t]):
                with set_forward_context(md):
                    return self._body(t)

            self.graphs[t] = capture_graph(f"CUDA graph prefill tokens={t}", body)
        logger.info("captured CUDA graphs for eager steps of up to %s tokens (prefill graphs)", self.sizes)

    def _write_padding(self, t: int, used: int, n: int) -> None:
        """Entries [used, t) as the padding row n (or no padding when used == t); rows past it without queries."""
        hn, r = self.hn, self.rows[t]
        hn["ids"][used:t] = 0
        hn["positions"][used:t] = np.arange(t - used) % self.max_model_len  # within the rope table
        hn["slots"][used:t] = -1
        if self.windowed:
            hn["window_slots"][used:t] = -1
        hn["qsl"][n + 1:r + 1] = t
        hn["seq_lens"][n:r] = 0
        if used < t:
            hn["seq_lens"][n] = t - used
            pages = -(-(t - used) // self.block_size)
            hn["tables"][n, :pages] = 0
            if self.windowed:
                hn["window_tables"][n, :pages] = 0

    def run_step(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, window_slots: np.ndarray | None,
                 qsl: np.ndarray, seq_lens: np.ndarray, tables: BlockTables, rows: np.ndarray, t: int) -> torch.Tensor:
        """run() on the eager forward's inputs: each row's block-table row out of the runner's BlockTables (as wide
        as the widest of its main and window tables)."""
        pages = max(int(tables.num_blocks[rows].max()), 1)
        if self.windowed:
            pages = max(pages, int(tables.window_num_blocks[rows].max()))
        return self.run(ids, positions, slots, window_slots, qsl, seq_lens, tables.table[rows, :pages],
                        tables.window[rows, :pages] if self.windowed else None, t)

    def run(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, window_slots: np.ndarray | None,
            qsl: np.ndarray, seq_lens: np.ndarray, block_rows: np.ndarray, window_rows: np.ndarray | None,
            t: int) -> torch.Tensor:
        """The hidden states [len(ids), H] of a step through bucket t's graph (block_rows: each row's block table,
        [rows, pages]): a view of the graph's output, valid until the next replay of any prefill graph."""
        used, n = len(ids), len(seq_lens)
        r = self.rows[t]
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the pinned buffer
        hn = self.hn
        hn["ids"][:used] = ids
        hn["positions"][:used] = positions
        hn["slots"][:used] = slots
        if self.windowed:
            hn["window_slots"][:used] = window_slots
        hn["qsl"][:n + 1] = qsl
        hn["seq_lens"][:n] = seq_lens
        self._write_padding(t, used, n)
        own = block_rows.shape[1]
        hn["tables"][:n, :own] = block_rows
        if self.windowed:
            hn["window_tables"][:n, :own] = window_rows
        pages = max(own, -(-(t - used) // self.block_size))  # the real rows' pages, the padding row's
        # the token and row fields in one copy (the whole header: a few KB), the used table rows in another
        self.dev[:self.header_bytes].copy_(self.host[:self.header_bytes], non_blocking=True)
        live = min(n + 1, r)
        self.d["tables"][:live, :pages].copy_(self.h["tables"][:live, :pages], non_blocking=True)
        if self.windowed:
            self.d["window_tables"][:live, :pages].copy_(self.h["window_tables"][:live, :pages], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        md = self.metadata[t]
        self.builder.prepare_replay(md, live)
        self.replays[t] += 1
        if not self.capture:
            with set_forward_context(md):
                return self._body(t)[:used]
        graph, hidden = self.graphs[t]
        graph.replay()
        return hidden[:used]
