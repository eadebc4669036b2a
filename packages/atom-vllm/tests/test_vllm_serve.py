"""A real `vllm serve` (API server + engine-core process) on a tiny Llama, queried with the openai client."""

from __future__ import annotations

import time

import pytest
from tiny_checkpoints_vllm import PROMPTS

START_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def server(serve_launch):
    import openai

    proc, log_path = serve_launch["proc"], serve_launch["log_path"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_launch['port']}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{open(log_path).read()[-6000:]}")
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.fail(f"vllm serve did not come up in {START_TIMEOUT_S} s:\n{open(log_path).read()[-6000:]}")
            time.sleep(2)
    print(f"vllm serve ready {time.monotonic() - serve_launch['started']:.0f} s after launch")
    return {"client": client, "model": serve_launch["model"], "log_path": log_path}


@pytest.mark.slow
def test_serve_completions_match_vllm_builtin(server, offline_runs, checkpoints):
    resp = server["client"].completions.create(model=server["model"], prompt=PROMPTS, max_tokens=12,
                                               temperature=0.0, extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(resp.choices, key=lambda c: c.index)]
    expected = offline_runs["builtin"]["results"][checkpoints["llama"]]["texts"]
    assert texts == expected


@pytest.mark.slow
def test_serve_runs_atom(server):
    server["client"].completions.create(model=server["model"], prompt="w5 w6", max_tokens=2, temperature=0.0)
    log = open(server["log_path"]).read()
    assert "ATOM took over" in log and "LlamaForCausalLM" in log
    assert "ATOM built atom_vllm.models.LlamaForCausalLM" in log
