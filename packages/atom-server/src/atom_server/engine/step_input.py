"""One model step as data: what the scheduler side sends to every model runner (every rank under TP).

`StepInputBuilder.build(batch)` turns a `ScheduledBatch` into a `StepInput`, a msgspec struct of plain
lists and ints (no tensors, no numpy, no Sequence objects): it round-trips through msgpack and is what
the tensor-parallel executor publishes to every rank (executor.py, tp_channel.py). A runner runs a step from the StepInputs it received, in order, and
nothing else (runner.py; block_tables.py keeps its copy of the block tables).

Rows are the scheduled sequences, in batch order; the step's new tokens are the rows' tokens
concatenated (query_start_loc). A row computes the last query_len of its seq_len tokens, so positions
are seq_len - query_len .. seq_len - 1, and each token's cache slot follows from its position and the
row's block table: both are derived on the runner side (vectorised) rather than sent per token.

Block tables are sent as deltas. The runner keeps each live sequence's table; a step carries only
what changed since the last step: a whole table when a sequence is new or its table was replaced
(admission, readmission after a preemption), the appended tail when it grew, and the ids of the
sequences that finished (their tables and generators are dropped; a preempted sequence keeps both
until it is readmitted or finishes, so its seeded draws continue where they stopped). The scheduler
side learns what changed from the block manager (`take_changed`), so the cost is per change, not per row.
A decode step of 256 sequences then sends a few short tails (one block id per sequence that crossed a
block) instead of 256 full rows (up to max_model_len / block_size ids each): full rows would cost more
host time than the rest of the step's input together, and far more bytes on a TP broadcast.
The price is order: every runner must apply every StepInput once, in order (a broadcast gives that).

Sampling inputs are sent only when some sampled row needs more than the greedy argmax (the decode
graphs take the argmax inside the replay), and for each such row: temperature, top-k/p, min-p, the
seed of its generator (the runner keeps one torch.Generator per seeded sequence and advances it),
logprobs, penalties (the token ids they count) and the min_tokens bans. Prompt logprobs name the rows
and the next-token ids to score.

Async scheduling: a decode step may be launched before the previous replay's tokens are read. Then a
row's input token is the token that replay sampled in row prev_rows[i] (on the device), not token_ids[i].
"""

from __future__ import annotations

from operator import attrgetter, itemgetter

import msgspec

from atom_server.engine.scheduler import ScheduledBatch, Scheduler
from atom_server.engine.sequence import Sequence


class BlockTableUpdate(msgspec.Struct, array_like=True):
    """Sequence seq_id's block table becomes its first `start` entries followed by `block_ids`."""

    seq_id: int
    start: int
    block_ids: list[int]


class Penalties(msgspec.Struct, array_like=True):
    """vLLM/OpenAI penalties of one row: repetition over prompt and output, presence/frequency over output."""

    repetition: float
    frequency: float
    presence: float
    prompt_token_ids: list[int]
    output_token_ids: list[int]


