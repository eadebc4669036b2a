"""A sequence: one generated continuation of a request (a request with n > 1 owns n of them)."""

from __future__ import annotations

import enum
import time

from atom_server.outputs import TokenLogprobs
from atom_server.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, eos_ids: frozenset[int], max_model_len: int):
        # Only the first of n siblings scores the prompt (the request reports it once).
        self.seq_id = seq_id
        self.request_id = request_id
        self.priority = 0  # the priority scheduling policy's key (lower first), set by the engine core
        self.index = index  # position among the request's n outputs
        self.params = params
        self.prompt_len = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at the last admission
        self.block_table: list[int] = []
        # Window pool (block_manager.py): the sliding-window layers' table, by the same logical block
        # numbers; entries before window_start were given back (out of every later query's window).
        self.window_table: list[int] = []
        self.window_start = 0
        self.table_gen = 0  # bumped whenever block_table is replaced (not grown), for cached copies of it
        # Async scheduling: the last entry of token_ids is a placeholder for a token still on the device;
        # final_pending: that token is the last one (length), so the scheduler does not schedule it again.
        self.pending = False
        self.final_pending = False
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of token_ids, computed lazily
        self.num_registered_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        # Speculative decoding: tokens proposed to follow token_ids, verified by the next step that schedules
        # this sequence. Never part of token_ids (nor of the prefix-cache hash chain) until accepted.
        self.draft_token_ids: list[int] = []
        self.eos_ids = frozenset() if params.ignore_eos else eos_ids
        budget = max_model_len - self.prompt_len
        self.max_tokens = min(params.max_tokens, budget) if params.max_tokens is not None else budget
        # Output tokens from which greedy argmax alone picks the next token (no logprobs, penalties or
        # min_tokens bans in the way); -1: never.
        bans = params.min_tokens > 0 and bool(self.eos_ids or params.stop_token_ids)
        plain = (params.greedy and params.logprobs is None and not params.has_penalties
                 and not params.has_logits_processors)
        self.argmax_from = (params.min_tokens if bans else 0) if plain else -1
        self.always_argmax = self.argmax_from == 0  # argmax_ok without looking (a cheap per-step check)
        self.cumulative_logprob = 0.0
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = [None] if params.prompt_logprobs is not None and index == 0 else None
        self.grammar = None  # structured outputs: its SequenceGrammar (engine/structured_output.py)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:len(self.token_ids) - self.pending]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len

    @property
    def argmax_ok(self) -> bool:
        """The next token is the plain argmax of the logits."""
        return 0 <= self.argmax_from <= len(self.token_ids) - self.prompt_len

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def append_placeholder(self) -> None:
        self.token_ids.append(-1)
        self.pending = True

    def resolve_placeholder(self, token_id: int) -> None:
        self.token_ids[-1] = token_id
        self.pending = False
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
