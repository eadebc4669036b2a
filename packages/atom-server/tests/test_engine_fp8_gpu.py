"""FP8 in the engine on a GPU: a tiny block-FP8 checkpoint with an FP8 KV cache (checkpoint scales) through
`LLM` with CUDA graphs on (ATOM's Triton FP8 GEMM / MoE, quantization, FP8 KV write and read kernels, all
captured), against the same checkpoint on the CPU reference path (the torch references) in this process.

Greedy tokens (16 per prompt, float32 activations, logprobs of the top 2) must equal the CPU's until the
two runs part, and part only where the CPU run's top-2 gap is below TIE: an FP8 KV cache makes the
per-token activation quantization at o_proj land on e4m3 rounding ties, which float32 summation-order
differences flip (1% on the logits of a tiny model under Triton vs torch, atom-core test_triton_fp8.py), so
TIE = 0.5; at least half of all steps must be identical.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from tiny_checkpoint import write_tiny_llama

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA or ROCm device", allow_module_level=True)

from atom.ops.registry import cuda_graph_blockers  # noqa: E402
from atom_server import LLM, SamplingParams  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
import quantize_fp8  # noqa: E402

TIE = 0.5
PROMPTS = [{"prompt_token_ids": [7 + (i * 13) % 250 for i in range(n)]} for n in (5, 33, 70, 12, 2, 48)]


def _run(llm, prompts=PROMPTS) -> tuple[list[list[int]], list[list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    tokens, gaps = [], []
    for out in llm.generate(prompts, params, use_tqdm=False):
        tokens.append(out.outputs[0].token_ids)
        gaps.append([(lambda v: v[0] - v[1])(sorted((lp.logprob for lp in step.values()), reverse=True))
                     for step in out.outputs[0].logprobs])
    return tokens, gaps


@pytest.mark.parametrize("fmt", ["fp8-block", "compressed-tensors"])
def test_fp8_checkpoint_with_fp8_kv_cache_on_cuda_graphs_follows_the_cpu_reference(fmt, tmp_path):
    # larger weights than the default: peaked logits (top-2 gaps of 1-3), few near ties
    ckpt = write_tiny_llama(tmp_path / "float", hidden_size=128, intermediate_size=256, initializer_range=0.5)
    fp8 = str(tmp_path / "fp8")
    quantize_fp8.quantize_checkpoint(ckpt, fp8, fmt, (32, 32), kv_cache_scales=fmt == "compressed-tensors")
    args = dict(dtype="float32", block_size=16, max_model_len=256, max_num_seqs=8, kv_cache_dtype="fp8")
    gpu = LLM(fp8, gpu_memory_utilization=0.3, **args)
    runner = gpu.llm_engine.runner
    assert runner.graphs is not None and cuda_graph_blockers(runner.model) == []
    assert {c.k.dtype for c in runner.kv_caches} == {torch.float8_e4m3fn}
    got, _ = _run(gpu)
    del gpu
    torch.cuda.empty_cache()
    want, gaps = _run(LLM(fp8, device="cpu", **args))
    same = 0
    for g, w, gap in zip(got, want, gaps):
        step = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w))
        same += step
        assert step == len(w) or gap[step] < TIE, (step, gap[step], g, w)
    print(f"FP8 {fmt} + FP8 KV, CUDA graphs vs the CPU reference: {same} of {16 * len(PROMPTS)} greedy steps "
          "identical (parting only at near ties)")
    assert same >= 8 * len(PROMPTS)
