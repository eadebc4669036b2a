"""The OpenAI-compatible server end to end: a real `python -m atom_server serve` subprocess on a tiny
llama checkpoint, driven with the official `openai` client (httpx for malformed bodies)."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from server_harness import ServerProcess, wait_until, write_chat_checkpoint

API_KEY = "test-key-123"
MODEL = "tiny-chat"
MAX_MODEL_LEN = 256  # the tiny checkpoint's max_position_embeddings


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_chat_checkpoint(tmp_path_factory.mktemp("ckpt"))
    srv = ServerProcess([ckpt, "--served-model-name", MODEL, "--api-key", API_KEY],
                        tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield srv.wait_healthy()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def engine_stats(http) -> dict:
    return http.get("/debug/stats").json()["stats"]


def metric(http, name: str, labels: str = "") -> float:
    text = http.get("/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# ---- happy paths ------------------------------------------------------------------------------------
def test_models_version_health(server, client, http):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == MAX_MODEL_LEN
    assert http.get("/version").json()["version"]
    assert httpx.get(server.url + "/health").status_code == 200  # open without the key


def test_completion_stream_concatenates_to_greedy_text(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=20, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 20
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_stream_role_then_content(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello world!"}], max_tokens=12,
              temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert whole.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_stream_n_choices(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=5, temperature=1.0, seed=11,
        stream=True, extra_body={"ignore_eos": True}))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_concurrent_requests_are_routed_to_their_clients(client):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Numbers: {' '.join(str(j) for j in range(i + 1))}" for i in range(8)]

    def run(prompt):
        out = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=4 + len(prompt) % 5,
                                        temperature=0.7, extra_body={"ignore_eos": True})
        return prompt, out

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, prompts))
    for prompt, out in results:
        assert out.choices[0].text.startswith(prompt)
        assert out.usage.completion_tokens == 4 + len(prompt) % 5


def test_max_completion_tokens(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                         max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_n_choices_and_usage(client):
    out = client.completions.create(model=MODEL, prompt="Hello", n=3, max_tokens=6, temperature=1.0, seed=7,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", n=3, max_tokens=6, temperature=1.0,
                                            seed=7, stream=True, extra_body={"ignore_eos": True}))
    by_index = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)}
    assert by_index == {c.index: c.text for c in out.choices}  # seeded: the stream is the same sample


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=16, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_stop_string_cuts_text(client):
    kw = dict(model=MODEL, prompt="Paged attention", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    m = re.search(r"[A-Za-z]{2}", full[3:])
    assert m, f"no ascii run to stop on in {full!r}"
    stop = m.group(0)
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.index(stop)]
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_prompt_forms_and_echo(client, http):
    ids = http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"
    kw = dict(model=MODEL, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    by_text = client.completions.create(prompt="Hello world", **kw)
    by_ids = client.completions.create(prompt=ids, **kw)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    many = client.completions.create(prompt=["Hello world", "The quick"], n=2, **kw)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert {c.text for c in many.choices if c.index < 2} == {by_text.choices[0].text}
    many_ids = client.completions.create(prompt=[ids, ids], **kw)
    assert [c.text for c in many_ids.choices] == [by_text.choices[0].text] * 2
    echoed = client.completions.create(prompt="Hello world", echo=True, **kw)
    assert echoed.choices[0].text == "Hello world" + by_text.choices[0].text


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True}).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 4
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    echoed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0, logprobs=1,
                                       echo=True, extra_body={"ignore_eos": True}).choices[0].logprobs
    assert echoed.token_logprobs[0] is None and all(x <= 0 for x in echoed.token_logprobs[1:])


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_penalties_and_extra_params_accepted(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0.8, top_p=0.9,
                                    presence_penalty=0.5, frequency_penalty=0.5, seed=3,
                                    extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.2,
                                                "min_tokens": 4, "skip_special_tokens": False})
    assert out.usage.completion_tokens >= 4


# ---- errors ------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    # (path, json body, status, param)
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 100}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 8}, 400, "min_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [999999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * (MAX_MODEL_LEN + 10)}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN + 1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": -1},
     400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
]


def assert_error_object(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_invalid_requests_get_openai_errors(http, path, body, status, param):
    assert_error_object(http.post(path, json=body), status, param)


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_max_model_len(client, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[7] * (MAX_MODEL_LEN + 1), max_tokens=1, stream=stream)
    assert "maximum context length" in e.value.message


def test_malformed_and_wrong_shape_json(http):
    headers = {"Content-Type": "application/json"}
    err = assert_error_object(http.post("/v1/completions", content=b'{"prompt": "x",', headers=headers), 400)
    assert err["code"] == "invalid_json"
    assert_error_object(http.post("/v1/chat/completions", content=b"[1, 2]", headers=headers), 400)


def test_unknown_model_via_openai_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_api_key_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert_error_object(r, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    for scheme in ("bearer", "BEARER", "Bearer "):  # the scheme is case-insensitive (RFC 7235)
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
        assert r.status_code == 200, scheme
    for path in ("/healthz", "/health-check", "/metricsx", "/debug/stats", "/openapi.json"):  # open paths are exact
        assert_error_object(httpx.get(server.url + path), 401)


def test_request_chat_template_needs_trust(http):
    for extra in ({"chat_template": "{{ messages[0]['content'] }}"},
                  {"chat_template_kwargs": {"chat_template": "{{ messages[0]['content'] }}"}}):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **extra}
        err = assert_error_object(http.post("/v1/chat/completions", json=body), 400, "chat_template")
        assert "--trust-request-chat-template" in err["message"]


def test_null_content_is_an_empty_turn(client, http):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "Hi"}]
    empty = [{**m, "content": ""} if m["content"] is None else m for m in msgs]
    kw = dict(model=MODEL, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert (client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
            == client.chat.completions.create(messages=empty, **kw).choices[0].message.content)
    tokens = [http.post("/tokenize", json={"messages": m}).json()["tokens"] for m in (msgs, empty)]
    assert tokens[0] == tokens[1]


# ---- disconnects, metrics ------------------------------------------------------------------------------
LONG_MAX_MODEL_LEN = 16384


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A server whose requests cannot finish before the client leaves: 16k tokens of context to fill."""
    ckpt = write_chat_checkpoint(tmp_path_factory.mktemp("long-ckpt"), max_position_embeddings=LONG_MAX_MODEL_LEN)
    srv = ServerProcess([ckpt, "--served-model-name", MODEL, "--api-key", API_KEY,
                         "--max-model-len", str(LONG_MAX_MODEL_LEN)],
                        tmp_path_factory.mktemp("long-log") / "server.log")
    try:
        yield srv.wait_healthy()
    finally:
        srv.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_request(long_server, stream):
    server = long_server
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    aborted_before = metric(http, "atom:request_success_total", '{finished_reason="abort"}')
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": LONG_MAX_MODEL_LEN - 64, "ignore_eos": True,
            "stream": stream}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                assert wait_until(lambda: engine_stats(http)["num_running"] == 1, 10)
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body, timeout=1.0)
    # the engine dropped the request (16k tokens would take far longer) and freed every block
    def idle():
        s = engine_stats(http)
        return s["num_running"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]

    assert wait_until(idle, 5)
    assert metric(http, "atom:request_success_total", '{finished_reason="abort"}') == aborted_before + 1
    assert metric(http, "atom:request_errors_total", '{status="500"}') == 0  # a disconnect is not a server error
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_exposition(http, client):
    http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 0})  # one 400
    client.completions.create(model=MODEL, prompt="Prefix caching lets requests", max_tokens=3)
    client.completions.create(model=MODEL, prompt="Prefix caching lets requests", max_tokens=3)
    assert metric(http, "atom:prompt_tokens_total") > 0
    assert metric(http, "atom:generation_tokens_total") >= 6
    assert metric(http, "atom:time_to_first_token_seconds_count") >= 2
    assert metric(http, "atom:inter_token_latency_seconds_count") >= 4
    assert metric(http, "atom:request_success_total", '{finished_reason="length"}') >= 2
    assert metric(http, "atom:request_errors_total", '{status="400"}') >= 1
    assert metric(http, "atom:kv_cache_total_blocks") > 0
    assert wait_until(lambda: metric(http, "atom:prefix_cache_hits_total") > 0, 5)
    assert 0 < metric(http, "atom:prefix_cache_hit_rate") <= 1
    text = http.get("/metrics").text
    for name in ("atom:num_requests_running", "atom:num_requests_waiting", "atom:kv_cache_usage_perc"):
        assert re.search(rf"^{name} ", text, re.M)


