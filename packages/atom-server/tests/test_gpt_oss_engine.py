"""GPT-OSS with MXFP4 experts through atom-server's engine: greedy tokens equal transformers' on the
dequantized weights, with prompts longer than the sliding window (5), blocks of 4 tokens, chunked prefill
and prefix caching. Sinks reach ATOM's paged attention through the attention factory (no runner change)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import write_tiny_gpt_oss

from atom_server import LLM, SamplingParams

MAX_NEW = 10
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def mxfp4_ckpt(tmp_path_factory):
    dense = write_tiny_gpt_oss(tmp_path_factory.mktemp("gpt_oss_dense"))
    spec = importlib.util.spec_from_file_location("quantize_mxfp4", REPO / "tools" / "quantize_mxfp4.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    tool.convert(dense, str(out))
    return str(out)


def test_greedy_matches_transformers_on_dequantized_weights(mxfp4_ckpt):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    rng = random.Random(3)
    prompts = [[rng.randrange(2, 300) for _ in range(n)] for n in (3, 17, 41, 9, 26)]
    hf = AutoModelForCausalLM.from_pretrained(mxfp4_ckpt, dtype=torch.float32,
                                              quantization_config=Mxfp4Config(dequantize=True)).float().eval()
    want = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                              pad_token_id=0, eos_token_id=None)
            want.append(out[0, len(p):].tolist())
    llm = LLM(mxfp4_ckpt, block_size=4, max_model_len=64, max_num_batched_tokens=16,
              kv_cache_memory_bytes=256 * 2 * 2 * 4 * 2 * 16 * 4)
    experts = llm.llm_engine.runner.model.model.layers[0].mlp.experts
    assert experts.w13_weight.dtype == torch.uint8  # served packed
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    again = llm.generate([{"prompt_token_ids": prompts[2][:30] + [7, 8]}], params, use_tqdm=False)  # cached prefix
    assert llm.llm_engine.stats()["prefix_cache_hits"] > 0
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompts[2][:30] + [7, 8]]), do_sample=False, max_new_tokens=MAX_NEW,
                          min_new_tokens=MAX_NEW, pad_token_id=0, eos_token_id=None)
    assert again[0].outputs[0].token_ids == ref[0, 32:].tolist()
