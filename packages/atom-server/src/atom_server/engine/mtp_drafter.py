"""The MTP drafter (runner side): the checkpoint's first MTP layer drafts K tokens after every target forward.

The MTP layer at position p reads the target's hidden state h_p (what the LM head reads) and the embedding of
token p + 1, and predicts token p + 2; its attention keeps its own KV cache at the same positions and block
tables as the target's (layer index num_hidden_layers: the runner allocates it from its spec like any other).

Each step, after the target's forward and verification:
1. First pass, the same rows, positions, slots and attention metadata as the target's forward: the input of
   position p is (h_p, token p + 1). Within a row that is the row's next token; after the row's last token it
   is `mtp_next_ids` (a prefill chunk: the next prompt token) or, for a row that sampled, its new token, which
   goes at the row's stop (the last position whose KV is valid: its last committed token plus the accepted
   drafts). Positions past the stop (rejected drafts) write MTP cache entries that a later step overwrites
   before anything reads them, as the target's own.
2. Draft 1 = the MTP's prediction at each drafting row's stop; drafts 2..K: the MTP again, one token per row at
   the next position, reading the previous draft and the previous MTP output (vLLM reuses its one MTP layer the
   same way when K exceeds num_nextn_predict_layers). These write the MTP cache at positions the next step's
   first pass rewrites. A row drafts only as far as its block table reaches (the scheduler's lookahead slots)
   and max_model_len allows (the rope table's end; the engine keeps no draft past it anyway).
Greedy rows draft the argmax; sampled rows draw from the MTP head's distribution under their own sampling
parameters (and generator), and that distribution is kept (rank 0, with the rest of sampling) for the
rejection sampler of the next step.

After a step on the target's CUDA graphs (decode or verify), `propose_on_graphs` does the same on the MTP graphs
(mtp_graphs.py): the first pass over the target graph's entries, then the K draft steps of every row at once,
when every drafting row is greedy; a step with a sampled drafting row runs `propose` (eager) on the graph's
hidden states.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from atom_server.engine.block_tables import positions_of
from atom_server.engine.rejection_sampler import draw, target_probs
from atom_server.engine.step_input import StepInput, subset_sampling

if TYPE_CHECKING:
    from atom_server.engine.model_runner import ModelRunner, RowResult
    from atom_server.engine.mtp_graphs import MTPGraphs


class MTPDrafter:
    def __init__(self, runner: ModelRunner, k: int):
        self.runner = runner
        self.model = runner.model
        self.k = k
        # seq id -> (its drafts, the distributions they were drawn from [n, V]): sampled rows only
        self._draft_probs: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}

    def forget(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self._draft_probs.pop(sid, None)

    def draft_probs(self, seq_id: int, drafts: list[int]) -> torch.Tensor | None:
        """The distributions the drafts of seq_id were drawn from, if these are (a prefix of) its last drafts."""
        entry = self._draft_probs.get(seq_id)
        if entry is None or entry[0][:len(drafts)] != tuple(drafts):
            return None
        return entry[1]

    def _layer(self, ids: torch.Tensor, positions: torch.Tensor, prev_hidden: torch.Tensor | None) -> torch.Tensor:
        return self.model.mtp_forward(ids, positions, prev_hidden)

    def _capacity(self, table_rows: np.ndarray) -> np.ndarray:
        """Positions each row's draft steps may use: its block table's slots, within max_model_len."""
        r = self.runner
        return np.minimum(r.tables.num_blocks[table_rows] * r.block_size, r.max_model_len)

    def first_pass_ids(self, step: StepInput, ids: np.ndarray, qsl: np.ndarray, stops: dict[int, int],
                       results: list[RowResult]) -> np.ndarray:
        """The token after each position of the step (see the module docstring, 1)."""
        nxt = np.empty_like(ids)
        nxt[:-1] = ids[1:]
        last = qsl[1:] - 1
        following = step.mtp_next_ids
        for i in range(step.num_rows):
            nxt[last[i]] = max(following[i], 0) if following is not None else 0
        for i, index in stops.items():
            nxt[index] = results[i].token_id
        return nxt

    def propose(self, step: StepInput, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, qsl: np.ndarray,
                seq_lens: np.ndarray, rows: np.ndarray, hidden: torch.Tensor, stops: dict[int, int],
                results: list[RowResult]) -> None:
        """Run the MTP over the step and set results[i].draft_token_ids for step.draft_rows. stops: sampled row
        -> flat index of its last valid token (its new token, results[i].token_id, follows it)."""
        r = self.runner
        nxt = self.first_pass_ids(step, ids, qsl, stops, results)
        h = r._forward_batch(nxt, positions, slots, None, qsl, seq_lens, rows, fn=self._layer, extra=hidden)
        draft_rows = [i for i in (step.draft_rows or []) if i in stops]
        if not draft_rows:
            return
        sampled_pos = {row: j for j, row in enumerate(step.sampled_rows())}
        sample_js = [sampled_pos[i] for i in draft_rows]
        sampling = step.sampling
        greedy = [sampling is None or sampling.temperature[j] <= 1e-5 for j in sample_js]
        sub = subset_sampling(sampling, [j for j, g in zip(sample_js, greedy) if not g])
        seq_ids = [step.seq_ids[i] for i in draft_rows]
        generators = r._generators_of(sampling, sample_js, seq_ids)
        sampled_gens = None if generators is None else [g for g, flag in zip(generators, greedy) if not flag]
        index = np.asarray([stops[i] for i in draft_rows], dtype=np.int64)
        dev = hidden.device
        h = h[torch.from_numpy(index).to(dev)]
        pos = positions[index]
        table_rows = rows[draft_rows]
        capacity = self._capacity(table_rows)
        limit = np.minimum(self.k, capacity - pos)  # draft j >= 2 is read at position pos + j - 1 < capacity
        n = len(draft_rows)
        drafts: list[list[int]] = []
        probs: list[torch.Tensor] = []
        sampled_idx = torch.tensor([m for m, g in enumerate(greedy) if not g], dtype=torch.int64, device=dev)
        for j in range(self.k):
            logits = self.model.mtp_logits(h).float()
            tokens = logits.argmax(dim=-1)
            if sampled_idx.numel():
                q = target_probs(logits[sampled_idx], sub)
                tokens[sampled_idx] = draw(q, sampled_gens)
                probs.append(q)
            drafts.append(tokens.tolist())
            if j + 1 >= int(limit.max()):
                break
            p = pos + j + 1
            inside = p < capacity
            p_in = np.minimum(p, capacity - 1)  # a row past its slots runs on, writing nowhere; its drafts stop
            step_slots = np.where(inside, r.tables.slots(table_rows, p_in), -1)
            h = r._forward(tokens.cpu().numpy(), p_in, step_slots, None, np.arange(n + 1), p_in + 1, table_rows,
                           self._layer, h)
        kept: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}
        sampled_rows = [m for m, g in enumerate(greedy) if not g]
        for m, i in enumerate(draft_rows):
            take = max(int(limit[m]), 0)
            results[i].draft_token_ids = [drafts[j][m] for j in range(min(take, len(drafts)))]
        for s, m in enumerate(sampled_rows):
            d = tuple(results[draft_rows[m]].draft_token_ids)
            if d:
                kept[seq_ids[m]] = (d, torch.stack([q[s] for q in probs[:len(d)]]))
        for sid in seq_ids:
            self._draft_probs.pop(sid, None)
        self._draft_probs.update(kept)

    def greedy_drafts(self, step: StepInput) -> bool:
        """Every row that drafts this step drafts the argmax (what the MTP graphs compute)."""
        sampling = step.sampling
        if sampling is None:
            return True
        sampled_pos = {row: j for j, row in enumerate(step.sampled_rows())}
        return all(sampling.temperature[sampled_pos[i]] <= 1e-5 for i in step.draft_rows or [] if i in sampled_pos)

    def propose_on_graphs(self, graphs: MTPGraphs, step: StepInput, rows: np.ndarray, bs: int, q: int,
                          entries: np.ndarray, stops: dict[int, int], results: list[RowResult]) -> None:
        """propose() after a step on the target's graph of size bs and q tokens per row (every row sampled, every
        drafting row greedy): entries, the graph entry of each of the step's tokens; stops, as propose()."""
        r = self.runner
        n = step.num_rows
        ids = np.asarray(step.token_ids, dtype=np.int64)
        qsl, _, positions = positions_of(step)
        nxt = np.zeros(bs * q, dtype=np.int64)
        nxt[entries] = self.first_pass_ids(step, ids, qsl, stops, results)
        draft_rows = [i for i in (step.draft_rows or []) if i in stops]
        if not draft_rows:
            graphs.prepare(n, nxt)
            graphs.replay_first_pass(bs, q, n)
            return
        stop_flat = np.asarray([stops[i] for i in range(n)], dtype=np.int64)
        pos = positions[stop_flat]
        capacity = self._capacity(rows)
        limit = np.minimum(self.k, capacity - pos)
        # draft step j (1..K-1) reads the previous draft at pos + j; past a row's slots it runs on writing nowhere
        ahead = pos[None, :] + np.arange(1, self.k, dtype=np.int64)[:, None]  # [K - 1, n]
        inside = ahead < capacity[None, :]
        at = np.minimum(ahead, capacity[None, :] - 1)
        slots = np.where(inside, r.tables.slots(np.broadcast_to(rows, at.shape), at), -1)
        drafting = np.zeros(n, dtype=bool)
        drafting[draft_rows] = True
        slots[:, ~drafting] = -1
        graphs.prepare(n, nxt, entries[stop_flat], (at, slots, at + 1))
        graphs.replay_first_pass(bs, q, n)
        drafts = graphs.replay_drafts(bs, n)
        for i in draft_rows:
            results[i].draft_token_ids = drafts[i][:max(int(limit[i]), 0)]
            self._draft_probs.pop(step.seq_ids[i], None)