def test_metrics_under_vllm_names(http, client):
    """vLLM's names and labels (model_name, engine), with the same values as the atom: series."""
    client.completions.create(model=MODEL, prompt="Count: 1 2 3", max_tokens=4, extra_body={"ignore_eos": True})
    labels = f'{{engine="0",model_name="{MODEL}"}}'
    text = http.get("/metrics").text

    def value(name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} is not exported"
        return float(m.group(1))

    for name in ("prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 "request_prompt_tokens_count", "request_generation_tokens_sum", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "num_requests_running",
                 "num_requests_waiting", "kv_cache_usage_perc", "request_time_per_output_token_seconds_count"):
        assert value(f"vllm:{name}{labels}") == value(f"atom:{name}"), name
    success = f'{{engine="0",finished_reason="length",model_name="{MODEL}"}}'
    assert value(f"vllm:request_success_total{success}") == value('atom:request_success_total{finished_reason="length"}')
    assert value(f"vllm:generation_tokens_total{labels}") >= 4


# A realistic value for each refused field; fields without one get a generic non-neutral value.
REFUSED_EXAMPLES = {
    "logit_bias": {"5": 10.0}, "prompt_logprobs": 1, "allowed_token_ids": [1, 2], "bad_words": ["fox"],
    "truncate_prompt_tokens": 8, "truncation_side": "left", "request_id": "my-request", "priority": 5,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "documents": [{"title": "t", "text": "x"}], "reasoning_effort": "low", "suffix": " end",
    "structured_outputs": {"json": {"type": "object"}}, "guided_json": {"type": "object"},
    "guided_regex": "a+", "guided_choice": ["a", "b"], "guided_grammar": "root ::= 'a'",
    "logprob_token_ids": [3], "cache_salt": "salt", "vllm_xargs": {"k": 1}, "stream_interval": 4,
}


