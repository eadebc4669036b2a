"""The DeepSeek family in atom-server: DeepSeek-V2 (V2-Lite style: no q_lora), DeepSeek-V3 (q_lora, grouped
routing) and GLM-4-MoE through `atom_server.LLM`, greedy tokens equal to transformers' generate.

Every run exercises the engine paths around the cache: prompts longer than the block size (4), chunked
prefill (a 16-token step budget), preemption (a KV pool smaller than the batch needs), prefix caching (a
second wave of prompts sharing whole blocks with the first) and, for V3, the decode graphs' input plumbing
without capture (ATOM_DECODE_GRAPHS=static, the CPU stand-in for CUDA graphs). The MLA models' latent caches
are allocated from their specs: one [blocks, block_size, kv_lora_rank + qk_rope_head_dim] tensor per layer,
so a memory budget buys (MHA bytes per token / latent bytes per token) times the blocks of the same model
with multi-head caches."""

from __future__ import annotations

import math
import random

import pytest
import torch
import transformers

from atom.layers.kv_cache import MLAKVCache
from atom_server import LLM, SamplingParams

MAX_NEW = 10
BLOCK = 4
VOCAB = 300
POOL_BLOCKS = 20  # 4 sequences of up to 33 tokens would need 36: the scheduler must preempt

_MLA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=128,
            tie_word_embeddings=False)
CONFIGS = {
    "deepseek_v2_lite": lambda: transformers.DeepseekV2Config(
        **_MLA, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, topk_method="greedy",
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
                         "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **_MLA, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
        routed_scaling_factor=1.5, use_qk_norm=True, attention_bias=True, max_position_embeddings=128,
        tie_word_embeddings=False),
}
GRAPH_MODE = {"deepseek_v3": "static"}  # the others run eager decode steps
# Async scheduling stays off: with it, preempting a sequence whose last token is still in flight crashes on
# main for every model (the placeholder token is prefilled again: IndexError in the embedding), see the report.


def _write(path, config) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    model.save_pretrained(path)
    return model


def _hf_greedy(hf, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])  # an explicit mask: generate would mask prompt tokens equal to pad_token_id
            ids = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
                              min_new_tokens=MAX_NEW, pad_token_id=0, eos_token_id=None)
            out.append(ids[0, len(p):].tolist())
    return out


def _kv_bytes_per_token(config) -> int:
    """float32 cache bytes per token, all layers: the latent row for MLA, K and V of every KV head otherwise."""
    if getattr(config, "kv_lora_rank", None):
        return config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers_with_chunking_preemption_and_prefix_cache(name, tmp_path, monkeypatch):
    config = CONFIGS[name]()
    hf = _write(tmp_path, config)
    rng = random.Random(0)
    first = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 19, 11, 23)]
    # the second wave repeats whole blocks of the first wave's prompts, then diverges
    second = [first[1][:12] + [rng.randrange(VOCAB) for _ in range(6)], first[3][:20] + [7, 8, 9]]
    monkeypatch.setenv("ATOM_DECODE_GRAPHS", GRAPH_MODE.get(name, "off"))
    monkeypatch.setenv("ATOM_ASYNC_SCHEDULING", "0")
    llm = LLM(str(tmp_path), dtype="float32", block_size=BLOCK, max_model_len=64, max_num_batched_tokens=16,
              kv_cache_memory_bytes=POOL_BLOCKS * BLOCK * _kv_bytes_per_token(config), skip_tokenizer_init=True,
              device="cpu")
    eng = llm.llm_engine
    runner = eng.runner
    assert runner.num_blocks == POOL_BLOCKS
    replays = [0]
    if runner.graphs is not None:
        replay = runner.graphs.replay

        def counting_replay(*args):
            replays[0] += 1
            return replay(*args)

        runner.graphs.replay = counting_replay
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    for wave in (first, second):
        outs = llm.generate([{"prompt_token_ids": p} for p in wave], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(hf, wave), name
    stats = eng.stats()
    assert stats["num_preemptions"] > 0, stats
    assert stats["prefix_cache_hits"] >= 12 + 20 - 8, stats  # whole blocks of both shared prefixes (at least)
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and not eng.has_unfinished_requests()
    assert (replays[0] > 0) == (name in GRAPH_MODE)


def test_mla_kv_blocks_for_a_budget_scale_with_the_latent_bytes(tmp_path):
    """Through the runner's sizing: the same budget buys (MHA-equivalent bytes per token) / (latent bytes per
    token) times the blocks. MHA-equivalent: K and V of every head, H * (P + R) + H * V values per layer."""
    config = CONFIGS["deepseek_v3"]()
    _write(tmp_path, config)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    latent = layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    mha = layers * heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * 4
    budget = 1 << 20
    llm = LLM(str(tmp_path), dtype="float32", block_size=BLOCK, max_model_len=64, max_num_seqs=1024,
              kv_cache_memory_bytes=budget, skip_tokenizer_init=True, device="cpu")
    runner = llm.llm_engine.runner
    assert [s.kind for s in runner.kv_specs] == ["mla"] * layers
    assert runner.block_bytes == BLOCK * latent
    mha_blocks = budget // (BLOCK * mha)
    ratio = mha / latent  # 4 heads x (16 + 8 + 12) / (32 + 8) = 3.6
    assert mha_blocks * ratio - ratio <= runner.num_blocks <= mha_blocks * ratio + ratio
    assert runner.num_blocks == budget // (BLOCK * latent)
    for cache in runner.kv_caches:
        assert isinstance(cache, MLAKVCache)
        assert cache.latent.shape == (runner.num_blocks, BLOCK, config.kv_lora_rank + config.qk_rope_head_dim)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device")
@pytest.mark.parametrize("name", ["deepseek_v2_lite", "deepseek_v3"])
def test_mla_cuda_graphs_greedy_matches_transformers_on_gpu(name, tmp_path):  # pragma: no cover - GPU
    """The runner captures MLA decode (Triton latent cache write, split-K absorbed decode, grouped routing)
    in CUDA graphs; float32 greedy tokens equal transformers', with and without the graphs."""
    from atom.ops.registry import cuda_graph_blockers

    config = CONFIGS[name]()
    hf = _write(tmp_path, config)
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 33, 17, 50, 2)]
    want = _hf_greedy(hf, prompts)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    for eager in (False, True):
        llm = LLM(str(tmp_path), dtype="float32", block_size=16, max_model_len=128, max_num_seqs=8,
                  gpu_memory_utilization=0.3, enforce_eager=eager, skip_tokenizer_init=True)
        runner = llm.llm_engine.runner
        assert cuda_graph_blockers(runner.model) == [] and (runner.graphs is None) == eager
        assert [s.kind for s in runner.kv_specs] == ["mla"] * config.num_hidden_layers
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]
        assert got == want, f"{name} eager={eager}"
        del llm
        torch.cuda.empty_cache()


