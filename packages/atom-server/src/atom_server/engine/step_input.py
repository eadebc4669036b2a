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
With a window pool (block_manager.py) the sliding-window layers' tables travel the same way in
`window_block_updates` (a table whose head slid out of the window is not resent: the runner keeps the
stale ids, which no kernel reads).

Sampling inputs are sent only when some sampled row needs more than the greedy argmax (the decode
graphs take the argmax inside the replay), and for each such row: temperature, top-k/p, min-p, the
seed of its generator (the runner keeps one torch.Generator per seeded sequence and advances it),
logprobs, penalties (the token ids they count), the min_tokens and bad_words bans, allowed token ids,
logit biases and, for the rows with a grammar (structured outputs), their next-token bitmasks (filled
here, from each sequence's grammar state). Prompt logprobs name the rows and the next-token ids to score.

Async scheduling: a decode step may be launched before the previous replay's tokens are read. Then a
row's input token is the token that replay sampled in row prev_rows[i] (on the device), not token_ids[i].

Speculative decoding: a row may end with drafts (`num_drafts[i]` of its tokens, after its last committed
token): the runner scores them and every row that samples reports the tokens it keeps (engine/
rejection_sampler.py). With the MTP drafter, the runner also runs the MTP layer over every row's tokens (its
own KV cache at the same positions): `mtp_next_ids[i]` is the token after a row that does not sample (a
prefill chunk; the MTP at position p reads token p + 1), and `draft_rows` are the rows to draft for. So a
worker on another rank runs a verify step from the StepInput alone; what sampling decided (rank 0) is the
only thing it has to be told.
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
    banned_token_ids: list[list[int]] | None = None  # min_tokens and bad_words: ids masked out this step
    allowed_token_ids: list[list[int] | None] | None = None  # only these ids may be sampled (None: any)
    logit_bias: list[dict[int, float] | None] | None = None  # added to the logits before sampling
    # Structured outputs: the rows (indices into the sampled rows) with a grammar, and their next-token
    # bitmasks, int32 [len(grammar_rows), ceil(vocab / 32)] packed as bytes (bit set: allowed), applied to the
    # logits on the device before anything else (vLLM's order: logprobs see the mask).
    grammar_rows: list[int] | None = None
    grammar_bitmask: bytes | None = None


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
    window_block_updates: list[BlockTableUpdate] = []  # the window pool's tables (block_manager.py)
    finished_seq_ids: list[int] = []  # sequences whose runner state goes, before this step's updates
    sample_rows: list[int] | None = None  # rows that sample their next token; None: every row
    sampling: SamplingInputs | None = None  # None: greedy argmax for every sampled row
    prompt_logprobs: list[PromptLogprobs] = []
    prev_rows: list[int] | None = None  # async: row i's token is the previous replay's row prev_rows[i] (-1: own)
    num_drafts: list[int] | None = None  # speculative: per row, draft tokens at the end of its tokens (None: none)
    mtp_next_ids: list[int] | None = None  # MTP drafter: per row, the token after its last one if it does not sample
    draft_rows: list[int] | None = None  # MTP drafter: rows that draft tokens for their next step

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

    def drafts_of(self, row: int) -> int:
        return 0 if self.num_drafts is None else self.num_drafts[row]


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

    def __init__(self, scheduler: Scheduler, mtp: bool = False, can_draft=None):
        """mtp: the runners draft with the MTP layer (send mtp_next_ids and draft_rows); can_draft(seq): whether
        a sequence takes drafts for its next step."""
        self.scheduler = scheduler
        self.bm = scheduler.bm
        self.mtp = mtp
        self.can_draft = can_draft
        self._sent: dict[int, tuple[int, int]] = {}  # seq id -> (table generation, entries) the runners hold
        self.grammars = None  # the engine's GrammarCompiler once a request has a grammar (fills bitmasks)

    def build(self, batch: ScheduledBatch, prev_rows: dict[int, int] | None = None) -> StepInput:
        """prev_rows (async scheduling): seq id -> row of the launched, unread step that samples the
        token a pending sequence is waiting for."""
        seqs = batch.seqs
        finished = self.scheduler.take_finished()
        updates, window_updates = self._table_updates(finished)
        seq_ids = list(map(_seq_id, seqs))
        if batch.num_drafts is None and _is_decode(batch):
            step = StepInput(seq_ids=seq_ids, token_ids=list(map(_last, map(_token_ids, seqs))),
                             query_start_loc=list(range(len(seqs) + 1)),
                             seq_lens=list(map(len, map(_token_ids, seqs))),
                             block_updates=updates, finished_seq_ids=finished)
            sampled = seqs
        else:
            step = self._mixed(batch, seq_ids, updates, finished)
            sampled = seqs if step.sample_rows is None else [seqs[i] for i in step.sample_rows]
        if window_updates:
            step.window_block_updates = window_updates
        if prev_rows is not None:
            step.prev_rows = [prev_rows[s.seq_id] if s.pending else -1 for s in seqs]
        if _any_prompt_logprobs(seqs):
            step.prompt_logprobs = self._prompt_logprobs(batch, step)
        if not _all_argmax(sampled):
            step.sampling = sampling_inputs(sampled, self.grammars)
        if self.mtp:
            self._mtp_inputs(batch, step)
        return step

    def flush(self) -> StepInput:
        """A step of no rows that only releases the runners' state of the sequences finished since the last
        step (their tables and generators; the engine otherwise sends them with its next step)."""
        finished = self.scheduler.take_finished()
        updates, window_updates = self._table_updates(finished)
        step = StepInput(seq_ids=[], token_ids=[], query_start_loc=[0], seq_lens=[],
                         block_updates=updates, finished_seq_ids=finished)
        if window_updates:  # whatever take_changed handed over must reach the runners, this step or never
            step.window_block_updates = window_updates
        return step

    def _mtp_inputs(self, batch: ScheduledBatch, step: StepInput) -> None:
        sampled = set(step.sampled_rows())
        nxt = []
        for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            end = s.num_computed_tokens + n
            nxt.append(-1 if i in sampled else s.token_ids[end])
        step.mtp_next_ids = nxt
        can = self.can_draft
        step.draft_rows = [i for i in sorted(sampled) if can is None or can(batch.seqs[i])]

    def _table_updates(self, finished: list[int]) -> tuple[list[BlockTableUpdate], list[BlockTableUpdate]]:
        """What the runners' tables lack: whole tables that were replaced, tails that grew (main pool, and
        window pool when there is one)."""
        sent = self._sent
        for sid in finished:
            sent.pop(sid, None)
        updates: list[BlockTableUpdate] = []
        window_updates: list[BlockTableUpdate] = []
        for s in self.bm.take_changed():
            table = s.block_table
            if not table or s.is_finished:  # preempted or finished since: readmission sends it whole
                continue
            have = sent.get(s.seq_id)
            if have is None or have[0] != s.table_gen:
                have = (s.table_gen, 0, 0)
            window = s.window_table
            # grown, or (speculative decoding giving back lookahead blocks) shrunk: an update from its end with
            # no ids truncates
            if have[1] != len(table):
                start = min(have[1], len(table))
                updates.append(BlockTableUpdate(s.seq_id, start, table[start:]))
            if have[2] < len(window):
                window_updates.append(BlockTableUpdate(s.seq_id, have[2], window[have[2]:]))
            sent[s.seq_id] = (s.table_gen, len(table), len(window))
        return updates, window_updates

    @staticmethod
    def _mixed(batch: ScheduledBatch, seq_ids, updates, finished) -> StepInput:
        ids: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        drafts = batch.num_drafts
        for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = s.num_computed_tokens
            end = start + n
            k = drafts[i] if drafts is not None else 0
            ids.extend(s.token_ids[start:end - k])
            if k:
                ids.extend(s.draft_token_ids[:k])
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            if end - k == len(s.token_ids):
                sample_rows.append(i)
        step = StepInput(seq_ids=seq_ids, token_ids=ids, query_start_loc=qsl, seq_lens=seq_lens,
                         block_updates=updates, finished_seq_ids=finished)
        step.sample_rows = None if len(sample_rows) == len(seq_ids) else sample_rows
        if drafts is not None:
            step.num_drafts = list(drafts)
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


