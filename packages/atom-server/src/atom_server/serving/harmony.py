"""GPT-OSS's harmony format in chat completions: the assistant turn's messages -> reasoning, content, tool calls.

A gpt-oss completion is a run of messages, each a header and a body (the prompt ends with `<|start|>assistant`):

    <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>
    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>

vLLM 0.32's rules (its `HarmonyParser` over openai_harmony's `StreamableParser`), which this module follows on the
text the detokenizer gives with the special tokens kept:
- a message whose recipient is a function (`functions.NAME`, or a bare name that is not a built-in tool) is a tool
  call (its body the arguments; whole outputs get `json.dumps(json.loads(body))` when the content type is absent or
  says json); the `analysis` channel is reasoning; `final`, and `commentary` without a recipient, is content;
  anything else (built-in tools' messages, other roles) is dropped. Whole outputs join the parts with newlines.
- only `<|end|>`, `<|call|>` and `<|return|>` end a body (other markers inside it are text); after one, anything
  before the next `<|start|>` is skipped.
- a header that does not parse (words it does not know, a channel marker without a name) and an output that ends
  inside a header turn the text since the last whole message into content, raw (the model did not speak harmony).
The oracle in tests is openai_harmony (oss-harmony) itself: its rendering of random messages, parsed there and here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from atom_server.serving.openai_format import chat_delta
from atom_server.serving.reasoning import partial_tag
from atom_server.serving.tool_parsers import tool_call_id

START, END, MESSAGE, CHANNEL, CONSTRAIN = "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>"
RETURN, CALL = "<|return|>", "<|call|>"
TERMINATORS = (END, CALL, RETURN)
# The stop tokens of an assistant turn (vLLM takes them from gpt-oss's generation_config.json; a tokenizer that
# knows them gets them as stop_token_ids too).
STOP_TOKENS = (RETURN, CALL)
_BUILTIN_TOOLS = ("python", "browser", "container")  # vLLM's BUILTIN_TOOL_TO_MCP_SERVER_LABEL keys
REASONING_EFFORTS = ("low", "medium", "high")  # what gpt-oss's system message takes
# vLLM's parser names for gpt-oss (--reasoning-parser openai_gptoss, --tool-call-parser openai).
HARMONY_REASONING_PARSER, HARMONY_TOOL_PARSER = "openai_gptoss", "openai"
HARMONY_MODEL_TYPES = ("gpt_oss",)


def check_parsers(model_type: str | None, reasoning_parser: str | None, tool_call_parser: str | None) -> bool:
    """Whether the served model speaks harmony; a parser that does not fit the model is a start-up error."""
    harmony = model_type in HARMONY_MODEL_TYPES
    if harmony:
        if reasoning_parser not in (None, HARMONY_REASONING_PARSER):
            raise ValueError(f"--reasoning-parser {reasoning_parser} does not read {model_type} models, which "
                             f"answer in the harmony format: use {HARMONY_REASONING_PARSER} (their default)")
        if tool_call_parser not in (None, HARMONY_TOOL_PARSER):
            raise ValueError(f"--tool-call-parser {tool_call_parser} does not read {model_type} models, which "
                             f"answer in the harmony format: use {HARMONY_TOOL_PARSER}")
    else:
        for flag, name in (("--reasoning-parser", reasoning_parser), ("--tool-call-parser", tool_call_parser)):
            if name in (HARMONY_REASONING_PARSER, HARMONY_TOOL_PARSER):
                raise ValueError(f"{flag} {name} reads the harmony format of gpt-oss models; the served model "
                                 f"is {model_type or 'of an unknown type'}")
    return harmony


def harmony_stop_ids(tokenizer) -> list[int]:
    """The ids of <|return|> and <|call|> in the tokenizer (those it has as tokens)."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in STOP_TOKENS if t in vocab]


def spells_harmony(spec) -> bool:
    """Whether a structured-output constraint writes harmony's markers itself (then it constrains the whole turn,
    not the final message)."""
    text = json.dumps([spec.json, spec.regex, spec.choice, spec.grammar], default=str)
    return any(json.dumps(m)[1:-1] in text for m in (START, CHANNEL, MESSAGE, END))


class HeaderError(ValueError):
    pass


@dataclass
class Header:
    role: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


def _words(text: str) -> list[str]:
    """The header split at whitespace, with `<|constrain|>` starting a word of its own."""
    return text.replace(CONSTRAIN, " " + CONSTRAIN).split()