class SamplingInputs(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Per sampled row (in sample-row order). A None field is off for every row."""

    temperature: list[float]
    top_k: list[int] | None = None  # 0: off
    top_p: list[float] | None = None  # 1.0: off
    min_p: list[float] | None = None  # 0.0: off
    seeds: list[int | None] | None = None  # the seed of the row's generator (created on first use)
    logprobs: list[int | None] | None = None  # top-N logprobs of the sampled token (-1: whole vocabulary)
    penalties: list[Penalties | None] | None = None
    banned_token_ids: list[list[int]] | None = None  # min_tokens: ids masked out this step


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Score the prompt in row `row`: the tokens at flat indices first .. first + len(targets) - 1 of the
    step predict targets (the next prompt tokens); top `num` alternatives (-1: whole vocabulary)."""

    row: int
    first: int
    targets: list[int]
    num: int


class StepInput(msgspec.Struct, kw_only=True, omit_defaults=True):
    seq_ids: list[int]  # one per row
    token_ids: list[int]  # the step's new tokens, rows concatenated (-1: taken from the previous replay)
    query_start_loc: list[int]  # [rows + 1]
    seq_lens: list[int]  # [rows]: context + new tokens
    block_updates: list[BlockTableUpdate] = []
    finished_seq_ids: list[int] = []  # sequences whose runner state goes, before this step's updates
    sample_rows: list[int] | None = None  # rows that sample their next token; None: every row
    sampling: SamplingInputs | None = None  # None: greedy argmax for every sampled row
    prompt_logprobs: list[PromptLogprobs] = []
    prev_rows: list[int] | None = None  # async: row i's token is the previous replay's row prev_rows[i] (-1: own)

    @property
    def num_rows(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """Every row computes exactly one token, its last (so every row samples), and nothing scores the prompt."""
        return len(self.token_ids) == len(self.seq_ids) and self.sample_rows is None and not self.prompt_logprobs

    def sampled_rows(self) -> list[int]:
        return list(range(len(self.seq_ids))) if self.sample_rows is None else self.sample_rows


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StepInput)


def encode(step: StepInput) -> bytes:
    return _encoder.encode(step)


def decode(data: bytes) -> StepInput:
    return _decoder.decode(data)


_seq_id = attrgetter("seq_id")
_token_ids = attrgetter("token_ids")
_num_computed = attrgetter("num_computed_tokens")
_always_argmax = attrgetter("always_argmax")
_prompt_logprobs = attrgetter("prompt_logprobs")
_last = itemgetter(-1)


def _is_decode(batch: ScheduledBatch) -> bool:
    """Every row computes one token, its last (a one-token prefill chunk left by the token budget does not).
    Each row has at least one token left to compute, so the sums are equal only if every row has one."""
    if batch.is_decode is None:
        seqs = batch.seqs
        n = len(seqs)
        batch.is_decode = (sum(batch.num_new_tokens) == n
                           and sum(map(len, map(_token_ids, seqs))) - sum(map(_num_computed, seqs)) == n)
    return batch.is_decode


def _all_argmax(seqs: list[Sequence]) -> bool:
    return all(map(_always_argmax, seqs)) or all(s.argmax_ok for s in seqs)


def _any_prompt_logprobs(seqs: list[Sequence]) -> bool:
    return any(map(_prompt_logprobs, seqs)) and any(s.wants_prompt_logprobs for s in seqs)


def is_greedy_decode(batch: ScheduledBatch) -> bool:
    """A decode batch whose next tokens greedy argmax alone picks (what a decode graph replay returns)."""
    return _is_decode(batch) and _all_argmax(batch.seqs) and not _any_prompt_logprobs(batch.seqs)


class StepInputBuilder:
    """Scheduler side: ScheduledBatch -> StepInput, remembering which block tables the runners hold."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.bm = scheduler.bm
        self._sent: dict[int, tuple[int, int]] = {}  # seq id -> (table generation, entries) the runners hold

    def build(self, batch: ScheduledBatch, prev_rows: dict[int, int] | None = None) -> StepInput:
        """prev_rows (async scheduling): seq id -> row of the launched, unread step that samples the
        token a pending sequence is waiting for."""
        seqs = batch.seqs
        finished = self.scheduler.take_finished()
        updates = self._table_updates(finished)
        seq_ids = list(map(_seq_id, seqs))
        if _is_decode(batch):
            step = StepInput(seq_ids=seq_ids, token_ids=list(map(_last, map(_token_ids, seqs))),
                             query_start_loc=list(range(len(seqs) + 1)),
                             seq_lens=list(map(len, map(_token_ids, seqs))),
                             block_updates=updates, finished_seq_ids=finished)
            sampled = seqs
        else:
            step = self._mixed(batch, seq_ids, updates, finished)
            sampled = seqs if step.sample_rows is None else [seqs[i] for i in step.sample_rows]
        if prev_rows is not None:
            step.prev_rows = [prev_rows[s.seq_id] if s.pending else -1 for s in seqs]
        if _any_prompt_logprobs(seqs):
            step.prompt_logprobs = self._prompt_logprobs(batch, step)
        if not _all_argmax(sampled):
            step.sampling = sampling_inputs(sampled)
        return step

    def flush(self) -> StepInput:
        """A step of no rows that only releases the runners' state of the sequences finished since the last
        step (their tables and generators; the engine otherwise sends them with its next step)."""
        finished = self.scheduler.take_finished()
        return StepInput(seq_ids=[], token_ids=[], query_start_loc=[0], seq_lens=[],
                         block_updates=self._table_updates(finished), finished_seq_ids=finished)

    def _table_updates(self, finished: list[int]) -> list[BlockTableUpdate]:
        """What the runners' tables lack: whole tables that were replaced, tails that grew."""
        sent = self._sent
        for sid in finished:
            sent.pop(sid, None)
        updates: list[BlockTableUpdate] = []
        for s in self.bm.take_changed():
            table = s.block_table
            if not table or s.is_finished:  # preempted or finished since: readmission sends it whole
                continue
            have = sent.get(s.seq_id)
            if have is None or have[0] != s.table_gen:
                updates.append(BlockTableUpdate(s.seq_id, 0, list(table)))
            elif have[1] < len(table):
                updates.append(BlockTableUpdate(s.seq_id, have[1], table[have[1]:]))
            else:
                continue
            sent[s.seq_id] = (s.table_gen, len(table))
        return updates

    @staticmethod
    def _mixed(batch: ScheduledBatch, seq_ids, updates, finished) -> StepInput:
        ids: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = s.num_computed_tokens
            end = start + n
            ids.extend(s.token_ids[start:end])
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            if end == len(s.token_ids):
                sample_rows.append(i)
        step = StepInput(seq_ids=seq_ids, token_ids=ids, query_start_loc=qsl, seq_lens=seq_lens,
                         block_updates=updates, finished_seq_ids=finished)
        step.sample_rows = None if len(sample_rows) == len(seq_ids) else sample_rows
        return step

    @staticmethod
    def _prompt_logprobs(batch: ScheduledBatch, step: StepInput) -> list[PromptLogprobs]:
        out = []
        for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if not s.wants_prompt_logprobs:
                continue
            start = s.num_computed_tokens
            first = max(start, len(s.prompt_logprobs) - 1)  # positions already scored are skipped
            last = min(start + n, s.prompt_len - 1)
            if last > first:
                out.append(PromptLogprobs(i, step.query_start_loc[i] + first - start, s.token_ids[first + 1:last + 1],
                                          s.params.prompt_logprobs))
        return out


def sampling_inputs(seqs) -> SamplingInputs:
    """The sampling inputs of these sequences (one row each), with the all-off fields left out."""
    params = [s.params for s in seqs]
    out = SamplingInputs(temperature=[p.temperature for p in params])
    if any(p.top_k > 0 for p in params):
        out.top_k = [p.top_k for p in params]
    if any(p.top_p < 1.0 for p in params):
        out.top_p = [p.top_p for p in params]
    if any(p.min_p > 0.0 for p in params):
        out.min_p = [p.min_p for p in params]
    if any(p.seed is not None for p in params):
        out.seeds = [p.seed + s.index if p.seed is not None else None for s, p in zip(seqs, params)]
    if any(p.logprobs is not None for p in params):
        out.logprobs = [p.logprobs for p in params]
    if any(p.has_penalties for p in params):
        out.penalties = [Penalties(p.repetition_penalty, p.frequency_penalty, p.presence_penalty,
                                   s.token_ids[:s.prompt_len], s.output_token_ids) if p.has_penalties else None
                         for s, p in zip(seqs, params)]
    bans = [[*s.eos_ids, *s.params.stop_token_ids] if s.num_output_tokens < s.params.min_tokens else []
            for s in seqs]
    if any(bans):
        out.banned_token_ids = bans
    return out
