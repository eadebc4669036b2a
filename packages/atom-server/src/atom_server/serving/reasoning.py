"""Reasoning parsers (`--reasoning-parser`, vLLM's names): split `<think>...</think>` from the answer.

vLLM's semantics (0.32):
- `deepseek_r1`: the opening `<think>` may be in the prompt (R1's template ends with it) or in the output;
  everything up to `</think>` is reasoning, the rest content; without `</think>` the whole output is reasoning.
- `qwen3`: the same while thinking is on (Qwen3's default; `chat_template_kwargs: {"enable_thinking": false}`
  turns it off and then the whole output is content); a `<tool_call>` also ends the reasoning (it stays in
  the content, for the tool parser).
Responses carry the reasoning as `reasoning_content` and, as vLLM 0.32 names it, `reasoning`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Split:
    reasoning: str | None
    content: str | None


class ReasoningParser:
    name = ""
    start_tag = "<think>"
    end_tag = "</think>"
    implicit_ends: tuple[str, ...] = ()  # tags that end reasoning and stay in the content

    def __init__(self, chat_template_kwargs: dict | None = None):
        self.enabled = True

    def _find_end(self, text: str) -> tuple[int, int] | None:
        """(reasoning end, content start) of the first end tag, or None."""
        hits = []
        at = text.find(self.end_tag)
        if at >= 0:
            hits.append((at, at + len(self.end_tag)))
        for tag in self.implicit_ends:
            at = text.find(tag)
            if at >= 0:
                hits.append((at, at))
        return min(hits) if hits else None

    def split(self, text: str, final: bool = True) -> tuple[str, str, bool]:
        """(reasoning, content, ended) of the text so far. While streaming (final=False) a trailing piece that
        could still become a tag is left out of both."""
        if not self.enabled:
            return "", text, True
        head, tag, rest = text.partition(self.start_tag)
        if tag:
            text = rest  # an opening tag in the output; what came before it (whitespace) is dropped
        elif not final and (not head.strip() or self.start_tag.startswith(head.lstrip())):
            return "", "", False  # could still become (or lead to) the opening tag
        end = self._find_end(text)
        if end is None:
            keep = len(text) if final else len(text) - partial_tag(text, (self.end_tag, *self.implicit_ends))
            return text[:keep], "", False
        return text[:end[0]], text[end[1]:], True

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where the reasoning lies in a whole output, as extract() reads it: [(begin, end)], or [] with thinking
        off (the usage's reasoning_tokens count the tokens in these spans)."""
        if not self.enabled:
            return []
        at = text.find(self.start_tag)
        begin = at + len(self.start_tag) if at >= 0 else 0
        end = self._find_end(text[begin:])
        return [(begin, begin + end[0] if end is not None else len(text))]

    def extract(self, text: str) -> Split:
        """A whole output (non-streaming)."""
        reasoning, content, _ = self.split(text, final=True)
        if not self.enabled:
            return Split(None, text)
        return Split(reasoning or None, content or None)


def partial_tag(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of the tags."""
    for k in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(t.startswith(text[-k:]) for t in tags):
            return k
    return 0


def tokens_in_spans(spans: list[tuple[int, int]], token_ids: list[int], decode: Callable[[list[int]], str]) -> int:
    """How many of token_ids lie wholly inside the character spans of their text (decode(token_ids)): the usage's
    reasoning_tokens. A token's end is the length of the decoded prefix that ends with it, which grows with the
    prefix, so each span's two boundaries are binary searches over prefix decodes (O(log n) decodes). Tags that are
    single tokens (the think tags of Qwen3 and DeepSeek, harmony's markers) are not counted: vLLM's count of the
    tokens between the tags."""
    n = len(token_ids)
    if not spans or not n:
        return 0
    cache: dict[int, int] = {n: len(decode(token_ids))}

    def end_of(k: int) -> int:  # characters of the first k tokens
        if k not in cache:
            cache[k] = len(decode(token_ids[:k])) if k else 0
        return cache[k]

    def first_reaching(offset: int) -> int:  # the fewest tokens whose text reaches offset (n + 1: none does)
        lo, hi = 0, n + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if mid <= n and end_of(mid) >= offset:
                hi = mid
            else:
                lo = mid + 1
        return lo

    total = 0
    for begin, end in spans:
        first = first_reaching(begin)  # tokens before it end at or before begin
        last = min(first_reaching(end + 1) - 1, n)  # tokens up to it end at or before end
        total += max(0, last - first)
    return total


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    implicit_ends = ("<tool_call>",)

    def __init__(self, chat_template_kwargs: dict | None = None):
        super().__init__(chat_template_kwargs)
        self.enabled = (chat_template_kwargs or {}).get("enable_thinking", True) is not False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    DeepSeekR1ReasoningParser.name: DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser.name: Qwen3ReasoningParser,
}


class ReasoningStreamer:
    """Streaming: the text so far in, (reasoning delta, content delta) out."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.text = ""
        self.sent_reasoning = 0
        self.sent_content = 0

    def feed(self, delta: str, final: bool) -> tuple[str, str]:
        self.text += delta
        reasoning, content, _ = self.parser.split(self.text, final)
        r = reasoning[self.sent_reasoning:] if len(reasoning) > self.sent_reasoning else ""
        c = content[self.sent_content:] if len(content) > self.sent_content else ""
        self.sent_reasoning = max(self.sent_reasoning, len(reasoning))
        self.sent_content = max(self.sent_content, len(content))
        return r, c
