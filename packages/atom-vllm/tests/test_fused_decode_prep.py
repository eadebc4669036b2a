"""ATOM_ATTN_FUSED_DECODE_PREP=1 in vLLM: decode steps run qk_norm_rope_cache's work inside ATOM's Triton
attention kernel (atom_vllm.attention_backend). Triton runs on CPU only under its interpreter, which must be set
before triton is first imported: the cases run in their own pytest process (TRITON_INTERPRET=1,
ATOM_KERNEL_BACKEND=triton), started by test_cases_under_the_interpreter; the engine test starts vLLM with it.

- layer cases: vLLM's Attention layers built by ATOM's factory, driven through `forward_with_prep` under vLLM's
  real forward context (its custom ops, its attention op): with the switch on, a decode step leaves the KV cache
  and the attention output bit-identical to the two-op path, and only decode steps outside piecewise CUDA graphs
  take the fused kernel (counted);
- engine: a tiny Qwen3 through vllm.LLM (eager and compiled) gives the same greedy tokens and top-2 logprob gaps
  with the switch on as with it off, and its decode steps took the fused kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETING, reason="run by test_cases_under_the_interpreter "
                                 "(TRITON_INTERPRET=1 before triton is imported)")

NUM_HEADS, NUM_KV_HEADS, HEAD = 4, 2, 32
BLOCK, NUM_BLOCKS = 16, 20


def _cuda_build_of_vllm() -> bool:
    """A CUDA machine's vLLM registers its custom ops for CUDA (and Meta) only: the layer cases, built on CPU
    tensors for the interpreter, cannot call them there (its CPU build, CI's, can)."""
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(INTERPRETING, reason="this is the launcher")
def test_cases_under_the_interpreter():
    if _cuda_build_of_vllm():
        pytest.skip("the layer cases run vLLM's ops on CPU tensors under Triton's interpreter: vLLM's CPU build "
                    "(CI); a CUDA build registers them for CUDA only")
    env = {**os.environ, "TRITON_INTERPRET": "1", "ATOM_KERNEL_BACKEND": "triton"}
    env.pop("ATOM_KERNEL_OVERRIDES", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "layer"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "5 passed" in proc.stdout, proc.stdout[-2000:]


def _layers(tmp_path, monkeypatch, kv_cache_dtype: str, window: int | None, sinks: bool):
    """Two vLLM Attention layers with ATOM's backend in one vLLM config: layer 0 with the switch on, layer 1
    with it off (today's path)."""
    import torch
    from atom.layers import attention as core_attention
    from atom.layers.attention import AttentionSpec
    from tiny_checkpoints_vllm import make_checkpoint
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config

    from atom_vllm.attention import VllmAttentionFactory

    config = VllmConfig(model_config=ModelConfig(model=make_checkpoint("qwen3", str(tmp_path / "qwen3")),
                                                 dtype="float32"))
    sink_logits = torch.randn(NUM_HEADS) if sinks else None
    layers = []
    with set_current_vllm_config(config), torch.device("cpu"):
        for idx, fused in enumerate((True, False)):
            monkeypatch.setattr(core_attention, "FUSED_DECODE_PREP", fused)
            spec = AttentionSpec(layer_idx=idx, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD,
                                 scale=HEAD**-0.5, sliding_window=window, prefix=f"model.layers.{idx}.self_attn.attn")
            factory = VllmAttentionFactory(cache_config=CacheConfig(cache_dtype=kv_cache_dtype), atom_backend=True)
            layers.append(factory(spec, sinks=sink_logits))
    on, off = layers
    assert on.impl._fused_attend is not None and off.impl._fused_attend is None
    return config, on, off


def _metadata(context: list[int], query: list[int], tables, padded_rows: int = 0):
    """AtomAttentionMetadata of a step (sequences with `context` cached tokens and `query` new ones), its positions
    and its count of real tokens; padded_rows: a full CUDA graph's padding as vLLM adds it to a uniform decode
    batch (requests with seq_len 0 and an empty query, tokens with slot -1, counted in num_actual_tokens)."""
    import torch

    from atom_vllm.attention_backend import AtomAttentionMetadata

    positions, slots = [], []
    for b, (c, q) in enumerate(zip(context, query)):
        for p in range(c, c + q):
            positions.append(p)
            slots.append(int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK)
    seq_lens = [c + q for c, q in zip(context, query)] + [0] * padded_rows
    lens = list(query) + [0] * padded_rows
    positions += [0] * padded_rows
    slots += [-1] * padded_rows
    qsl = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    md = AtomAttentionMetadata(num_actual_tokens=len(positions), max_query_len=max(lens), max_seq_len=max(seq_lens),
                               query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                               block_table=tables[:len(seq_lens)].contiguous(),
                               slot_mapping=torch.tensor(slots, dtype=torch.int64))
    return md, torch.tensor(positions, dtype=torch.int64), sum(query)


@interpreted
@pytest.mark.parametrize("case", ["qk_norm", "window_sinks_no_norm", "fp8_kv"])
def test_layer_decode_step_is_bit_identical_to_the_two_ops(case, tmp_path, monkeypatch):
    import torch
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import set_forward_context

    torch.manual_seed(0)
    window, sinks = (8, True) if case == "window_sinks_no_norm" else (None, False)
    kv_dtype = "fp8" if case == "fp8_kv" else "auto"
    config, on, off = _layers(tmp_path, monkeypatch, kv_dtype, window, sinks)
    # vLLM >= 0.30's cache of a layer: [num_blocks, num_kv_heads, block_size, K | V], random (never zeros)
    cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK, 2 * HEAD)
    if kv_dtype == "fp8":  # vLLM allocates FP8 caches as bytes
        cache = cache.to(torch.float8_e4m3fn).view(torch.uint8)
        for layer in (on, off):
            layer._k_scale.fill_(0.75)
            layer._v_scale.fill_(1.25)
    on.kv_cache, off.kv_cache = cache.clone(), cache.clone()
    # shuffled blocks, none shared between sequences (as vLLM's: a block a step writes belongs to one sequence;
    # with the write inside the attention kernel another sequence reading it would race)
    tables = torch.randperm(NUM_BLOCKS).view(5, 4).to(torch.int32)
    half = HEAD // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.arange(64, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    norm = case != "window_sinks_no_norm"
    q_weight, k_weight = (torch.rand(HEAD) + 0.5, torch.rand(HEAD) + 0.5) if norm else (None, None)
    names = (on.layer_name, off.layer_name)

    def step(md, positions, real, mode=CUDAGraphMode.NONE):
        t = positions.shape[0]
        qkv = torch.randn(t, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD)  # the model's split views of one tensor
        q, k, v = qkv.split([NUM_HEADS * HEAD, NUM_KV_HEADS * HEAD, NUM_KV_HEADS * HEAD], dim=-1)
        outs = []
        with set_forward_context({n: md for n in names}, config, cudagraph_runtime_mode=mode,
                                 slot_mapping={n: md.slot_mapping for n in names}):
            for layer in (on, off):
                outs.append(layer.forward_with_prep(positions, q, k, v, q_weight, k_weight, 1e-6, cos_sin, True))
        assert on.impl._stash is None  # consumed by the attention op
        assert torch.equal(outs[0][:real], outs[1][:real]), case  # padded rows: nothing to compare
        assert torch.equal(on.kv_cache, off.kv_cache), case
        return on.impl.fused_decode_steps

    # decode (contexts up to 40 over 16-token blocks, past the window of 8), twice in a row
    context = [5, 20, 33]
    md, pos, real = _metadata(context, [1, 1, 1], tables)
    assert step(md, pos, real) == 1
    md, pos, real = _metadata([c + 1 for c in context], [1, 1, 1], tables)
    assert step(md, pos, real) == 2
    # a full CUDA graph's uniform decode batch: 4 real sequences and 2 padded rows (vLLM's FULL mode)
    md, pos, real = _metadata([7, 15, 16, 40], [1, 1, 1, 1], tables, padded_rows=2)
    assert step(md, pos, real, CUDAGraphMode.FULL) == 3
    # the same under piecewise graphs: the prep op replays its capture there, so it keeps its own kernel
    md, pos, real = _metadata([8, 16, 17, 41], [1, 1, 1, 1], tables)
    assert step(md, pos, real, CUDAGraphMode.PIECEWISE) == 3
    # a mixed step (a prefill chunk among decodes): the two ops
    md, pos, real = _metadata([9, 0, 18], [1, 6, 1], tables)
    assert step(md, pos, real) == 3


@interpreted
def test_layer_stash_from_another_step_is_refused(tmp_path, monkeypatch):
    """The prep op's stash belongs to its step: an attention op that finds one from another step's metadata (its
    own prep op never ran) raises rather than attend with stale queries."""
    import torch
    from vllm.forward_context import set_forward_context

    config, on, _ = _layers(tmp_path, monkeypatch, "auto", None, False)
    on.kv_cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK, 2 * HEAD)
    tables = torch.arange(8, dtype=torch.int32).view(2, 4)
    cos_sin = torch.randn(64, HEAD)
    md, pos, _ = _metadata([3, 4], [1, 1], tables)
    q, k, v = torch.randn(2, NUM_HEADS * HEAD), torch.randn(2, NUM_KV_HEADS * HEAD), torch.randn(2, NUM_KV_HEADS * HEAD)
    from atom_vllm.attention_backend import norm_rope_write

    with set_forward_context({on.layer_name: md}, config, slot_mapping={on.layer_name: md.slot_mapping}):
        norm_rope_write(pos, q, k, v, None, None, 1e-6, cos_sin, True, on.layer_name)
    assert on.impl._stash is not None and on.impl._stash[0] is md
    md2, _, _ = _metadata([3, 4], [1, 1], tables)
    with set_forward_context({on.layer_name: md2}, config, slot_mapping={on.layer_name: md2.slot_mapping}):
        with pytest.raises(RuntimeError, match="stash is from another step"):
            on.forward(torch.empty_like(q), k[:0], v[:0])
        with pytest.raises(RuntimeError, match="stash is missing"):  # consumed (and cleared) by the failed call
            on.forward(torch.empty_like(q), k[:0], v[:0])


