"""Incremental detokenization with stop strings.

Text grows by decoding a short window of recent ids and keeping what the newest token added, so
multi-token characters and tokenizers that drop a leading space at the start of a decode come out
right. The text handed out never ends in a partial stop string: a suffix that could still become one
is held back until it either completes (and is cut) or is ruled out.
"""

from __future__ import annotations

from atom_server.sampling_params import SamplingParams

_PROMPT_CONTEXT = 5  # prompt ids decoded as left context for the first generated tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.num_output_tokens = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, detokenize: bool = True) -> str | None:
        """Feed one generated id; returns the stop string it completed, if any (text is then cut)."""
        self.num_output_tokens += 1
        if self.stopped or not detokenize or self.tokenizer is None:
            return None
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str | None:
        """At the end of generation: emit what was held back waiting for a character to complete."""
        if self.stopped or self.tokenizer is None or self.read_offset == len(self.ids):
            return None
        return self._advance(final=True)

    def _advance(self, final: bool) -> str | None:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return None  # an incomplete character: wait for the next token
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = len(self.text)
        self.text += new
        if self.stop and self.num_output_tokens > self.min_tokens:
            return self._check_stop(start)
        return None

    def _check_stop(self, new_start: int) -> str | None:
        longest = max(len(s) for s in self.stop)
        search_from = max(0, new_start - longest + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        self.text = self.text[:at + len(s)] if self.include_stop else self.text[:at]
        self.stopped = True
        return s

    def output_text(self, finished: bool) -> str:
        """The text so far, less any tail that may still turn into a stop string."""
        n = self.visible_length(finished)
        return self.text if n == len(self.text) else self.text[:n]

    def visible_length(self, finished: bool) -> int:
        """How much of the text may be handed out: all of it, less a tail that is the start of a stop string."""
        text = self.text
        if finished or self.stopped or not self.stop or not text:
            return len(text)
        hold = 0
        last = text[-1]
        for s in self.stop:
            # Longest k with text ending in s[:k] (k < len(s)); only a k whose s[k-1] is the text's last
            # character can match, so walk those from the longest down.
            k = s.rfind(last, 0, min(len(s) - 1, len(text))) + 1
            while k > hold:
                if text.endswith(s[:k]):
                    hold = k
                    break
                k = s.rfind(last, 0, k - 1) + 1
        return len(text) - hold
