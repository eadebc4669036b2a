"""Tool-call parsers: a model's text -> content plus tool calls, whole or while it streams (vLLM's parser names).

- `hermes` (Qwen2, Qwen2.5, Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated;
  content is the text before the first call.
- `llama3_json` (Llama 3.x): the whole output is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several separated by `;`; anything else is content.
- `mistral`: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}` objects, or (v11+ tokenizers)
  `[TOOL_CALLS]name[ARGS]{...}` repeated; content is the text before.
- `deepseek_v3` (DeepSeek-V3, R1): `<｜tool▁calls▁begin｜>` then `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`,
  the arguments in a json code fence, `<｜tool▁call▁end｜>` per call; `deepseek_v31` (DeepSeek-V3.1):
  `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`. Content is the text before the section.
Plus the two forms structured outputs force (chat.py picks them for tool_choice): `required` (a JSON array of
`{"name", "parameters"}`, vLLM's schema) and a named function (the output is the arguments object itself).

Every parser implements `calls(text, final)`: the calls found so far, each with its name (once complete) and
the raw text of its arguments (a prefix while it is still being written). Streaming re-reads the tool-call
section on each delta and sends what grew (`ToolCallStreamer`), so every parser gets OpenAI's streamed shape
for free: a first delta with the call's index, id, type and name, then argument text in order.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from atom_server.serving.reasoning import partial_tag

_WS = " \t\r\n"
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class PartialCall:
    name: str | None  # None until its string is complete
    arguments: str  # the raw JSON text of the arguments so far
    complete: bool  # the arguments value (and name) are complete


# ---- a tolerant scanner of (possibly unfinished) JSON ------------------------------------------------------
def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """text[i] is a quote: the index after the closing quote, or None if the string is unfinished."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def value_end(text: str, i: int, final: bool = False) -> int | None:
    """The index after the JSON value starting at text[i] (None while it is unfinished)."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = _string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}]" + _WS:
        j += 1
    return j if (j < len(text) or final) and j > i else None


def object_fields(text: str, i: int, final: bool = False) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The top-level fields of the JSON object starting at text[i] ('{'): key -> (value start, value end or
    None while unfinished), and the index after the object's '}' (None while it is open)."""
    fields: dict[str, tuple[int, int | None]] = {}
    i += 1
    while True:
        i = _skip_ws(text, i)
        if i >= len(text):
            return fields, None
        c = text[i]
        if c == "}":
            return fields, i + 1
        if c == ",":
            i += 1
            continue
        if c != '"':
            return fields, None  # not JSON: stop here
        end = _string_end(text, i)
        if end is None:
            return fields, None
        try:
            key = json.loads(text[i:end])
        except json.JSONDecodeError:
            return fields, None
        i = _skip_ws(text, end)
        if i >= len(text) or text[i] != ":":
            return fields, None
        start = _skip_ws(text, i + 1)
        if start >= len(text):
            return fields, None
        vend = value_end(text, start, final)
        fields[key] = (start, vend)
        if vend is None:
            return fields, None
        i = vend


def call_from_object(text: str, i: int, final: bool = False,
                     keys: tuple[str, ...] = ARGUMENT_KEYS) -> tuple[PartialCall | None, int | None]:
    """A call object {"name": ..., "arguments"|"parameters": ...} at text[i]: the call so far and the index
    after the object (None while open)."""
    fields, end = object_fields(text, i, final)
    name = None
    if "name" in fields and fields["name"][1] is not None:
        s, e = fields["name"]
        try:
            value = json.loads(text[s:e])
            name = value if isinstance(value, str) else None
        except json.JSONDecodeError:
            pass
    args, args_done = "", False
    for key in keys:
        if key in fields:
            s, e = fields[key]
            args, args_done = text[s:e if e is not None else len(text)], e is not None
            break
    else:
        if end is not None:  # a call without arguments
            args, args_done = "{}", True
    if name is None and not args:
        return (None if end is None else PartialCall(None, "", True)), end
    return PartialCall(name, args, args_done and name is not None), end


def calls_in_array(text: str, i: int, final: bool = False,
                   keys: tuple[str, ...] = ARGUMENT_KEYS) -> list[PartialCall]:
    """Call objects in the JSON array starting at text[i] ('[')."""
    calls: list[PartialCall] = []
    i += 1
    while True:
        i = _skip_ws(text, i)
        if i >= len(text) or text[i] == "]":
            return calls
        if text[i] == ",":
            i += 1
            continue
        if text[i] != "{":
            return calls
        call, end = call_from_object(text, i, final, keys)
        if call is not None:
            calls.append(call)
        if end is None:
            return calls
        i = end


