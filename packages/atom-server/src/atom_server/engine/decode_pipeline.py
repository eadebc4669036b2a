"""Async scheduling: greedy decode steps launched on the device one step before their tokens are read.

Invariant: at most one launched step is unread (`inflight`). Every sequence it advanced holds a placeholder
as its last token (`seq.pending`) until the step is resolved. The next launch takes those tokens on the
device (its rows read the previous replay's sampled ids), and the in-flight step is resolved right after
that launch, so the host reads step k while the device runs step k+1. A step that cannot be launched this
way (a prefill chunk, sampling, logprobs, no CUDA graphs) resolves the in-flight step first and then runs
synchronously. Sequences that finish (or are aborted) while their token is in flight drop that token.
"""

from __future__ import annotations

from collections.abc import Iterator

from atom_server.engine.model_runner import DecodeLaunch, ModelRunner
from atom_server.engine.scheduler import ScheduledBatch, Scheduler
from atom_server.engine.sequence import Sequence
from atom_server.engine.step_input import StepInputBuilder


class DecodePipeline:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, step_inputs: StepInputBuilder, max_model_len: int,
                 enabled: bool):
        self.runner = runner
        self.scheduler = scheduler
        self.step_inputs = step_inputs
        self.max_model_len = max_model_len
        self.enabled = enabled
        self.inflight: DecodeLaunch | None = None

    def can_launch(self, batch: ScheduledBatch) -> bool:
        """A decode batch whose next tokens the captured graph alone picks (greedy argmax)."""
        return self.enabled and bool(batch.seqs) and self.runner.can_launch_async(batch)

    def take_inflight(self) -> DecodeLaunch | None:
        launch, self.inflight = self.inflight, None
        return launch

    def launch(self, batch: ScheduledBatch, prev: DecodeLaunch | None) -> DecodeLaunch:
        """Start the step on the device; sequences whose last token is pending take it from prev's replay."""
        step = self.step_inputs.build(batch, prev.rows if prev is not None else None)
        ticket = self.runner.launch_decode(step)
        return DecodeLaunch(batch.seqs, dict(zip(step.seq_ids, range(step.num_rows))), ticket)

    def start(self, batch: ScheduledBatch, launch: DecodeLaunch) -> None:
        """The launched step is now in flight: account its tokens and give each sequence a placeholder."""
        self.scheduler.commit(batch)  # skips sequences that finished while the step was being launched
        for seq in batch.seqs:
            if seq.is_finished:
                continue
            seq.append_placeholder()
            if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.final_pending = True  # its last token: the scheduler must not schedule it again
        self.inflight = launch

    def resolve(self, launch: DecodeLaunch) -> Iterator[tuple[Sequence, int]]:
        """Wait for a launched step; yields (sequence, token) for the sequences still waiting on it."""
        for seq, token in zip(launch.seqs, self.runner.collect(launch.ticket, len(launch.seqs))):
            if seq.is_finished or not seq.pending:
                continue
            seq.resolve_placeholder(token)
            yield seq, token
