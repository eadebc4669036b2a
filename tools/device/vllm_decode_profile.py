#!/usr/bin/env python3
"""Where one decode step's GPU time goes inside vLLM: its built-in model or ATOM's through atom-vllm (issue 16
target 1). vLLM's engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so torch.profiler sees every
kernel, CUDA-graph replays included. Per batch size: one generate() of `--steps` + 1 tokens and one of a single
token (the prefill alone), both profiled on the same prompts' shape; a kernel's decode time per step is the
difference of its two totals over `--steps`. Prints the table and writes it as JSON, with the prefill's own table
(the single-token generate: batch x --input-len prompt tokens) beside it (`--prefill-rows N` prints it too).

  # vLLM's own model (atom not importable), then ATOM's (the plugin on):
  PYTHONPATH=/tmp/site python3 tools/device/vllm_decode_profile.py --model DIR --label vllm --out $OUT/p_vllm.json
  PYTHONPATH=/tmp/site-atom:/tmp/site python3 tools/device/vllm_decode_profile.py --model DIR --label atom-vllm ...

Kernel names differ between the engines (Inductor's fused kernels are named after the ops they fuse), so the
comparison is by group as well (`--groups`: GEMM, attention, norm/rope/activation, ...), and by the whole step.
On a machine without CUDA the CPU self time of each op stands in (a smoke run only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import defaultdict

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: the profiler sees it
for k, v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                 VLLM_CACHE_ROOT="/tmp/vllm_cache", VLLM_USE_FLASHINFER_SAMPLER="0").items():
    os.environ.setdefault(k, v)

# Kernel name -> group, first match wins (lower-case names). Coarse on purpose: it is what lets two engines'
# differently named kernels be compared.
GROUPS = [  # attention first: FlashAttention's kernels are cutlass kernels
    ("attention", r"flash|fmha|attn|attention|paged|decode_kernel|merge_splits|reshape_and_cache|kv_write"),
    ("gemm", r"gemm|gemv|cutlass|sm90_xmma|nvjet|cublas|splitk|_fp8_gemm|matmul|mm_kernel|scaled_mm|wgmma"),
    ("moe", r"expert|moe|topk|align"),
    ("norm/rope/act (fused)", r"norm|rope|rotary|silu|swiglu|act_and_mul|gelu|triton_(poi|red|per)_fused"),
    ("sampling/logits", r"argmax|sample|softmax|logit|gather|index|scatter|cumsum|sort"),
    ("copy/fill", r"copy|memcpy|memset|fill|cat|elementwise|vectorized"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return "other"


def kernel_totals(prof, cuda: bool) -> dict[str, tuple[float, int]]:
    """name -> (device us, launches) of every kernel under the profiler (CPU self time without CUDA)."""
    out: dict[str, tuple[float, int]] = {}
    for ev in prof.key_averages():
        if cuda:
            us = getattr(ev, "self_device_time_total", None)
            if us is None:
                us = getattr(ev, "self_cuda_time_total", 0.0)
            # kernels only: a CPU op's self device time is 0, a kernel has no CPU self time worth counting
            if us <= 0 or getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
                continue
        else:
            us = ev.self_cpu_time_total
            if us <= 0:
                continue
        out[ev.key] = (float(us), int(ev.count))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--label", required=True, help="names the engine in the output (vllm, atom-vllm, ...)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 128])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps profiled per batch size")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--quantization", default=None, help="vLLM's --quantization (e.g. fp8 on a bf16 checkpoint)")
    p.add_argument("--kv-cache-dtype", default="auto", help="vLLM's --kv-cache-dtype (e.g. fp8)")
    p.add_argument("--rows", type=int, default=25, help="kernels printed per batch size")
    p.add_argument("--prefill-rows", type=int, default=0,
                   help="also print the prefill's kernel table (its groups and this many kernels); the JSON always "
                        "has it")
    p.add_argument("--out", required=True, help="JSON output")
    ns = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    llm = LLM(model=ns.model, skip_tokenizer_init=True, load_format="dummy", dtype=ns.dtype, seed=0,
              max_model_len=ns.input_len + ns.steps + 8, gpu_memory_utilization=ns.gpu_memory_utilization,
              enable_prefix_caching=False, enforce_eager=ns.enforce_eager, quantization=ns.quantization,
              kv_cache_dtype=ns.kv_cache_dtype)
    init_s = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)
    # the engine core runs here: ATOM's model classes are imported in this process exactly when vLLM built one
    atom_built = any(m.startswith("atom_vllm.models") for m in sys.modules)
    report = dict(label=ns.label, model=ns.model, device=torch.cuda.get_device_name() if cuda else "cpu",
                  atom_model_built=atom_built, init_s=init_s, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  command=" ".join(sys.argv), batches=[])

    def prompts(bs: int) -> list[dict]:
        return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(ns.input_len)]} for _ in range(bs)]

    def profiled(bs: int, max_tokens: int) -> tuple[dict[str, tuple[float, int]], float]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                                detokenize=False)
        llm.generate(prompts(bs), params, use_tqdm=False)  # warm: graphs, JIT, allocator
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            llm.generate(prompts(bs), params, use_tqdm=False)
            wall = time.perf_counter() - t
        return kernel_totals(prof, cuda), wall

    def table(totals: dict[str, tuple[float, int]], base: dict[str, tuple[float, int]], per: int) -> dict:
        """Kernel rows (totals less base, over `per`), their groups and sums."""
        rows = []
        for name in set(totals) | set(base):
            us_f, n_f = totals.get(name, (0.0, 0))
            us_p, n_p = base.get(name, (0.0, 0))
            us, n = (us_f - us_p) / per, (n_f - n_p) / per
            if us > 0.05 or n > 0.05:
                rows.append(dict(name=name, group=group_of(name), us_per_step=round(us, 2),
                                 launches_per_step=round(n, 2)))
        rows.sort(key=lambda r: -r["us_per_step"])
        groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for r in rows:
            groups[r["group"]][0] += r["us_per_step"]
            groups[r["group"]][1] += r["launches_per_step"]
        return dict(kernels=rows, kernel_us_per_step=round(sum(r["us_per_step"] for r in rows), 1),
                    launches_per_step=round(sum(r["launches_per_step"] for r in rows), 1),
                    groups={g: dict(us=round(v[0], 1), launches=round(v[1], 1))
                            for g, v in sorted(groups.items(), key=lambda kv: -kv[1][0])})

    def printed(title: str, t: dict, wall_ms: float, unit: str, shown: int) -> str:
        text = (f"== {title}: kernels {t['kernel_us_per_step']:.1f} us/{unit} in {t['launches_per_step']} launches; "
                f"wall under the profiler {wall_ms:.3f} ms/{unit}\n")
        for g, v in t["groups"].items():
            text += f"   {g:<24} {v['us']:9.1f} us  {v['launches']:7.1f} launches\n"
        for r in t["kernels"][:shown]:
            text += f"   {r['us_per_step']:9.1f} us {r['launches_per_step']:6.1f}x  [{r['group']}] {r['name'][:110]}\n"
        return text

    for bs in ns.batch_sizes:
        full, full_wall = profiled(bs, ns.steps + 1)
        pre, pre_wall = profiled(bs, 1)
        decode = table(full, pre, ns.steps)
        wall_step_ms = (full_wall - pre_wall) / ns.steps * 1e3
        # the prefill of bs prompts of --input-len tokens (and the first token's sampling), as profiled
        prefill = {**table(pre, {}, 1), "wall_ms_under_profiler": round(pre_wall * 1e3, 3)}
        report["batches"].append(dict(batch_size=bs, **decode, wall_ms_per_step_under_profiler=round(wall_step_ms, 3),
                                      prefill=prefill))
        text = printed(f"{ns.label} bs={bs}", decode, wall_step_ms, "step", ns.rows)
        if ns.prefill_rows:
            text += printed(f"{ns.label} bs={bs} prefill of {bs} x {ns.input_len} tokens", prefill, pre_wall * 1e3,
                            "prefill", ns.prefill_rows)
        print(text, flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
        with open(ns.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