def parse_header(text: str, role: str | None) -> Header:
    """The header between a message's start (or the turn's start: role given) and `<|message|>`."""
    if role is None:  # after <|start|>: the role comes first
        cut = min((i for i in (text.find(" "), text.find(CHANNEL), text.find(CONSTRAIN), text.find("\n"))
                   if i >= 0), default=len(text))
        role, text = text[:cut], text[cut:]
        if not role:
            raise HeaderError("a message without a role")
    elif text.startswith(START):  # the turn's first message repeating the prompt's <|start|>assistant
        head = text[len(START):]
        cut = min((i for i in (head.find(" "), head.find(CHANNEL)) if i >= 0), default=len(head))
        role, text = head[:cut] or role, head[cut:]
    header = Header(role)
    if CHANNEL in text:
        before, _, after = text.partition(CHANNEL)
        if not after or after[0].isspace():
            raise HeaderError("a channel marker without a channel")
        name, *rest = after.split(maxsplit=1)
        if CONSTRAIN in name:  # "final<|constrain|>json"
            name, _, tail = name.partition(CONSTRAIN)
            rest = [CONSTRAIN + tail + (" " + rest[0] if rest else "")]
        header.channel = name
        text = before + " " + (rest[0] if rest else "")
    for word in _words(text):
        if word.startswith("to=") and header.recipient is None:
            header.recipient = word[3:]
        elif header.content_type is None and (word.startswith(CONSTRAIN) or header.channel is not None):
            header.content_type = word
        else:
            raise HeaderError(f"unexpected words in a message header: {word!r}")
    return header


def is_function_recipient(recipient: str | None) -> bool:
    """vLLM's rule for the chat API: functions.NAME, or a bare name that is not a built-in tool nor the assistant."""
    if not recipient or recipient.startswith("<|") or recipient == "assistant":
        return False
    if recipient.startswith("functions."):
        return len(recipient) > len("functions.")
    return recipient.split(".", 1)[0] not in _BUILTIN_TOOLS


def function_name(recipient: str) -> str:
    return recipient.removeprefix("functions.")


def kind_of(header: Header) -> str:
    """tool | reasoning | content | ignore (vLLM's segment types)."""
    if header.recipient and is_function_recipient(header.recipient):
        return "tool"
    if header.channel == "analysis":
        return "reasoning"
    if header.channel == "final" or (header.channel == "commentary" and header.recipient is None):
        return "content"
    return "ignore"


def tool_arguments(header: Header, body: str) -> str:
    """A whole tool call's arguments as vLLM returns them."""
    if header.content_type is not None and "json" not in header.content_type:
        return body
    try:
        return json.dumps(json.loads(body))
    except json.JSONDecodeError:
        return body


@dataclass
class Event:
    """What one feed produced: text of the message in progress (kind from its header) or a whole message."""
    kind: str
    text: str = ""
    header: Header | None = None
    done: bool = False  # a whole message: text is its body


@dataclass
class HarmonyParser:
    """Incremental: text deltas of the completion in, events out. States: header (the first message's header
    follows the prompt's `<|start|>assistant`), body, between (after a terminator, until `<|start|>`), raw (a
    header did not parse: everything since the last whole message is raw text, given as content at the end)."""

    state: str = "header"
    buf: str = ""  # text not yet consumed
    pending: str = ""  # raw text since the last whole message (the recovery's content)
    header_text: str = ""
    role: str | None = "assistant"
    header: Header | None = None
    body: str = ""
    messages: list[tuple[Header, str]] = field(default_factory=list)

    def feed(self, delta: str, final: bool) -> list[Event]:
        self.buf += delta
        events: list[Event] = []
        while True:
            if self.state == "between":
                at = self.buf.find(START)
                if at < 0:
                    keep = partial_tag(self.buf, (START,)) if not final else 0
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                self.buf = self.buf[at + len(START):]
                self.pending, self.header_text, self.role, self.state = START, "", None, "header"
            elif self.state == "header":
                at = self.buf.find(MESSAGE)
                if at < 0:
                    keep = 0 if final else partial_tag(self.buf, (MESSAGE,))
                    taken, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                    self.header_text += taken
                    self.pending += taken
                    break
                self.header_text += self.buf[:at]
                self.pending += self.buf[:at + len(MESSAGE)]
                self.buf = self.buf[at + len(MESSAGE):]
                try:
                    self.header = parse_header(self.header_text, self.role)
                except HeaderError:
                    self.state = "raw"
                    continue
                self.body, self.state = "", "body"
                events.append(Event(kind_of(self.header), header=self.header))
            elif self.state == "body":
                ends = [(i, t) for t in TERMINATORS if (i := self.buf.find(t)) >= 0]
                if ends:
                    at, tag = min(ends)
                    text, self.buf = self.buf[:at], self.buf[at + len(tag):]
                    self.body += text
                    if text:
                        events.append(Event(kind_of(self.header), text, self.header))
                    self._finish(events)
                    continue
                keep = 0 if final else partial_tag(self.buf, TERMINATORS)
                text, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                self.body += text
                if text:
                    events.append(Event(kind_of(self.header), text, self.header))
                break
            else:  # raw
                self.pending += self.buf
                self.buf = ""
                break
        if final:
            if self.state == "body":
                self._finish(events)
            elif self.state in ("header", "raw") and self.pending:
                header = Header("assistant", "final")
                events.append(Event("content", self.pending, header))
                events.append(Event("content", self.pending, header, done=True))
                self.messages.append((header, self.pending))
                self.pending = ""
        return events

    def _finish(self, events: list[Event]) -> None:
        self.messages.append((self.header, self.body))
        events.append(Event(kind_of(self.header), self.body, self.header, done=True))
        self.state, self.pending, self.body = "between", "", ""


