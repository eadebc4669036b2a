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
    num_new_tokens: list[int] = field(default_factory=list)
    # Set once by step_input's checks (a batch is not changed after scheduling; filtering makes a new one).
    is_decode: bool | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


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
                 policy: str = "fcfs"):
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {policy!r}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
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
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.ensure_slots(seq, seq.num_computed_tokens + num_new):
                victim, at = self._victim()
                self.running.pop(at)
                if at < i:  # scheduled earlier in this step (priority policy): take it back out of the batch
                    j = batch.seqs.index(victim)
                    budget += batch.num_new_tokens.pop(j)
                    batch.seqs.pop(j)
                    i -= 1
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
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
            if not self.bm.can_admit(hits, num_computed + num_new):
                break
            self.bm.admit(seq, hits)
            ok = self.bm.ensure_slots(seq, num_computed + num_new)
            assert ok
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _victim(self) -> tuple[Sequence, int]:
        """The running sequence to preempt and its index: the last admitted (fcfs) or the one last in
        (priority, arrival) order."""
        if self.policy == "fcfs":
            return self.running[-1], len(self.running) - 1
        at = max(range(len(self.running)), key=lambda k: _priority_key(self.running[k]))
        return self.running[at], at

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        if seq.params.n == 1:
            return False
        return any(s.request_id == seq.request_id and s.num_computed_tokens < s.prompt_len for s in self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def commit(self, batch: ScheduledBatch) -> None:
        """Account the tokens the model just computed (sequences finished since scheduling are skipped)."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.status is SeqStatus.FINISHED:
                continue
            seq.num_computed_tokens += n
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