# ---- parsers -------------------------------------------------------------------------------------------------
class ToolParser:
    """start(text): where the tool-call section begins (None: not yet / never); calls(section, final)."""

    name = ""
    markers: tuple[str, ...] = ()  # strings that open the section (a suffix of content that could be the start
    # of one is held back while streaming)

    def start(self, text: str) -> int | None:
        hits = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(hits) if hits else None

    def held_back(self, text: str) -> int:
        """How many trailing characters of text could still become a marker."""
        for k in range(min(len(text), max(map(len, self.markers), default=0)), 0, -1):
            if any(m.startswith(text[-k:]) for m in self.markers):
                return k
        return 0

    def calls(self, section: str, final: bool) -> list[PartialCall]:
        raise NotImplementedError


class HermesToolParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    END = "</tool_call>"

    def calls(self, section: str, final: bool) -> list[PartialCall]:
        out = []
        pos = 0
        while True:
            at = section.find(self.markers[0], pos)
            if at < 0:
                return out
            body_start = _skip_ws(section, at + len(self.markers[0]))
            close = section.find(self.END, body_start)
            body = section[body_start:close if close >= 0 else len(section)]
            if body.startswith("{"):
                call, _ = call_from_object(body, 0, final or close >= 0)
                if call is not None:
                    out.append(call)
            if close < 0:
                return out
            pos = close + len(self.END)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")
    TAG = "<|python_tag|>"

    def start(self, text: str) -> int | None:
        stripped = len(text) - len(text.lstrip())
        rest = text[stripped:]
        if rest.startswith(self.TAG) or rest.startswith("{"):
            return stripped
        return None

    def held_back(self, text: str) -> int:
        rest = text.lstrip()
        return len(text) if rest and self.TAG.startswith(rest) else (len(text) if not rest else 0)

    def calls(self, section: str, final: bool) -> list[PartialCall]:
        text = section[len(self.TAG):] if section.startswith(self.TAG) else section
        out = []
        i = 0
        while True:
            i = _skip_ws(text, i)
            while i < len(text) and text[i] in ";" + _WS:
                i += 1
            if i >= len(text) or text[i] != "{":
                return out
            call, end = call_from_object(text, i, final)
            if call is not None:
                out.append(call)
            if end is None:
                return out
            i = end


class MistralToolParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    ARGS = "[ARGS]"

    def calls(self, section: str, final: bool) -> list[PartialCall]:
        marker = self.markers[0]
        body = section[len(marker):]
        i = _skip_ws(body, 0)
        if i < len(body) and body[i] == "[":
            return calls_in_array(body, i, final)
        out = []
        for part in section.split(marker)[1:]:  # v11+: name[ARGS]{...}
            name, sep, args = part.partition(self.ARGS)
            if not sep:
                continue
            a = _skip_ws(args, 0)
            end = value_end(args, a, final)
            raw = args[a:end if end is not None else len(args)]
            out.append(PartialCall(name.strip(), raw, end is not None))
        return out


class DeepSeekV31ToolParser(ToolParser):
    """DeepSeek-V3.1: `<｜tool▁calls▁begin｜>` then per call `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS
    <｜tool▁call▁end｜>` (arguments: a JSON object), `<｜tool▁calls▁end｜>` after the last."""

    name = "deepseek_v31"
    markers = ("<｜tool▁calls▁begin｜>",)
    CALL, SEP, END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"

    def _name_and_body(self, section: str, sep: int, at: int) -> tuple[str | None, int]:
        """(the call's name, where its arguments start; -1: not yet written)."""
        return section[at + len(self.CALL):sep].strip(), sep + len(self.SEP)

    def _arguments(self, section: str, body: int, end: int) -> str:
        return section[body:end].strip() if end >= 0 else section[body:].lstrip()

    def calls(self, section: str, final: bool) -> list[PartialCall]:
        out = []
        pos = 0
        while True:
            at = section.find(self.CALL, pos)
            if at < 0:
                return out
            sep = section.find(self.SEP, at)
            if sep < 0:
                return out
            name, body = self._name_and_body(section, sep, at)
            if name is None or body < 0:
                return out
            end = section.find(self.END, body)
            raw = self._arguments(section, body, end)
            if end < 0 and not final:  # a suffix that may still become the end marker stays back
                raw = raw[:len(raw) - partial_tag(raw, (self.tail(),))]
            out.append(PartialCall(name, raw, end >= 0 or final))
            if end < 0:
                return out
            pos = end + len(self.END)

    def tail(self) -> str:
        return self.END