@dataclass
class HarmonyResult:
    reasoning: str | None
    content: str | None
    tool_calls: list[tuple[str, str]]  # (name, arguments)


def parse_completion(text: str) -> HarmonyResult:
    """A whole completion (vLLM's `HarmonyParser.parse`)."""
    parser = HarmonyParser()
    parser.feed(text, final=True)
    reasoning, content, calls = [], [], []
    for header, body in parser.messages:
        if header.role != "assistant":
            continue
        kind = kind_of(header)
        if kind == "reasoning" and body:
            reasoning.append(body)
        elif kind == "content" and body:
            content.append(body)
        elif kind == "tool":
            calls.append((function_name(header.recipient), tool_arguments(header, body)))
    return HarmonyResult("\n".join(reasoning) or None, "\n".join(content) or None, calls)


def reasoning_spans(text: str) -> list[tuple[int, int]]:
    """Where the bodies of a whole completion's reasoning (analysis) messages lie in it, as parse_completion reads
    them (the usage's reasoning_tokens count the tokens in these spans)."""
    parser = HarmonyParser()
    parser.feed(text, final=True)
    spans, pos = [], 0
    for header, body in parser.messages:
        at = text.find(MESSAGE, pos)
        while at >= 0 and not text.startswith(body, at + len(MESSAGE)):  # a marker in a skipped stretch
            at = text.find(MESSAGE, at + 1)
        if at < 0:  # the recovery's raw content (the last message): no body of its own
            break
        begin = at + len(MESSAGE)
        pos = begin + len(body)
        if header.role == "assistant" and kind_of(header) == "reasoning" and body:
            spans.append((begin, pos))
    return spans


class HarmonyOutput:
    """One choice of a chat completion from a harmony model: the chat layer's interface (serving/chat.py's
    _ChoiceOutput): delta() while streaming, message() for a whole output, tools_called."""

    def __init__(self, surface_tools: bool, include_reasoning: bool):
        self.surface_tools = surface_tools  # auto tool choice with --tool-call-parser openai
        self.include_reasoning = include_reasoning
        self.parser = HarmonyParser()
        self.num_calls = 0

    def delta(self, text: str, final: bool) -> dict:

        reasoning, content, calls = "", "", []
        for ev in self.parser.feed(text, final):
            if ev.done:
                continue
            if ev.kind == "reasoning":
                reasoning += ev.text
            elif ev.kind == "content":
                content += ev.text
            elif ev.kind == "tool" and self.surface_tools:
                if not ev.text:  # the header: a new call
                    calls.append({"index": self.num_calls, "id": tool_call_id(), "type": "function",
                                  "function": {"name": function_name(ev.header.recipient), "arguments": ""}})
                    self.num_calls += 1
                elif calls and calls[-1]["index"] == self.num_calls - 1:
                    calls[-1]["function"]["arguments"] += ev.text
                else:
                    calls.append({"index": self.num_calls - 1, "function": {"arguments": ev.text}})
        return chat_delta(reasoning, content, calls, self.include_reasoning)

    @property
    def tools_called(self) -> bool:
        return self.num_calls > 0

    def reasoning_spans(self, text: str) -> list[tuple[int, int]]:
        return reasoning_spans(text)

    def message(self, text: str) -> tuple[dict, bool]:
        result = parse_completion(text)
        message: dict = {"role": "assistant", "content": result.content}
        if self.include_reasoning:
            message["reasoning_content"] = message["reasoning"] = result.reasoning
        calls = [{"id": tool_call_id(), "type": "function", "function": {"name": name, "arguments": args}}
                 for name, args in result.tool_calls] if self.surface_tools else []
        message["tool_calls"] = calls
        return message, bool(calls)
