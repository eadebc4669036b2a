"""The README quickstart: `atom serve` with no model serves the bundled SmolLM2-135M-Instruct GGUF and
answers a chat question."""

from __future__ import annotations

import openai
import pytest

from server_harness import ServerProcess

pytest.importorskip("gguf")


def test_atom_serve_without_model_answers_chat(tmp_path):
    from atom_server.default_model import DefaultModelMissing, resolve_model_path

    try:
        resolve_model_path()
    except DefaultModelMissing as e:
        pytest.skip(str(e))
    srv = ServerProcess([], tmp_path / "server.log")
    try:
        srv.wait_healthy(timeout_s=600)
        log = srv.log()
        for needle in ("SmolLM2-135M-Instruct", "dtype", "kernel backend", "KV cache capacity", srv.url.split(":")[-1]):
            assert needle in log, log
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        out = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": "What is the capital of Germany? Answer in one word."}])
        answer = out.choices[0].message.content
        print("SmolLM2 says:", repr(answer))
        assert answer.strip()
    finally:
        assert srv.stop() == 0