def bad_word_bans(words: list[list[int]], output: list[int]) -> list[int]:
    """vLLM's bad_words: a word's last token is banned when the output ends with the rest of the word."""
    bans = []
    for word in words:
        n = len(word) - 1
        if n <= len(output) and (n == 0 or output[-n:] == word[:-1]):
            bans.append(word[-1])
    return bans


def sampling_inputs(seqs, grammars=None) -> SamplingInputs:
    """The sampling inputs of these sequences (one row each), with the all-off fields left out. grammars:
    what fills the bitmasks of sequences with a grammar (the engine's GrammarCompiler)."""
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
    for ban, s, p in zip(bans, seqs, params):
        if p.bad_words_token_ids:
            ban.extend(bad_word_bans(p.bad_words_token_ids, s.output_token_ids))
    if any(bans):
        out.banned_token_ids = bans
    if any(p.allowed_token_ids for p in params):
        out.allowed_token_ids = [p.allowed_token_ids or None for p in params]
    if any(p.logit_bias for p in params):
        out.logit_bias = [p.logit_bias or None for p in params]
    rows = [j for j, s in enumerate(seqs) if s.grammar is not None]
    if rows:
        out.grammar_rows = rows
        out.grammar_bitmask = grammars.fill_bitmask([seqs[j].grammar for j in rows])
    return out


def subset_sampling(sampling: SamplingInputs | None, index: list[int]) -> SamplingInputs | None:
    """The sampling inputs of some sampled rows (index: positions in sample-row order; repeats allowed)."""
    if sampling is None:
        return None

    def pick(values):
        return None if values is None else [values[j] for j in index]

    grammar_rows = grammar_bitmask = None
    if sampling.grammar_rows:  # the picked rows that have a grammar, and their bitmask rows
        width = len(sampling.grammar_bitmask) // len(sampling.grammar_rows)
        at = {row: k for k, row in enumerate(sampling.grammar_rows)}
        picked = [(p, at[j]) for p, j in enumerate(index) if j in at]
        if picked:
            grammar_rows = [p for p, _ in picked]
            grammar_bitmask = b"".join(sampling.grammar_bitmask[k * width:(k + 1) * width] for _, k in picked)
    return SamplingInputs(temperature=pick(sampling.temperature), top_k=pick(sampling.top_k),
                          top_p=pick(sampling.top_p), min_p=pick(sampling.min_p), seeds=pick(sampling.seeds),
                          logprobs=pick(sampling.logprobs), penalties=pick(sampling.penalties),
                          banned_token_ids=pick(sampling.banned_token_ids),
                          allowed_token_ids=pick(sampling.allowed_token_ids), logit_bias=pick(sampling.logit_bias),
                          grammar_rows=grammar_rows, grammar_bitmask=grammar_bitmask)
