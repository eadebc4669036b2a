"""`--generation-config auto|vllm|FOLDER` with vLLM's semantics, and `--served-model-name` with several
names. Defaults are checked against their definition: a request that leaves a field out must get
exactly what the same request gets when it sets the file's value itself."""

from __future__ import annotations

import json
import os

import openai
import pytest

from atom_server.generation_defaults import load_generation_defaults
from atom_server.sampling_params import SamplingParams
from server_harness import ServerProcess, write_chat_checkpoint

# What a model's generation_config.json may set (HF names); vLLM applies these as request defaults.
GEN = {"temperature": 0.8, "top_k": 3, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.3,
       "presence_penalty": 0.5, "frequency_penalty": 0.2, "max_new_tokens": 6, "do_sample": True,
       "bos_token_id": 0, "eos_token_id": 1}
EXPLICIT = {k: v for k, v in GEN.items() if k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                                  "presence_penalty", "frequency_penalty")}
NAMES = ["first-name", "second-name"]


def write_generation_config(folder, values: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(values, f)
    return os.fspath(folder)


def test_defaults_follow_vllm_definition(tmp_path):
    model = write_generation_config(tmp_path / "model", GEN)
    auto = load_generation_defaults(model, "auto")
    assert auto.params == {**EXPLICIT, "max_tokens": 6} and auto.max_tokens_cap is None
    assert load_generation_defaults(model, "vllm").params == {}
    other = write_generation_config(tmp_path / "other", {"temperature": 0.1, "max_new_tokens": 9, "top_k": None})
    from_folder = load_generation_defaults(model, other)
    assert from_folder.params == {"temperature": 0.1, "max_tokens": 9} and from_folder.max_tokens_cap == 9
    assert load_generation_defaults(os.fspath(tmp_path / "none"), "auto").params == {}  # no file: neutral
    with pytest.raises(ValueError, match="generation_config folder .* has no generation_config.json"):
        load_generation_defaults(model, os.fspath(tmp_path))
    with pytest.raises(ValueError, match="generation_config must be 'auto', 'vllm' or a folder"):
        load_generation_defaults(model, "nope")
    bad = write_generation_config(tmp_path / "bad", {"top_p": 1.5})
    with pytest.raises(ValueError, match=r"generation_config.json: unusable sampling default: top_p"):
        load_generation_defaults(bad, "auto")


def test_bundled_gguf_runs_with_neutral_defaults():
    from atom_server.default_model import DefaultModelMissing, resolve_model_path

    try:
        path = resolve_model_path()
    except DefaultModelMissing as e:
        pytest.skip(str(e))
    assert load_generation_defaults(path, "auto").params == {}


def test_offline_llm_default_sampling_params(tmp_path):
    from atom_server.llm import LLM

    ckpt = write_chat_checkpoint(tmp_path / "ckpt")
    write_generation_config(ckpt, {"temperature": 0.0, "repetition_penalty": 1.3, "max_new_tokens": 5})
    kw = dict(kv_cache_memory_bytes=4 << 20, max_num_seqs=4)
    llm = LLM(ckpt, **kw)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=5)
    prompt = {"prompt_token_ids": list(range(3, 12))}
    by_default = llm.generate(prompt, use_tqdm=False)[0].outputs[0]
    explicit = llm.generate(prompt, SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=5),
                            use_tqdm=False)[0].outputs[0]
    assert by_default.token_ids == explicit.token_ids
    assert LLM(ckpt, generation_config="vllm", **kw).get_default_sampling_params() == SamplingParams()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_chat_checkpoint(tmp_path_factory.mktemp("ckpt"))
    gen_dir = write_generation_config(tmp_path_factory.mktemp("gen"), GEN)
    srv = ServerProcess([ckpt, "--generation-config", gen_dir, "--served-model-name", *NAMES],
                        tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield srv.wait_healthy()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_served_model_names(server, client):
    assert [m.id for m in client.models.list().data] == NAMES
    for name in NAMES:  # any served name is accepted; the first is the one reported
        out = client.completions.create(model=name, prompt="Hello", max_tokens=2)
        assert out.model == NAMES[0]
    with pytest.raises(openai.NotFoundError, match="first-name"):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
    assert "sampling defaults from" in server.log()


def test_generation_config_defaults_applied(client):
    messages = [{"role": "user", "content": "Hello world!"}]
    kw = dict(model=NAMES[0], messages=messages, seed=7, extra_body={"ignore_eos": True})
    by_default = client.chat.completions.create(**kw)
    explicit = client.chat.completions.create(
        model=NAMES[0], messages=messages, seed=7, max_tokens=6, temperature=EXPLICIT["temperature"],
        top_p=EXPLICIT["top_p"], presence_penalty=EXPLICIT["presence_penalty"],
        frequency_penalty=EXPLICIT["frequency_penalty"],
        extra_body={"ignore_eos": True, "top_k": EXPLICIT["top_k"], "min_p": EXPLICIT["min_p"],
                    "repetition_penalty": EXPLICIT["repetition_penalty"]})
    assert by_default.usage.completion_tokens == 6  # max_new_tokens -> the default max_tokens (else: all the room)
    assert by_default.choices[0].message.content == explicit.choices[0].message.content
    greedy = client.chat.completions.create(**kw, temperature=0)  # the request's own value wins
    greedy_explicit = client.chat.completions.create(
        model=NAMES[0], messages=messages, max_tokens=6, temperature=0, presence_penalty=0.5, frequency_penalty=0.2,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    assert greedy.choices[0].message.content == greedy_explicit.choices[0].message.content


def test_generation_config_folder_caps_max_tokens(client):
    out = client.completions.create(model=NAMES[0], prompt="Hello", max_tokens=20, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 6  # vLLM: a --generation-config folder's max_new_tokens caps requests