class DeepSeekV3ToolParser(DeepSeekV31ToolParser):
    """DeepSeek-V3 / R1: per call `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` newline, then the arguments in
    a json code fence, then `<｜tool▁call▁end｜>`."""

    name = "deepseek_v3"
    FENCE, CLOSE = "```json\n", "\n```"

    def _name_and_body(self, section: str, sep: int, at: int) -> tuple[str | None, int]:
        line = section.find("\n", sep)
        if line < 0:
            return None, -1
        fence = line + 1
        if not section.startswith(self.FENCE, fence):  # not yet written, or not this format: no call (yet)
            return None, -1
        return section[sep + len(self.SEP):line].strip(), fence + len(self.FENCE)

    def _arguments(self, section: str, body: int, end: int) -> str:
        if end >= 0:
            return section[body:end].removesuffix(self.CLOSE)
        return section[body:]

    def tail(self) -> str:
        return self.CLOSE + self.END


class RequiredToolParser(ToolParser):
    """tool_choice "required": the output is a JSON array of {"name", "parameters"} (forced by its grammar)."""

    name = "required"
    markers = ("[",)

    def start(self, text: str) -> int | None:
        i = _skip_ws(text, 0)
        return i if i < len(text) else None

    def held_back(self, text: str) -> int:
        return len(text)

    def calls(self, section: str, final: bool) -> list[PartialCall]:
        return calls_in_array(section, 0, final) if section.startswith("[") else []


class NamedToolParser(ToolParser):
    """tool_choice naming a function: the whole output is its arguments (forced by its grammar)."""

    name = "named"

    def __init__(self, function: str):
        self.function = function

    def start(self, text: str) -> int | None:
        return 0

    def held_back(self, text: str) -> int:
        return 0

    def calls(self, section: str, final: bool) -> list[PartialCall]:
        text = section.lstrip()
        end = value_end(text, 0, final) if text else None
        return [PartialCall(self.function, text[:end] if end is not None else text, end is not None)]


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
    MistralToolParser.name: MistralToolParser,
    DeepSeekV3ToolParser.name: DeepSeekV3ToolParser,
    DeepSeekV31ToolParser.name: DeepSeekV31ToolParser,
}


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


def normalized_arguments(raw: str) -> str | None:
    """The arguments as JSON text of an object (vLLM sends json.dumps of what the model wrote); None when the
    raw text is not JSON."""
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return None
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return json.dumps(value, ensure_ascii=False)


@dataclass
class ExtractedToolCalls:
    content: str | None
    tool_calls: list[dict]

    @property
    def called(self) -> bool:
        return bool(self.tool_calls)


def extract_tool_calls(parser: ToolParser, text: str) -> ExtractedToolCalls:
    """A whole output: its content and OpenAI tool_calls. Calls that are not valid JSON leave the text as
    content (as vLLM does)."""
    at = parser.start(text)
    if at is None:
        return ExtractedToolCalls(text, [])
    calls = []
    for call in parser.calls(text[at:], final=True):
        args = normalized_arguments(call.arguments) if call.complete else None
        if call.name is None or args is None:
            return ExtractedToolCalls(text, [])
        calls.append({"id": tool_call_id(), "type": "function",
                      "function": {"name": call.name, "arguments": args}})
    if not calls:
        return ExtractedToolCalls(text, [])
    content = text[:at]
    return ExtractedToolCalls(content if content.strip() else None, calls)


class ToolCallStreamer:
    """Streaming: the text so far in, (content delta, tool-call deltas in OpenAI's shape) out."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.section_at: int | None = None
        self.sent_content = 0
        self.sent: list[tuple[str, int]] = []  # per call: (id, argument characters sent); name sent with the id

    def feed(self, delta: str, final: bool) -> tuple[str, list[dict]]:
        self.text += delta
        text = self.text
        if self.section_at is None:
            self.section_at = self.parser.start(text)
        if self.section_at is None:
            visible = len(text) if final else len(text) - self.parser.held_back(text)
            content, self.sent_content = text[self.sent_content:visible], max(self.sent_content, visible)
            return content, []
        content = text[self.sent_content:self.section_at] if self.section_at > self.sent_content else ""
        self.sent_content = max(self.sent_content, self.section_at)
        deltas = []
        for index, call in enumerate(self.parser.calls(text[self.section_at:], final)):
            if index >= len(self.sent):
                if call.name is None:
                    break
                cid = tool_call_id()
                self.sent.append((cid, 0))
                deltas.append({"index": index, "id": cid, "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            cid, done = self.sent[index]
            if len(call.arguments) > done:
                deltas.append({"index": index, "function": {"arguments": call.arguments[done:]}})
                self.sent[index] = (cid, len(call.arguments))
        return content, deltas

    @property
    def called(self) -> bool:
        return bool(self.sent)
