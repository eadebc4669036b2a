"""Engine-core outputs (new token ids per sequence) -> RequestOutputs (text, logprobs, finish reasons).

One object, used by the API server (on its event loop, fed by the engine process's messages) and by the
offline `LLM` (in-process, after each engine step). It owns everything that needs the tokenizer:
incremental detokenization, stop strings, logprob token texts, accumulation. A sequence whose text hits a
stop string is finished here at once (its later tokens, still in flight in the engine, are dropped) and
reported in `ProcessedOutputs.stop`, so the caller stops it in the engine core before the next step.

Each request asks for one output kind:
- CUMULATIVE: everything so far, whenever it has a new token (vLLM's LLMEngine default);
- DELTA: only what is new (text, token ids, logprobs), whenever new text is visible or it finishes; token ids
  are released together with the text they make, so logprobs line up with the text a delta carries;
- FINAL_ONLY: one cumulative output when it finishes (the offline `generate`, non-streaming HTTP).
"""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field

from atom_server.engine.detokenizer import IncrementalDetokenizer
from atom_server.outputs import (
    CompletionOutput,
    EngineCoreOutputs,
    Logprob,
    PositionLogprobs,
    RequestOutput,
    TokenLogprobs,
)
from atom_server.sampling_params import SamplingParams


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class _Seq:
    index: int
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    sent_tokens: int = 0  # DELTA: what earlier deltas carried
    sent_text: int = 0
    sent_final: bool = False

    def text(self) -> str:
        return self.detok.output_text(self.finish_reason is not None) if self.detok is not None else ""


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: OutputKind
    seqs: list[_Seq]
    prompt_logprobs: list[TokenLogprobs | None] | None
    arrival_time: float = field(default_factory=time.time)
    arrival_mono: float = field(default_factory=time.monotonic)
    first_token_mono: float | None = None
    num_cached_tokens: int = 0
    sent_prompt_logprobs: bool = False

    unfinished: int = -1  # sequences without a finish reason yet

    def __post_init__(self) -> None:
        self.unfinished = len(self.seqs)

    @property
    def finished(self) -> bool:
        return self.unfinished == 0

    def finish(self, seq: _Seq, reason: str, stop_reason: str | int | None = None) -> None:
        if seq.finish_reason is None:
            self.unfinished -= 1
        seq.finish_reason, seq.stop_reason = reason, stop_reason


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    stop: dict[str, list[int]] = field(default_factory=dict)  # request id -> sequences a stop string ended
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why the engine failed it (its
    # output, with finish_reason "error" on the sequences it cut short, is in outputs too)
    finished: dict[str, str | None] = field(default_factory=dict)  # requests that ended: first sequence's reason


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}
        self._token_text = (functools.lru_cache(maxsize=1 << 16)(lambda t: tokenizer.decode([t]))
                            if tokenizer is not None else None)

    # ---- requests ------------------------------------------------------------------------------
    def check(self, params: SamplingParams) -> None:
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer (the engine runs with skip_tokenizer_init)")

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, kind: OutputKind = OutputKind.CUMULATIVE) -> None:
        self.check(params)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        tok = self.tokenizer
        seqs = [_Seq(i, IncrementalDetokenizer(tok, prompt_token_ids, params) if tok is not None else None,
                     logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        self.requests[request_id] = _Request(
            request_id, prompt, list(prompt_token_ids), params, kind, seqs,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Forget a request; its final output (unfinished sequences marked "abort"), or None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for s in req.seqs:
            if s.finish_reason is None:
                req.finish(s, "abort")
        return self._cumulative(req) if req.kind is not OutputKind.DELTA else self._delta(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- engine outputs ------------------------------------------------------------------------
    def process(self, step: EngineCoreOutputs) -> ProcessedOutputs:
        result = ProcessedOutputs()
        requests = self.requests
        for rid, error in step.errors.items():  # the engine failed it: the error, and what it had made so far
            req = requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                if seq.finish_reason is None:
                    req.finish(seq, "error")
            result.errors[rid] = error
            result.finished[rid] = "error"
            result.outputs.append(self._cumulative(req) if req.kind is not OutputKind.DELTA else
                                  self._delta(req) or self._request_output(req, [], None))
        for rid, entries in step.prompt_logprobs.items():
            req = requests.get(rid)
            if req is not None and req.prompt_logprobs is not None:
                req.prompt_logprobs.extend(self._logprob_dict(e) for e in entries)
        for rid, cached in step.num_cached_tokens.items():
            req = requests.get(rid)
            if req is not None:
                req.num_cached_tokens = cached
        finishes = (dict(zip(step.finish_rows, zip(step.finish_reasons, step.stop_token_ids)))
                    if step.finish_rows else None)
        logprobs = step.logprobs or None
        touched: dict[str, _Request] = {}
        for row, (rid, index, token) in enumerate(zip(step.request_ids, step.seq_indices, step.token_ids)):
            req = requests.get(rid)
            if req is None:  # aborted or finished here already: late tokens are dropped
                continue
            seq = req.seqs[index]
            if seq.finish_reason is not None:  # a stop string ended it here; this one was in flight
                continue
            touched[rid] = req
            lp = logprobs.get(row) if logprobs else None
            finish = finishes.get(row) if finishes else None
            if seq.detok is None and lp is None and finish is None:  # token ids only: nothing else to do
                seq.token_ids.append(token)
            else:
                self._add(req, seq, token, lp, finish, result)
        now = time.monotonic()
        for rid, req in touched.items():
            if req.first_token_mono is None:
                req.first_token_mono = now
            finished = req.unfinished == 0
            if finished:
                del requests[rid]
                result.finished[rid] = req.seqs[0].finish_reason
            elif req.kind is OutputKind.FINAL_ONLY:
                continue
            out = self._report(req, finished)
            if out is not None:
                result.outputs.append(out)
        return result

    def _add(self, req: _Request, seq: _Seq, token: int, lp: PositionLogprobs | None,
             finish: tuple[str, int | None] | None, result: ProcessedOutputs) -> None:
        """One new token of a running sequence: text, stop strings, the engine's finish."""
        seq.token_ids.append(token)
        if lp is not None and seq.logprobs is not None:
            seq.logprobs.append(self._logprob_dict(lp))
            seq.cumulative_logprob += lp.logprob
        detok = seq.detok
        if detok is not None:
            p = req.params
            # The text of an EOS / stop token is left out unless asked for (as vLLM).
            by_token = finish is not None and finish[0] == "stop"
            stop_str = detok.add_token(token, detokenize=not by_token or p.include_stop_str_in_output)
            if stop_str is None and finish is not None:
                stop_str = detok.flush()
            if stop_str is not None:
                req.finish(seq, "stop", stop_str)
                if finish is None:  # the engine does not know yet: stop it there
                    result.stop.setdefault(req.request_id, []).append(seq.index)
                return
        if finish is not None:
            req.finish(seq, finish[0], finish[1])

    # ---- RequestOutputs ------------------------------------------------------------------------
    def _report(self, req: _Request, finished: bool) -> RequestOutput | None:
        """The output of a request that took tokens in this step, in the kind it asked for."""
        kind = req.kind
        if kind is OutputKind.FINAL_ONLY:
            return self._cumulative(req) if finished else None
        if kind is OutputKind.CUMULATIVE:
            return self._cumulative(req)
        return self._delta(req)

    def _metrics(self, req: _Request) -> dict[str, float]:
        metrics = {"arrival_time": req.arrival_time, "num_cached_tokens": float(req.num_cached_tokens)}
        if req.first_token_mono is not None:
            metrics["time_to_first_token"] = req.first_token_mono - req.arrival_mono
        return metrics

    def _request_output(self, req: _Request, outputs: list[CompletionOutput],
                        prompt_logprobs: list | None) -> RequestOutput:
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             prompt_logprobs=prompt_logprobs, outputs=outputs, finished=req.finished,
                             metrics=self._metrics(req))

    def _cumulative(self, req: _Request) -> RequestOutput:
        outputs = [CompletionOutput(
            index=s.index, text=s.text(), token_ids=list(s.token_ids),
            cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            logprobs=list(s.logprobs) if s.logprobs is not None else None,
            finish_reason=s.finish_reason, stop_reason=s.stop_reason) for s in req.seqs]
        prompt_logprobs = list(req.prompt_logprobs) if req.prompt_logprobs is not None else None
        return self._request_output(req, outputs, prompt_logprobs)

    def _delta(self, req: _Request) -> RequestOutput | None:
        outputs = []
        for s in req.seqs:
            done = s.finish_reason is not None
            if s.sent_final:
                continue
            if s.detok is not None:
                visible = s.detok.visible_length(done)
                text = s.detok.text[s.sent_text:visible] if visible > s.sent_text else ""
            else:
                visible, text = 0, ""
            # Without a tokenizer there is no text to wait for: tokens go out as they come.
            if not text and not done and (s.detok is not None or len(s.token_ids) == s.sent_tokens):
                continue
            ids = s.token_ids[s.sent_tokens:]
            lps = s.logprobs[s.sent_tokens:] if s.logprobs is not None else None
            s.sent_tokens = len(s.token_ids)
            s.sent_text = max(s.sent_text, visible)
            s.sent_final = done
            outputs.append(CompletionOutput(
                index=s.index, text=text, token_ids=ids,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                logprobs=lps, finish_reason=s.finish_reason, stop_reason=s.stop_reason))
        if not outputs:
            return None
        prompt_logprobs = None
        if not req.sent_prompt_logprobs and req.prompt_logprobs is not None:
            prompt_logprobs = list(req.prompt_logprobs)
            req.sent_prompt_logprobs = True
        return self._request_output(req, outputs, prompt_logprobs)

    def _logprob_dict(self, raw: PositionLogprobs) -> TokenLogprobs:
        text = self._token_text
        out = {raw.token_id: Logprob(raw.logprob, raw.rank, text(raw.token_id) if text else None)}
        for rank, (tid, lp) in enumerate(zip(raw.top_ids, raw.top_logprobs), start=1):
            if tid not in out:
                out[tid] = Logprob(lp, rank, text(tid) if text else None)
        return out