def test_fp8_latent_cache_doubles_the_blocks_and_decodes_as_atoms_fp8_model(tmp_path, monkeypatch):
    """--kv-cache-dtype fp8_e4m3 (then fp8, the same) on DeepSeek-V3: e4m3 latent caches (scale 1.0: the
    checkpoint has none, as in vLLM) from the same specs, so the same budget buys twice the blocks of the bf16
    latent; greedy generation through the scheduler (chunked prefill, a pool small enough to preempt) equals
    ATOM's FP8-latent model driven outside the engine, teacher-forced with the engine's tokens (the same weights
    and reference ops; the logits' accuracy against a float latent cache is atom-core's
    tests/test_mla_fp8_kv_cache.py)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[2] / "atom-core" / "tests"))
    from paged_harness import PagedHarness

    from atom.loader import load_model

    config = CONFIGS["deepseek_v3"]()
    _write(tmp_path, config)
    layers, row = config.num_hidden_layers, config.kv_lora_rank + config.qk_rope_head_dim
    bf16_block = layers * BLOCK * row * 2
    monkeypatch.setenv("ATOM_DECODE_GRAPHS", "static")
    monkeypatch.setenv("ATOM_ASYNC_SCHEDULING", "0")
    args = dict(block_size=BLOCK, max_model_len=64, max_num_batched_tokens=16, skip_tokenizer_init=True,
                device="cpu", enable_prefix_caching=False)
    # a bf16 model's latent caches at bf16_block bytes a block get 40 blocks from this budget (the runner's sizing:
    # test_mla_kv_blocks_for_a_budget_scale_with_the_latent_bytes)
    fp8 = LLM(str(tmp_path), dtype="bfloat16", kv_cache_dtype="fp8_e4m3", kv_cache_memory_bytes=40 * bf16_block,
              **args)
    runner = fp8.llm_engine.runner
    assert runner.block_bytes * 2 == bf16_block and runner.num_blocks == 80
    assert all(isinstance(c, MLAKVCache) and c.latent.dtype == torch.float8_e4m3fn and float(c.scale) == 1.0
               for c in runner.kv_caches) and len(runner.kv_caches) == layers
    del fp8, runner

    # float32 activations, a pool small enough to preempt (20 blocks for up to 4 x 9 blocks of context)
    rng = random.Random(2)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 19, 11, 23)]
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_dtype="fp8", kv_cache_memory_bytes=20 * layers * BLOCK * row,
              **args)
    assert llm.llm_engine.runner.num_blocks == 20
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                        use_tqdm=False)]
    assert llm.llm_engine.stats()["num_preemptions"] > 0
    model, _ = load_model(str(tmp_path), dtype="float32", kv_cache_dtype="fp8", progress=False)
    harness = PagedHarness(model, num_blocks=64, block_size=BLOCK)
    for prompt, tokens in zip(prompts, got):
        seq = harness.add(1)
        logits = [harness.step([prompt], seq)]
        for t in tokens[:-1]:
            logits.append(harness.step([[t]], seq))
        assert torch.cat(logits).argmax(-1).tolist() == tokens


def test_mtp_drafting_over_fp8_latent_caches_matches_no_speculation(tmp_path, monkeypatch):
    """The original ATOM's DeepSeek recipe: MTP speculation with --kv-cache-dtype fp8. The drafting MTP layer's
    latent cache is FP8 too (built by the same factory); greedy tokens equal the run without speculation (the
    verify step reads the FP8 prefix through mla_prefill, plain decode through mla_decode: the same stored rows)."""
    from spec_checkpoint import deepseek_v3_config, write_deepseek_v3_mtp

    monkeypatch.setenv("ATOM_DECODE_GRAPHS", "off")
    path = write_deepseek_v3_mtp(tmp_path, draft="bigram", target_scale=0.03)
    config = deepseek_v3_config()
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(config.vocab_size) for _ in range(n)]} for n in (5, 19, 11, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    runs = {}
    for k in (0, 2):
        llm = LLM(path, dtype="float32", block_size=BLOCK, max_model_len=64, skip_tokenizer_init=True, device="cpu",
                  kv_cache_dtype="fp8", speculative_config={"method": "mtp", "num_speculative_tokens": k} if k else None)
        caches = llm.llm_engine.runner.kv_caches
        assert len(caches) == config.num_hidden_layers + (1 if k else 0)  # + the MTP layer's
        assert {c.latent.dtype for c in caches} == {torch.float8_e4m3fn}
        runs[k] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.llm_engine.stats()
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    assert runs[2] == runs[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device")
def test_mla_fp8_latent_cache_with_cuda_graphs_on_gpu(tmp_path):  # pragma: no cover - GPU
    """The runner captures the FP8-latent MLA decode (Triton FP8 latent write, split-K decode reading e4m3 rows,
    the scale a graph input) in CUDA graphs. With and without the graphs, greedy tokens follow ATOM's FP8-latent
    model driven outside the engine (teacher-forced with the engine's tokens, the same Triton kernels): equal
    wherever that run's top-2 gap is above `tie`. A batched step and a single-sequence step round float32 sums
    differently, which can move an element that sits within an ulp of an e4m3 rounding boundary to the other
    side (one latent value changed by up to 2^-3 of itself): rare, and a small logit change, so a token may
    differ only at a near tie (0.05 on logits of size ~16; the whole FP8 error is ~0.5 at most on these models,
    tests/test_mla_fp8_kv_cache.py)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[2] / "atom-core" / "tests"))
    from paged_harness import PagedHarness

    from atom.loader import load_model
    from atom.ops.registry import cuda_graph_blockers

    tie = 0.05
    config = CONFIGS["deepseek_v3"]()
    _write(tmp_path, config)
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 33, 17, 50, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    model, _ = load_model(str(tmp_path), dtype="float32", kv_cache_dtype="fp8", device="cuda", progress=False)
    for eager in (False, True):
        llm = LLM(str(tmp_path), dtype="float32", block_size=16, max_model_len=128, max_num_seqs=8,
                  gpu_memory_utilization=0.3, enforce_eager=eager, skip_tokenizer_init=True, kv_cache_dtype="fp8")
        runner = llm.llm_engine.runner
        assert cuda_graph_blockers(runner.model) == [] and (runner.graphs is None) == eager
        assert {c.latent.dtype for c in runner.kv_caches} == {torch.float8_e4m3fn}
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]
        del llm, runner
        torch.cuda.empty_cache()
        harness = PagedHarness(model, num_blocks=64, block_size=16, device="cuda")
        same = steps = 0
        for prompt, tokens in zip(prompts, got):
            seq = harness.add(1)
            logits = [harness.step([prompt], seq)]
            for t in tokens[:-1]:
                logits.append(harness.step([[t]], seq))
            top = torch.cat(logits).float().topk(2, -1)
            for step, t in enumerate(tokens):
                steps += 1
                same += int(top.indices[step, 0]) == t
                gap = float(top.values[step, 0] - top.values[step, 1])
                assert int(top.indices[step, 0]) == t or gap < tie, (eager, step, gap)
        print(f"FP8 latent cache on GPU (graphs {'off' if eager else 'on'}): {same} of {steps} tokens = the "
              "harness's argmax")
