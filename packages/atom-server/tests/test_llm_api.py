"""The offline `LLM` API: prompt forms, chat templates, order of results; the real SmolLM2 end to end."""

from __future__ import annotations

import pytest
from tiny_checkpoint import write_tiny_llama

from atom_server import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    ckpt = write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    return LLM(ckpt, dtype="float32", block_size=4, max_model_len=64, kv_cache_memory_bytes=1 << 20)


def test_prompt_forms_agree(llm):
    tok = llm.get_tokenizer()
    text = "Hello world! How are"
    ids = tok(text)["input_ids"]
    by_text = llm.generate(text, GREEDY, use_tqdm=False)
    by_ids = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    by_list = llm.generate([ids, ids[:3]], GREEDY, use_tqdm=False)
    by_dict = llm.generate([{"prompt": text}], GREEDY, use_tqdm=True)
    assert len(by_text) == len(by_ids) == len(by_dict) == 1 and len(by_list) == 2
    want = by_text[0].outputs[0].token_ids
    assert len(want) == 5
    assert by_ids[0].outputs[0].token_ids == by_list[0].outputs[0].token_ids == by_dict[0].outputs[0].token_ids == want
    assert by_list[1].prompt_token_ids == ids[:3]
    assert by_text[0].outputs[0].text == tok.decode(want)


def test_bad_inputs(llm):
    with pytest.raises(ValueError, match="prompts"):
        llm.generate([3.5], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    # A bad prompt in a batch leaves nothing behind in the engine.
    with pytest.raises(ValueError, match="too long"):
        llm.generate([[5, 6], list(range(2, 70))], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    stats = llm.llm_engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_chat_uses_template(llm):
    tok = llm.get_tokenizer()
    convs = [[{"role": "user", "content": "Hello world!"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"}]]
    outs = llm.chat(convs, GREEDY, use_tqdm=False)
    assert len(outs) == 2
    for conv, out in zip(convs, outs):
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<s>assistant:") and out.prompt == text
        assert out.prompt_token_ids == tok(text, add_special_tokens=False)["input_ids"]
        again = llm.generate({"prompt_token_ids": out.prompt_token_ids}, GREEDY, use_tqdm=False)[0]
        assert again.outputs[0].token_ids == out.outputs[0].token_ids
    single = llm.chat(convs[0], GREEDY, use_tqdm=False)
    assert len(single) == 1 and single[0].prompt == outs[0].prompt


@pytest.mark.slow
def test_smollm2_default_model_answers():
    pytest.importorskip("gguf")
    from atom_server.default_model import DefaultModelMissing, resolve_model_path

    try:
        resolve_model_path()
    except DefaultModelMissing as e:
        pytest.skip(str(e))
    llm = LLM(max_model_len=256, kv_cache_memory_bytes=32 << 20)
    assert llm.llm_engine.served_model_name == "SmolLM2-135M-Instruct"
    out = llm.chat([{"role": "user", "content": "What is the capital of Germany? Answer in one word."}],
                   SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    # Reference: transformers' greedy output on the same GGUF (see /work/shared/MODELS.md).
    assert out.text == "The capital of Germany is Berlin."
    assert out.finish_reason == "stop"
