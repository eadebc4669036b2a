"""The runner sizes and allocates the KV cache from the layers' specs alone: block counts for a budget
(full, sliding-window, MLA-shaped and FP8 specs), the bound caches, and the CPU default (what
max_num_seqs x max_model_len need in the model's dtype, capped by the host's memory)."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_checkpoint import write_tiny_llama

from atom.layers.kv_cache import (FullAttentionKVSpec, MLAKVSpec, PagedKVCache, SlidingWindowKVSpec,
                                  bytes_per_block)
from atom_server import LLM
from atom_server.engine.model_runner import CPU_KV_HOST_FRACTION, cpu_kv_budget, kv_blocks_for_budget

BLOCK = 4
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # the tiny llama: hidden 64 over 4 heads, 2 KV heads


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_block_count_from_a_budget_follows_each_spec_kind():
    def full(dtype=torch.bfloat16):
        return [FullAttentionKVSpec(layer_idx=i, dtype=dtype, num_kv_heads=8, head_dim=128) for i in range(4)]

    budget, cap = 64 << 20, 10**9
    blocks = {
        "full": kv_blocks_for_budget(bytes_per_block(full(), 16), budget, 16, cap, 1),
        "fp8": kv_blocks_for_budget(bytes_per_block(full(torch.float8_e4m3fn), 16), budget, 16, cap, 1),
        "window": kv_blocks_for_budget(bytes_per_block(
            [SlidingWindowKVSpec(layer_idx=i, dtype=torch.bfloat16, num_kv_heads=8, head_dim=128, sliding_window=512)
             for i in range(4)], 16), budget, 16, cap, 1),
        "mla": kv_blocks_for_budget(bytes_per_block(
            [MLAKVSpec(layer_idx=i, dtype=torch.bfloat16, kv_lora_rank=512, qk_rope_head_dim=64) for i in range(4)],
            16), budget, 16, cap, 1),
    }
    per_token_full = 4 * 2 * 8 * 128 * 2
    assert blocks["full"] == budget // (16 * per_token_full) == blocks["window"]
    assert blocks["fp8"] == 2 * blocks["full"]  # FP8 halves the bytes: the block count doubles
    assert blocks["mla"] == budget // (16 * 4 * 576 * 2)  # one latent of 576 per token and layer
    assert blocks["mla"] // blocks["full"] == per_token_full // (4 * 576 * 2)
    # Never more blocks than max_num_seqs sequences of max_model_len could use.
    assert kv_blocks_for_budget(bytes_per_block(full(), 16), budget, 16, 100, 3) == 3 * 7


def test_runner_allocates_and_binds_what_the_specs_say(ckpt):
    block_bytes = LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 4  # float32
    llm = LLM(ckpt, block_size=BLOCK, max_model_len=64, kv_cache_memory_bytes=37 * block_bytes + 100, device="cpu")
    runner = llm.llm_engine.runner
    assert [s.kind for s in runner.kv_specs] == ["full", "full"]
    assert runner.block_bytes == block_bytes and runner.num_blocks == 37
    layers = [m for m in runner.model.modules() if hasattr(m, "kv_cache_spec")]
    assert len(layers) == LAYERS
    for m in layers:
        assert isinstance(m.kv_cache, PagedKVCache)
        assert m.kv_cache.k.shape == m.kv_cache.v.shape == (37, BLOCK, KV_HEADS, HEAD_DIM)


def test_cpu_default_is_sized_from_the_model_and_the_limits(ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="atom_server.engine.model_runner"):
        llm = LLM(ckpt, dtype="bfloat16", block_size=BLOCK, max_model_len=64, max_num_seqs=3, device="cpu")
    runner = llm.llm_engine.runner
    assert runner.block_bytes == LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 2  # bf16, the model's dtype
    assert all(s.dtype == torch.bfloat16 for s in runner.kv_specs)
    assert runner.num_blocks == 3 * 64 // BLOCK  # what 3 sequences of 64 tokens need (far below the host cap)
    assert any("KV cache on CPU" in r.getMessage() and "max_num_seqs (3)" in r.getMessage() for r in caplog.records)
    # The host cap: a small host gets CPU_KV_HOST_FRACTION of its memory, never less than one sequence.
    block = 1024
    need = block * (64 // BLOCK) * 256
    assert cpu_kv_budget(block, BLOCK, 64, 256, host_bytes=1 << 40) == need
    assert cpu_kv_budget(block, BLOCK, 64, 256, host_bytes=1 << 20) == int(CPU_KV_HOST_FRACTION * (1 << 20))
    assert cpu_kv_budget(block, BLOCK, 64, 256, host_bytes=1 << 10) == block * (64 // BLOCK)


def test_default_token_budget_follows_the_usage_context(ckpt):
    """The offline LLM class runs as vLLM's LLM_CLASS usage context, a server as OPENAI_API_SERVER (their default
    step budgets differ on large GPUs: test_engine_gpu.py); on CPU both take 2048 tokens."""
    from atom_server.config import EngineArgs
    from atom_server.engine.engine_core import default_max_num_batched_tokens

    llm = LLM(ckpt, dtype="float32", block_size=BLOCK, max_model_len=64, device="cpu")
    assert llm.engine_args.usage_context == "llm"
    assert llm.llm_engine.scheduler.max_num_batched_tokens == 2048
    assert EngineArgs().usage_context == "server"
    assert default_max_num_batched_tokens(torch.device("cpu"), "server") == 2048
    with pytest.raises(ValueError, match="usage_context"):
        EngineArgs(usage_context="offline")
