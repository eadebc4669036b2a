"""Continuous batching with chunked prefill.

Every step spends a token budget (max_num_batched_tokens): running sequences first, in admission
order (a decode costs one token, an unfinished prefill continues with the next chunk), then waiting
ones. When the KV pool runs out, a running sequence is preempted: its blocks are freed and it goes back
to the waiting queue to be recomputed later (its own blocks often come back from the prefix cache).

Two policies, vLLM's `--scheduling-policy`:
- fcfs (default): waiting sequences are admitted in arrival order; the most recently admitted running
  sequence is preempted and goes back to the *front* of the waiting queue, so nothing starves;
- priority: waiting sequences are admitted by (priority, arrival), lower values first; the running
  sequence with the largest (priority, arrival) is preempted (taken back out of this step's batch if it
  was already in it) and waits in its place of that order.

Speculative decoding: a decoding sequence with draft tokens computes its last token and the drafts in one row
(1 + k tokens of the budget; drafts that do not fit are dropped). A row that reaches the end of its tokens
holds `lookahead` KV slots past its last token (the drafts the next step verifies, and the MTP drafter's
writes). `commit` then counts only what was accepted: a rejected draft's KV slot is simply overwritten by a
later step, its block stays with the sequence for the tokens that come next, and since num_computed_tokens
stops before it, no block holding an unverified token is registered in the prefix cache.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from atom_server.engine.block_manager import BlockManager, PrefixHit
from atom_server.engine.sequence import Sequence, SeqStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # drafts included
    # Speculative decoding: per row, how many of its new tokens are drafts (seq.draft_token_ids[:k]) at its end;
    # None: no row has drafts.
    num_drafts: list[int] | None = None
    # Set once by step_input's checks (a batch is not changed after scheduling; filtering makes a new one).
    is_decode: bool | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def subset(self, rows: list[int]) -> ScheduledBatch:
        """The batch of these rows, in this order."""
        return ScheduledBatch([self.seqs[i] for i in rows], [self.num_new_tokens[i] for i in rows],
                              None if self.num_drafts is None else [self.num_drafts[i] for i in rows])


SCHEDULING_POLICIES = ("fcfs", "priority")


def _priority_key(seq: Sequence) -> tuple[int, int]:
    return seq.priority, seq.seq_id  # seq ids grow with arrival


class PriorityQueue:
    """The waiting queue of the priority policy: the deque operations the scheduler uses, kept in
    (priority, arrival) order."""

    def __init__(self):
        self._keys: list[tuple[int, int]] = []
        self._seqs: list[Sequence] = []

    def append(self, seq: Sequence) -> None:
        key = _priority_key(seq)
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._seqs.insert(i, seq)

    appendleft = append  # a preempted sequence waits in its place of the order

    def popleft(self) -> Sequence:
        self._keys.pop(0)
        return self._seqs.pop(0)

    def remove(self, seq: Sequence) -> None:
        i = self._seqs.index(seq)
        del self._keys[i], self._seqs[i]

    def __getitem__(self, i: int) -> Sequence:
        return self._seqs[i]

    def __len__(self) -> int:
        return len(self._seqs)

    def __iter__(self):
        return iter(self._seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs", lookahead: int = 0, max_model_len: int | None = None):
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {policy!r}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.lookahead = lookahead  # speculative decoding: slots a row reaching its end holds past its last token
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] | PriorityQueue = deque() if policy == "fcfs" else PriorityQueue()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._finished: list[int] = []  # ids of the sequences finished since take_finished()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.final_pending:  # its last token is in flight; nothing more to compute
                i += 1
                continue
            left = seq.num_tokens - seq.num_computed_tokens
            num_new = min(left + (len(seq.draft_token_ids) if left == 1 else 0), budget)
            while not self.bm.ensure_slots(seq, self._slots(seq, min(num_new, left), num_new)):
                victim, at = self._victim()
                self.running.pop(at)
                if at < i:  # scheduled earlier in this step (priority policy): take it back out of the batch
                    j = batch.seqs.index(victim)
                    budget += batch.num_new_tokens.pop(j)
                    batch.seqs.pop(j)
                    if batch.num_drafts is not None:
                        batch.num_drafts.pop(j)
                    i -= 1
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                if num_new > left:
                    if batch.num_drafts is None:
                        batch.num_drafts = [0] * (len(batch.seqs) - 1)
                    batch.num_drafts.append(num_new - left)
                elif batch.num_drafts is not None:
                    batch.num_drafts.append(0)
                budget -= num_new
                i += 1
                continue
            break
        # Admitting new work right after a preemption would only take the blocks back.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._sibling_prefilling(seq):
                break  # wait one step so the sibling's prompt blocks are cached and shared
            hits = PrefixHit() if seq.wants_prompt_logprobs else self.bm.lookup(seq)
            num_computed = len(hits) * self.bm.block_size
            num_new = min(seq.num_tokens - num_computed, budget)
            slots = self._slots(seq, num_new, num_new, num_computed)
            if not self.bm.can_admit(hits, slots):
                break
            self.bm.admit(seq, hits)
            ok = self.bm.ensure_slots(seq, slots)
            assert ok
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            if batch.num_drafts is not None:
                batch.num_drafts.append(0)
            budget -= num_new
        return batch

    def _victim(self) -> tuple[Sequence, int]:
        """The running sequence to preempt and its index: the last admitted (fcfs) or the one last in
        (priority, arrival) order."""
        if self.policy == "fcfs":
            return self.running[-1], len(self.running) - 1
        at = max(range(len(self.running)), key=lambda k: _priority_key(self.running[k]))
        return self.running[at], at

    def _slots(self, seq: Sequence, num_real: int, num_new: int, num_computed: int | None = None) -> int:
        """KV slots seq needs for a step computing num_new tokens (num_real of them its own, the rest drafts):
        a row that reaches the end of its tokens also holds the speculative lookahead."""
        computed = seq.num_computed_tokens if num_computed is None else num_computed
        need = computed + num_new
        if self.lookahead and computed + num_real == seq.num_tokens:
            ahead = seq.num_tokens + self.lookahead
            need = max(need, ahead if self.max_model_len is None else min(ahead, self.max_model_len))
        return need

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        if seq.params.n == 1:
            return False
        return any(s.request_id == seq.request_id and s.num_computed_tokens < s.prompt_len for s in self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.draft_token_ids = []  # its recomputation ends with a fresh token (and fresh drafts)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def commit(self, batch: ScheduledBatch, computed: list[int] | None = None) -> None:
        """Account the tokens the model just computed (sequences finished since scheduling are skipped).
        computed: per row, the tokens whose KV is now valid, when not all of num_new_tokens are (a verify row:
        its last token plus the accepted drafts; those must already be in seq.token_ids)."""
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.status is SeqStatus.FINISHED:
                continue
            seq.num_computed_tokens += n if computed is None else computed[i]
            self.bm.register_computed(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence wherever it is and free its blocks."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free_seq(seq)
        self._finished.append(seq.seq_id)
        seq.status = SeqStatus.FINISHED

    def take_finished(self) -> list[int]:
        """Ids of the sequences finished or aborted since the last call (the model runners drop what they
        keep per sequence: block table, generator)."""
        finished, self._finished = self._finished, []
        return finished
