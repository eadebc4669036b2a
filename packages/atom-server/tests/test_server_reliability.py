"""No request may take the server down, stall it, or run unbounded work (one real `atom serve` for the module,
with small limits): a schemathesis fuzz run over the server's own /openapi.json gives no 5xx and leaves the
same engine alive and idle; every integer field at the int64 edges gives a 400; /health answers within 1 s
while a hostile chat template or a 10 MB prompt is being dealt with; body size and work limits answer
413/400 naming the limit. Plus the liveness, IPC-cleanup and error-body logic on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_harness import ServerProcess, wait_until, write_chat_checkpoint

MODEL = "tiny"
MAX_MODEL_LEN = 64
BODY_LIMIT = 12 << 20
LIMITS = ["--max-prompts-per-request", "4", "--max-seqs-per-request", "8", "--max-logprobs", "5",
          "--max-request-body-bytes", str(BODY_LIMIT), "--trust-request-chat-template",
          "--chat-template-timeout", "3"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_chat_checkpoint(tmp_path_factory.mktemp("ckpt"))
    srv = ServerProcess([ckpt, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN), *LIMITS],
                        tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield srv.wait_healthy()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def engine_pid(server):
    return server.engine_pid()


def _post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=kw.pop("timeout", 60), **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _assert_alive_and_idle(server, engine_pid: int) -> None:
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.engine_pid() == engine_pid  # the same engine process: nothing killed or restarted it
    r = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

    def idle():
        s = httpx.get(server.url + "/debug/stats", timeout=10).json()["stats"]
        return s["num_running"] == s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]

    assert wait_until(idle, 10)


class HealthProbe:
    """Polls /health from a thread; the slowest answer is the liveness figure."""

    def __init__(self, server):
        self.url = server.url + "/health"
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=10) as c:
            while not self._stop.is_set():
                t = time.monotonic()
                status = c.get(self.url).status_code
                self.latencies.append(time.monotonic() - t)
                assert status == 200
                time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)


# ---- integers at the int64 edges, in every integer field of every request body ----------------------
MINIMAL_BODIES = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1]},
}
EDGES = [1 << 63, 1 << 64, -(1 << 63) - 1]


def _integer_fields(schema: dict, model: dict) -> list[tuple[str, int]]:
    """(field, nesting) of every integer-typed property: 0 a number, 1 a list of them, 2 a list of lists."""

    def depth(s) -> int | None:
        if "$ref" in s:
            return None
        if s.get("type") == "integer":
            return 0
        if s.get("type") == "array":
            d = depth(s.get("items", {}))
            return None if d is None else d + 1
        for alt in s.get("anyOf", []):
            d = depth(alt)
            if d is not None:
                return d
        return None

    out = []
    for name, prop in model.get("properties", {}).items():
        alts = prop.get("anyOf", [prop])
        for alt in alts:
            d = depth(alt)
            if d is not None:
                out.append((name, d))
    return out


def test_int64_edges_in_every_integer_field(server, engine_pid):
    schema = httpx.get(server.url + "/openapi.json").json()
    models = schema["components"]["schemas"]
    cases = []
    for path, body in MINIMAL_BODIES.items():
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        names = [r["$ref"].split("/")[-1] for r in ref.get("anyOf", [ref])]
        for name in names:
            for field, d in _integer_fields(schema, models[name]):
                for v in EDGES:
                    value = v
                    for _ in range(d):
                        value = [value]
                    cases.append((path, {**body, field: value}))
    assert len(cases) >= 3 * 20
    for extra in ({"messages": [{"role": "user", "content": "hi", "weight": 1 << 64}], "max_tokens": 2},
                  {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": 1 << 64}}):
        cases.append(("/v1/chat/completions", extra))
    for path, body in cases:
        err = _error(_post(server, path, body), 400)
        assert err["type"] == "invalid_request_error", (path, body, err)
    # The largest values that are valid run (nothing overflows inside the engine).
    for field, value in [("seed", (1 << 63) - 1), ("seed", -(1 << 63)), ("top_k", (1 << 63) - 1),
                         ("stop_token_ids", [(1 << 63) - 1])]:
        r = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 1.0, field: value})
        assert r.status_code == 200, (field, r.text)
    _assert_alive_and_idle(server, engine_pid)


# ---- the event loop never blocks -------------------------------------------------------------------
def test_hostile_chat_templates_are_bounded_and_do_not_block(server, engine_pid):
    messages = [{"role": "user", "content": "hi"}]
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with HealthProbe(server) as probe:
        t = time.monotonic()
        err = _error(_post(server, "/v1/chat/completions", {"messages": messages, "chat_template": loops}), 400)
        took = time.monotonic() - t
    assert "longer than 3 s" in err["message"] and err["param"] == "chat_template"
    assert 2.5 < took < 30
    assert len(probe.latencies) > 5 and max(probe.latencies) < 1.0, max(probe.latencies)
    bomb = "{{ 'x' * 4000000000 }}"
    err = _error(_post(server, "/v1/chat/completions", {"messages": messages, "chat_template": bomb}), 400)
    assert "memory" in err["message"]
    escape = "{{ messages.__class__.__mro__ }}"
    assert "unsafe" in _error(_post(server, "/v1/chat/completions",
                                    {"messages": messages, "chat_template": escape}), 400)["message"]
    _assert_alive_and_idle(server, engine_pid)


def test_10mb_prompts_do_not_block(server, engine_pid):
    text = "Hello world! How are you today? " * (10_000_000 // 32)
    with HealthProbe(server) as probe:
        for path, body in [("/v1/completions", {"prompt": text}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}),
                           ("/tokenize", {"prompt": text})]:
            err = _error(_post(server, path, body, timeout=120), 400)
            assert err["code"] == "context_length_exceeded", (path, err)
    assert max(probe.latencies) < 1.0, max(probe.latencies)
    _assert_alive_and_idle(server, engine_pid)


def test_body_size_limit(server):
    big = {"prompt": "x" * (BODY_LIMIT + 1)}
    err = _error(_post(server, "/v1/completions", big), 413)
    assert "--max-request-body-bytes" in err["message"]
    data = json.dumps(big).encode()

    def chunks():  # no Content-Length: the limit holds for chunked bodies too
        for i in range(0, len(data), 1 << 20):
            yield data[i:i + (1 << 20)]

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"},
                   timeout=60)
    _error(r, 413)


def test_work_limits_name_the_limit(server):
    cases = [
        ({"prompt": ["a"] * 5, "max_tokens": 2}, "prompt", "--max-prompts-per-request"),
        ({"prompt": ["a"] * 3, "n": 3, "max_tokens": 2}, "n", "--max-seqs-per-request"),
        ({"prompt": "a", "logprobs": 6, "max_tokens": 2}, "logprobs", "--max-logprobs"),
    ]
    for body, param, flag in cases:
        err = _error(_post(server, "/v1/completions", body), 400)
        assert err["param"] == param and flag in err["message"], err
    chat = {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 6, "max_tokens": 2}
    assert _error(_post(server, "/v1/chat/completions", chat), 400)["param"] == "top_logprobs"
    assert _error(_post(server, "/v1/chat/completions", {**chat, "top_logprobs": 1, "n": 9}), 400)["param"] == "n"


def test_request_ids_and_start_up_log(server):
    r = _post(server, "/v1/completions", {"prompt": "a", "max_tokens": 1}, headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(server.url + "/health").headers["x-request-id"]) == 32
    log = server.log()
    assert f"http://127.0.0.1:{server.port}/v1" in log  # the host it binds, not "localhost"
    assert "exit with status 1 (--engine-restart never)" in log


# ---- fuzzing over the server's own OpenAPI schema -------------------------------------------------------
def test_schemathesis_fuzz_gives_no_5xx(server, engine_pid):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    seen: dict[int, int] = {}
    server_errors = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode, examples in ((schemathesis.GenerationMode.POSITIVE, 80), (schemathesis.GenerationMode.NEGATIVE, 30)):
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=server.url, timeout=120)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                if response.status_code >= 500 or b'"server_error"' in response.content:
                    server_errors.append((case.method, case.path, case.body, response.status_code,
                                          response.content[:300]))

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (GET /health has no parameters)
                assert mode == schemathesis.GenerationMode.NEGATIVE
    total = sum(seen.values())
    print(f"schemathesis: {total} requests, status counts {dict(sorted(seen.items()))}")
    assert total >= 400
    assert not server_errors, server_errors[:3]
    _assert_alive_and_idle(server, engine_pid)


# ---- the pieces on their own ------------------------------------------------------------------------------
def test_liveness_monitor():
    from atom_server.serving.liveness import LivenessConfig, LivenessMonitor

    m = LivenessMonitor(LivenessConfig(silence_timeout_s=5.0, step_bound_floor_s=30.0), now=0.0)
    m.beat(10, 0.0, 0.2, now=1.0)
    assert m.stalled(now=5.9) is None
    assert "no heartbeat" in m.stalled(now=6.1)
    m.beat(11, 29.0, 0.2, now=7.0)  # a step running 29 s; longest so far 0.2 s: the 30 s floor holds
    assert m.stalled(now=7.5) is None
    assert "running for" in m.stalled(now=8.5)
    m.beat(12, 0.0, 9.0, now=9.0)  # longest step 9 s: steps may take 90 s
    m.beat(12, 80.0, 9.0, now=10.0)
    assert m.stalled(now=10.5) is None and m.step_bound_s() == 90.0


def test_stale_ipc_dirs_are_removed(tmp_path):
    from atom_server.serving.engine_client import IPC_PREFIX, remove_stale_ipc_dirs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"{IPC_PREFIX}{gone}-abc"
    live = tmp_path / f"{IPC_PREFIX}{os.getpid()}-def"
    other = tmp_path / "atom-zmq-notapid"
    for d in (stale, live, other):
        d.mkdir()
        (d / "to_engine.1").write_text("")
    assert remove_stale_ipc_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


def test_5xx_bodies_are_generic_with_the_request_id():
    from atom_server.serving.context import engine_error
    from atom_server.serving.engine_client import EngineDeadError, EngineRequestError
    from atom_server.serving.errors import current_request_id

    token = current_request_id.set("rid-42")
    try:
        for exc, status in [(RuntimeError("secret /path detail"), 500),
                            (EngineRequestError("OverflowError: secret detail", 500), 500),
                            (EngineDeadError("engine process exited with code -9 secret"), 503)]:
            body = engine_error(exc).body()["error"]
            assert "secret" not in body["message"] and "request id rid-42" in body["message"]
            assert engine_error(exc).status == status
        assert engine_error(EngineRequestError("prompt too long", 400)).body()["error"]["message"] == "prompt too long"
    finally:
        current_request_id.reset(token)
