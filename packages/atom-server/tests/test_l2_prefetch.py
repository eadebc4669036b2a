"""ATOM_L2_PREFETCH_MB (atom_server/engine/l2_prefetch.py): inside captured decode graphs each linear forks a side
stream that asks L2 for the next linear's weights. On CPU: the call order it records from a real forward (what
"next" means). On a GPU: graphs captured with the prefetches decode exactly what graphs without them decode."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoint import write_tiny_llama

from atom.layers.linear import LinearBase
from atom_server import LLM, SamplingParams
from atom_server.engine import l2_prefetch

PROMPTS = [{"prompt_token_ids": [7 + (i * 13) % 250 for i in range(n)]} for n in (5, 33, 70, 12)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_the_next_linear_is_the_next_one_called(tmp_path):
    ckpt = write_tiny_llama(str(tmp_path))
    llm = LLM(ckpt, dtype="float32", block_size=16, max_model_len=128, max_num_seqs=4, enforce_eager=True,
              device="cpu")
    model = llm.llm_engine.runner.model
    names = {id(m): n for n, m in model.named_modules()}
    with l2_prefetch.L2Prefetch(model, torch.device("cpu"), 1 << 20) as pf:
        llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert not pf.handles  # hooks removed on exit
    order = [names[id(m)] for m in pf.order]
    layers = len(model.model.layers)
    # a decoder layer runs its attention projections, then its MLP's, and the layers run in order
    assert order == [f"model.layers.{i}.{p}" for i in range(layers)
                     for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    assert all(isinstance(m, LinearBase) for m in pf.order)
    assert pf.next_of is None and pf.launches == 0  # nothing captured on CPU: nothing prefetched
    assert pf.tensors(pf.order[0]) == []  # CPU tensors are never prefetched
    # after the phase the model runs without hooks
    assert not any(m._forward_pre_hooks for m in pf.order) and not model._forward_hooks


@pytest.mark.gpu
@pytest.mark.serial  # KV sized from free memory
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs an sm_90+ GPU (the bulk L2 prefetch instruction)")
def test_graphs_with_prefetches_decode_what_graphs_without_them_decode(tmp_path, monkeypatch):
    ckpt = write_tiny_llama(str(tmp_path), num_hidden_layers=3)
    runs = {}
    for mb in (0, 16):
        monkeypatch.setattr(l2_prefetch, "PREFETCH_MB", mb)
        llm = LLM(ckpt, dtype="bfloat16", block_size=16, max_model_len=256, max_num_seqs=4,
                  gpu_memory_utilization=0.3)
        graphs = llm.llm_engine.runner.graphs
        assert graphs is not None
        pf = graphs.l2_prefetch
        if mb:
            # 4 linears a layer, each prefetching the next one's weights (the last has none after it)
            assert pf is not None and pf.launches == (4 * 3 - 1) * len(graphs.sizes)
        else:
            assert pf is None
        runs[mb] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert graphs.replays["decode"] > 0
        del llm
        torch.cuda.empty_cache()
    assert runs[0] == runs[16]
