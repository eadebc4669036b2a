"""CUDA graphs of the MTP drafter (mtp_drafter.py), beside the target's decode and verify graphs (cuda_graphs.py).

Two kinds, captured after the target's graphs into their memory pool:
- first pass, per (batch size, q) for q = 1 (after a decode graph) and q = verify_q (after a verify graph): the
  MTP layer over every entry of the target graph's layout, on the same static positions and attention metadata
  (so the same slots and block tables), reading the target's hidden states (DecodeGraphs.hidden_out) and the
  token after each entry (`nxt`, written by the host once verification has decided each row's stop and new
  token); it writes mtp_hidden;
- drafts, per batch size: from each row's stop entry (`stop`), K times the MTP head's argmax and, but the last
  time, the MTP layer over that draft at the next position (one token per row, its own metadata per draft
  step: `chain_*`, written by the host; a row not drafting, or past its slots, writes nowhere). The K drafts of
  every row come back in one copy.
Only greedy drafts are captured: a sampled row draws its drafts from the head's distribution with its own
sampling parameters and generator, so a step with such a drafting row runs the drafter eager (over the graph's
hidden states).

The inputs are one byte buffer on the device mirrored by a pinned one (one copy per step), for n rows and t
token entries (DecodeGraphs' sizes) and c = K - 1 draft steps:
    nxt int64[t] | stop int64[n] | chain positions int64[c, n] | chain slots int64[c, n] | chain seq_lens int32[c, n]
With capture=False (ATOM_DECODE_GRAPHS=static) every replay runs its body eagerly on the same buffers.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from atom.forward_context import set_forward_context
from atom.layers.attention import AttentionInputs
from atom_server.engine.cuda_graphs import DecodeGraphs, _event

logger = logging.getLogger(__name__)


class MTPGraphs:
    def __init__(self, model, graphs: DecodeGraphs, k: int):
        if not graphs.keep_hidden or not graphs.verify_q:
            raise ValueError("the MTP graphs need target graphs that keep their hidden states and verify graphs")
        if graphs.windowed:
            raise ValueError("the MTP graphs do not run with a window pool")
        self.model = model
        self.g = graphs
        self.k = k
        g = graphs
        n, t, c = g.dev.n, g.dev.t, k - 1
        self.n, self.t = n, t
        pinned = g.device.type == "cuda"
        nbytes = 8 * t + 8 * n + 20 * c * n
        self.dev = _Inputs(nbytes, t, n, c, g.device, pinned=False)
        self.host = _Inputs(nbytes, t, n, c, torch.device("cpu"), pinned=pinned)
        for buf in (self.dev, self.host):
            buf.chain_slots.fill_(-1)
            buf.chain_lens.fill_(1)
        self.copied = _event(g.device)
        self.mtp_hidden: torch.Tensor | None = None  # [t, H], allocated by the first first pass
        self.drafts = torch.zeros(n, k, dtype=torch.int64, device=g.device)
        self.first_pass_shapes = [(bs, 1) for bs in g.sizes] + [(bs, g.verify_q) for bs in g.verify_sizes]
        self.draft_sizes = sorted(set(g.sizes) | set(g.verify_sizes))
        d = self.dev
        self.chain_metadata = {bs: [g.builder.build_for_graph(AttentionInputs(
            slot_mapping=d.chain_slots[j, :bs], block_tables=g.dev.tables[:bs], query_start_loc=g.qsl[:bs + 1],
            seq_lens=d.chain_lens[j, :bs], max_query_len=1, max_seq_len=g.max_model_len)) for j in range(c)]
            for bs in self.draft_sizes}
        self.first_pass_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.draft_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if g.capture:
            self._capture()

    def _first_pass_body(self, bs: int, q: int) -> None:
        g = self.g
        t = bs * q
        with set_forward_context(g.metadata[bs] if q == 1 else g.verify_metadata[bs]):
            hidden = self.model.mtp_forward(self.dev.nxt[:t], g.dev.positions[:t], g.hidden_out[:t])
        if self.mtp_hidden is None:
            self.mtp_hidden = torch.zeros(self.t, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        self.mtp_hidden[:t].copy_(hidden)

    def _draft_body(self, bs: int) -> None:
        d = self.dev
        hidden = self.mtp_hidden[d.stop[:bs]]
        for j in range(self.k):
            tokens = self.model.mtp_logits(hidden).argmax(dim=-1)
            self.drafts[:bs, j].copy_(tokens)
            if j + 1 < self.k:
                with set_forward_context(self.chain_metadata[bs][j]):
                    hidden = self.model.mtp_forward(tokens, d.chain_pos[j, :bs], hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        g = self.g
        for bs, q in sorted(self.first_pass_shapes, key=lambda s: -s[0] * s[1]):  # largest first
            self.first_pass_graphs[bs, q], _ = g.capture_graph(
                f"CUDA graph MTP first pass bs={bs} q={q}", lambda bs=bs, q=q: self._first_pass_body(bs, q))
        for bs in reversed(self.draft_sizes):
            self.draft_graphs[bs], _ = g.capture_graph(f"CUDA graph MTP drafts bs={bs}",
                                                       lambda bs=bs: self._draft_body(bs))
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for the MTP drafter: first pass at (batch size, tokens per row) %s; "
                    "%d greedy drafts at batch sizes %s", self.first_pass_shapes, self.k, self.draft_sizes)

    def prepare(self, n: int, nxt: np.ndarray, stop: np.ndarray | None = None,
                chain: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """Write and copy a step's inputs: nxt, the token after each entry of the target graph's layout (its
        padded length); for drafting, stop [n] (each row's stop entry) and chain = (positions, slots, seq_lens),
        each [K - 1, n]: the draft steps' (padding rows are set here)."""
        self.copied.synchronize()
        h = self.host
        h.nxt.numpy()[:len(nxt)] = nxt
        if stop is not None:
            h.stop.numpy()[:n] = stop
            h.stop.numpy()[n:] = 0
            for buf, values, pad in zip((h.chain_pos, h.chain_slots, h.chain_lens), chain, (0, -1, 1)):
                view = buf.numpy()
                view[:, :n] = values
                view[:, n:] = pad
        self.dev.raw.copy_(h.raw, non_blocking=True)
        self.copied.record()

    def replay_first_pass(self, bs: int, q: int, n: int) -> None:
        """The MTP layer over the entries of the target graph of size bs (n real rows) that ran last."""
        g = self.g
        g.builder.prepare_replay(g.metadata[bs] if q == 1 else g.verify_metadata[bs], n)
        g.replays["mtp_first_pass"] += 1
        if g.capture:
            self.first_pass_graphs[bs, q].replay()
        else:
            self._first_pass_body(bs, q)

    def replay_drafts(self, bs: int, n: int) -> list[list[int]]:
        """The K greedy drafts of each of the n rows (from the stops and chain of prepare)."""
        g = self.g
        for md in self.chain_metadata[bs]:
            g.builder.prepare_replay(md, n)
        g.replays["mtp_drafts"] += 1
        if g.capture:
            self.draft_graphs[bs].replay()
        else:
            self._draft_body(bs)
        return self.drafts[:n].tolist()


class _Inputs:
    """Typed views over one byte buffer in the layout of the module doc."""

    def __init__(self, nbytes: int, t: int, n: int, c: int, device: torch.device, pinned: bool):
        self.raw = torch.zeros(nbytes, dtype=torch.uint8, device=device, pin_memory=pinned)
        at = 0

        def take(size: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
            nonlocal at
            view = self.raw[at:at + size].view(dtype).view(shape)
            at += size
            return view

        self.nxt = take(8 * t, torch.int64, (t,))
        self.stop = take(8 * n, torch.int64, (n,))
        self.chain_pos = take(8 * c * n, torch.int64, (c, n))
        self.chain_slots = take(8 * c * n, torch.int64, (c, n))
        self.chain_lens = take(4 * c * n, torch.int32, (c, n))