def non_neutral(field: str, neutral: tuple):
    if field in REFUSED_EXAMPLES:
        return REFUSED_EXAMPLES[field]
    if any(isinstance(v, bool) for v in neutral):
        return not next(v for v in neutral if isinstance(v, bool))
    if neutral and isinstance(neutral[0], int):
        return neutral[0] + 3
    return {"x": 1}


def _refused_cases():
    from atom_server.protocol import REFUSED_CHAT_FIELDS, REFUSED_COMPLETION_FIELDS

    for endpoint, table in (("/v1/chat/completions", REFUSED_CHAT_FIELDS),
                            ("/v1/completions", REFUSED_COMPLETION_FIELDS)):
        for field, (neutral, _) in sorted(table.items()):
            yield pytest.param(endpoint, field, non_neutral(field, neutral), id=f"{endpoint.split('/')[-1]}-{field}")


@pytest.mark.parametrize("endpoint,field,value", [
    *_refused_cases(),
    ("/v1/completions", "best_of", 3),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "tool_choice", "required"),
])
def test_unsupported_features_are_refused_not_ignored(http, endpoint, field, value):
    body = {"model": MODEL, "max_tokens": 2, field: value}
    body.update({"prompt": "x"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    err = assert_error_object(http.post(endpoint, json=body), 400)
    assert err["param"] == field and "not supported" in err["message"] and field in err["message"]


def test_neutral_values_of_unsupported_fields_and_no_op_fields_are_fine(http):
    """Clients that send every field with its default (or vLLM's no-op fields) get an answer."""
    from atom_server.protocol import REFUSED_CHAT_FIELDS, REFUSED_COMPLETION_FIELDS

    no_ops = {"user": "u1", "session_id": "s1", "length_penalty": 2.0, "mm_payload": "none"}
    for endpoint, table in (("/v1/chat/completions", REFUSED_CHAT_FIELDS),
                            ("/v1/completions", REFUSED_COMPLETION_FIELDS)):
        body = {"model": MODEL, "max_tokens": 2, "response_format": {"type": "text"}, **no_ops}
        body.update({field: neutral[0] if neutral else None for field, (neutral, _) in table.items()})
        body["logit_bias"], body["bad_words"] = {}, []
        if endpoint == "/v1/completions":
            body["prompt"] = "x"
        else:
            body.update(messages=[{"role": "user", "content": "x"}], tool_choice="auto", parallel_tool_calls=False,
                        include_reasoning=False)
        r = http.post(endpoint, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
