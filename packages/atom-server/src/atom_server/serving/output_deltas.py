"""Engine outputs cross the socket as deltas: the engine reports cumulative RequestOutputs (text and
token ids so far), which would make every step resend whole sequences (quadratic in length). The
engine side sends only what is new; the API-server side rebuilds the cumulative RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field

from atom_server.outputs import CompletionOutput, RequestOutput
from atom_server.serving.wire import CompletionDelta, RequestDelta


@dataclass
class _Sent:
    prompt_logprobs_len: int = -1
    texts: dict[int, str] = field(default_factory=dict)
    num_tokens: dict[int, int] = field(default_factory=dict)


class DeltaEncoder:
    """Engine side: what each request has been sent so far."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def encode(self, out: RequestOutput) -> RequestDelta:
        first = out.request_id not in self._sent
        sent = self._sent.setdefault(out.request_id, _Sent())
        prompt_logprobs = None
        if out.prompt_logprobs is not None and len(out.prompt_logprobs) != sent.prompt_logprobs_len:
            prompt_logprobs = out.prompt_logprobs
            sent.prompt_logprobs_len = len(out.prompt_logprobs)
        completions = []
        for co in out.outputs:
            prev_text = sent.texts.get(co.index, "")
            n = sent.num_tokens.get(co.index, 0)
            append = co.text.startswith(prev_text)  # text is append-only in practice; never trust it blindly
            completions.append(CompletionDelta(
                index=co.index, text=co.text[len(prev_text):] if append else co.text, text_reset=not append,
                token_ids=co.token_ids[n:], logprobs=co.logprobs[n:] if co.logprobs is not None else None,
                cumulative_logprob=co.cumulative_logprob, finish_reason=co.finish_reason,
                stop_reason=co.stop_reason))
            sent.texts[co.index] = co.text
            sent.num_tokens[co.index] = len(co.token_ids)
        if out.finished:
            del self._sent[out.request_id]
        return RequestDelta(request_id=out.request_id, finished=out.finished, metrics=out.metrics,
                            outputs=completions, prompt=out.prompt if first else None,
                            prompt_token_ids=out.prompt_token_ids if first else None,
                            prompt_logprobs=prompt_logprobs)


class DeltaDecoder:
    """API-server side: the cumulative RequestOutput of each live request."""

    def __init__(self) -> None:
        self._outputs: dict[str, RequestOutput] = {}

    def apply(self, d: RequestDelta) -> RequestOutput:
        out = self._outputs.get(d.request_id)
        if out is None:
            out = RequestOutput(request_id=d.request_id, prompt=d.prompt, prompt_token_ids=d.prompt_token_ids or [],
                                prompt_logprobs=None, outputs=[], finished=False)
            self._outputs[d.request_id] = out
        if d.prompt_logprobs is not None:
            out.prompt_logprobs = d.prompt_logprobs
        by_index = {co.index: co for co in out.outputs}
        for cd in d.outputs:
            co = by_index.get(cd.index)
            if co is None:
                co = CompletionOutput(index=cd.index, text="", token_ids=[],
                                      logprobs=[] if cd.logprobs is not None else None)
                out.outputs.append(co)
                by_index[cd.index] = co
            co.text = cd.text if cd.text_reset else co.text + cd.text
            co.token_ids.extend(cd.token_ids)
            if cd.logprobs is not None:
                if co.logprobs is None:
                    co.logprobs = []
                co.logprobs.extend(cd.logprobs)
            co.cumulative_logprob = cd.cumulative_logprob
            co.finish_reason = cd.finish_reason
            co.stop_reason = cd.stop_reason
        out.outputs.sort(key=lambda c: c.index)
        out.finished = d.finished
        out.metrics = d.metrics
        if d.finished:
            del self._outputs[d.request_id]
        return out

    def forget(self, request_id: str) -> None:
        self._outputs.pop(request_id, None)