@interpreted
def test_layer_writes_kv_through_the_contexts_slots_without_metadata(tmp_path, monkeypatch):
    """vLLM captures its piecewise CUDA graphs with no attention metadata and the forward context's persistent slot
    buffer (-1 while capturing; the step's slots when a captured piece is replayed, with no Python running): the prep
    op's K/V write must go through that buffer into the layer's cache. Until stop 39 it wrote into a private dummy
    there, so every prefill vLLM ran as a piecewise graph left its keys and values out of the cache. Both layers:
    with the switch off (today's path) and on (not fused without metadata)."""
    import torch
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import set_forward_context

    from atom_vllm.attention_backend import norm_rope_write

    torch.manual_seed(0)
    config, on, off = _layers(tmp_path, monkeypatch, "auto", None, False)
    tables = torch.arange(8, dtype=torch.int32).view(2, 4)
    cos_sin = torch.randn(64, HEAD)
    md, pos, real = _metadata([0, 0], [3, 2], tables)  # a prefill of two prompts
    q, k, v = (torch.randn(real, n * HEAD) for n in (NUM_HEADS, NUM_KV_HEADS, NUM_KV_HEADS))
    weights = (torch.rand(HEAD) + 0.5, torch.rand(HEAD) + 0.5)
    for layer in (off, on):
        name = layer.layer_name
        # the reference: the same step with its metadata (an eager step)
        layer.kv_cache = torch.zeros(NUM_BLOCKS, NUM_KV_HEADS, BLOCK, 2 * HEAD)
        with set_forward_context({name: md}, config, slot_mapping={name: md.slot_mapping}):
            norm_rope_write(pos, q, k, v, *weights, 1e-6, cos_sin, True, name)
        expected = layer.kv_cache.clone()
        assert expected.abs().sum() > 0
        for slots, want in ((torch.full_like(md.slot_mapping, -1), torch.zeros_like(expected)),  # the capture
                            (md.slot_mapping.clone(), expected)):  # a replay: the buffer holds the step's slots
            layer.kv_cache = torch.zeros(NUM_BLOCKS, NUM_KV_HEADS, BLOCK, 2 * HEAD)
            with set_forward_context(None, config, cudagraph_runtime_mode=CUDAGraphMode.PIECEWISE,
                                     slot_mapping={name: slots}):
                norm_rope_write(pos, q, k, v, *weights, 1e-6, cos_sin, True, name)
            assert layer.impl._stash is None
            assert torch.equal(layer.kv_cache, want), name


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="starts its own engines")
def test_engine_greedy_tokens_equal_with_and_without_the_switch(tmp_path):
    """A tiny Qwen3 through vllm.LLM on ATOM's attention backend with the attention ops on Triton's interpreter
    (the rest on torch, for speed): 6 prompts, 12 greedy tokens each (11 pure decode steps of the whole batch),
    eager and compiled (Dynamo tracing the prep op's fake), the same tokens and top-2 logprob gaps with the switch
    on as off, and every decode step of both layers took the fused kernel (none with it off)."""
    import torch
    from conftest import ON_GPU, _collect, _start_offline
    from tiny_checkpoints_vllm import make_checkpoint

    if ON_GPU:
        pytest.skip("the CPU interpreter's run; on a GPU the A/B is tools/device/bench_vs_vllm.sh")
    path = make_checkpoint("qwen3", str(tmp_path / "qwen3"))
    env = dict(VLLM_CPU_CI_ENV="1", VLLM_CPU_OMP_THREADS_BIND="nobind", ATOM_VLLM_ATTENTION="1", TRITON_INTERPRET="1",
               ATOM_KERNEL_BACKEND="torch",
               ATOM_KERNEL_OVERRIDES="paged_attention=triton,qk_norm_rope_cache=triton,reshape_and_cache=triton")
    procs = {fused: _start_offline([path, path + "@compile"] if fused else [path], str(tmp_path / f"{fused}.log"),
                                   ATOM_ATTN_FUSED_DECODE_PREP=str(int(fused)), **env) for fused in (True, False)}
    runs = {fused: _collect(proc, str(tmp_path / f"{fused}.log")) for fused, proc in procs.items()}
    off = runs[False]["results"][path]
    assert off["attn_impl"] == ["AtomAttentionImpl"] and off["fused_decode_steps"] == 0
    assert "decode prep inside the attention kernel" in runs[True]["log"]
    for spec in (path, path + "@compile"):
        on = runs[True]["results"][spec]
        assert on["fused_decode_steps"] == 11 * 2, spec  # 11 decode steps, 2 layers
        assert on["tokens"] == off["tokens"], spec
        assert on["gaps"] == off["gaps"], spec
    assert torch.tensor([len(t) for t in off["tokens"]]).eq(12).all()
