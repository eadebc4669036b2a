"""`atom serve -tp 2` as a real process tree (API server -> engine core = rank 0 -> worker = rank 1, gloo on
CPU): a chat request answers what TP=1 answers (official openai client); then a worker killed
mid-generation turns the server unhealthy within seconds, in-flight and new requests get 503 (nothing
hangs), the engine exits, and the CLI exits non-zero naming the dead rank."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from atom_server import LLM, SamplingParams
from atom_server.sampling_params import StructuredOutputsParams
from server_harness import ServerProcess, pid_alive, wait_until, write_chat_checkpoint

CONTEXT = 4096  # long enough that the killed requests are still running


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("tp-ckpt"), max_position_embeddings=CONTEXT)


def _start(checkpoint, log) -> ServerProcess:
    # CPU ranks over gloo, also on a GPU machine (one GPU there could not hold two ranks)
    return ServerProcess([checkpoint, "--served-model-name", "tiny", "-tp", "2", "--max-num-seqs", "4", "--device", "cpu"],
                         log).wait_healthy()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_tp2_server_chats_like_tp1_and_a_killed_worker_ends_it(checkpoint, tmp_path):
    """One server for both (each start costs three processes' imports on a 2-core CI box)."""
    messages = [{"role": "user", "content": "Hello world! How are you today?"}]
    tp1 = LLM(checkpoint, device="cpu", dtype="float32")  # as the server: CPU ranks, float32
    want = tp1.chat(messages, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    # structured outputs at TP=2: the bitmask travels in every rank's StepInput, rank 0 alone applies it
    regex = r"[a-z]{2,6} [0-9]{2}"
    constrained = SamplingParams(temperature=0.0, max_tokens=16,
                                 structured_outputs=StructuredOutputsParams(regex=regex))
    guided = tp1.chat(messages, constrained, use_tqdm=False)[0].outputs[0].text
    del tp1
    srv = _start(checkpoint, tmp_path / "server.log")
    try:
        engine = srv.engine_pid()
        (worker,) = _children(engine)  # rank 1; rank 0 is the engine core itself
        client = _client(srv)
        reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == want.outputs[0].text
        assert reply.usage.completion_tokens == len(want.outputs[0].token_ids)
        reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16,
                                               extra_body={"guided_regex": regex})
        assert reply.choices[0].message.content == guided and re.fullmatch(regex, guided)

        # a worker killed mid-generation
        results: dict[str, object] = {}

        def plain():
            try:
                client.completions.create(model="tiny", prompt="Hello", max_tokens=CONTEXT - 64,
                                          extra_body={"ignore_eos": True})
                results["plain"] = "finished"
            except openai.APIStatusError as e:
                results["plain"] = e.status_code

        def stream():
            try:
                list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                    max_tokens=CONTEXT - 64, stream=True,
                                                    extra_body={"ignore_eos": True}))
                results["stream"] = "finished"
            except openai.APIError as e:  # the error arrives as an event inside the 200 stream
                results["stream"] = e.message

        threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        assert wait_until(lambda: httpx.get(srv.url + "/debug/stats").json()["stats"].get("num_running") == 2, 30)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(30)
        assert time.monotonic() - killed < 10
        assert results["plain"] == 503
        assert "engine" in str(results["stream"])
        # Unhealthy from then on: 503s while the front-end drains, then (default --engine-restart never, as
        # vLLM) the server exits 1 for its supervisor; a refused connection is unhealthy too.
        for path, body in (("/health", None), ("/v1/completions", {"prompt": "x"})):
            try:
                r = httpx.request("POST" if body else "GET", srv.url + path, json=body, timeout=10)
                assert r.status_code == 503, (path, r.status_code)
            except httpx.TransportError:
                pass
        assert wait_until(lambda: not pid_alive(engine), 10)  # the engine core exits
        code = srv.proc.wait(30)
    finally:
        srv.stop()
    assert code == 1
    assert not pid_alive(worker) and not any(map(pid_alive, _children(engine)))
    log = srv.log()
    assert "tensor-parallel worker rank 1" in log and "killed by SIGKILL" in log
