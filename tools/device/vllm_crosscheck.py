#!/usr/bin/env python3
"""vLLM's baseline measured a second way: vLLM's own driver, `vllm bench latency`, against our harness.

  python3 tools/device/vllm_crosscheck.py --model DIR --batch-size 32 --input-len 128 --output-len 128 \
      --harness-json /tmp/bench_parts/vllm_qwen3-8b_0.json [...] --output-json F [--expect-no-atom] \
      [--enforce-eager] [--quantization fp8] [--kv-cache-dtype fp8] [-tp N]

Issue 16's method: the vLLM figures every ATOM / vLLM ratio divides by come from tools/device/vllm_throughput.py
(ours); once per device session they are checked against vLLM's own benchmark code. This process runs
`vllm.benchmarks.latency` (what `vllm bench latency` runs: one batch of --batch-size random prompts, EOS ignored,
timed around `LLM.generate`, prefix caching off) with the engine settings of the harness (random weights,
max_model_len = input + output, the same dtype, memory share and quantization), then compares the median of its
timed iterations with the harness's end-to-end time of the same batch size (the median over every harness JSON
given: vllm_throughput.py's reports of the session's rounds). The two differ in what they sample (vLLM's driver:
temperature 1.0 over one fixed prompt batch; ours: greedy over fresh prompts each run), not in what they time.
Writes the comparison (both sets of times, ratio = harness / driver) and prints one line; --tolerance (0.10) is
the relative difference past which the line says DISAGREE. Exit status 0 whenever both were measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

for k, v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                 VLLM_CACHE_ROOT="/tmp/vllm_cache", VLLM_USE_FLASHINFER_SAMPLER="0").items():
    os.environ.setdefault(k, v)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_table import CROSSCHECK_DRIVER as DRIVER  # noqa: E402
from make_table import crosscheck_line  # noqa: E402


def harness_times(paths: list[str], batch_size: int) -> list[float]:
    """End-to-end seconds of every timed full run at batch_size in vllm_throughput.py's reports."""
    times: list[float] = []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for run in report.get("runs", []):
            if run.get("batch_size") == batch_size:
                times.extend(run.get("total_s_all") or [run["elapsed_s"]])
    return times


def compare(driver_s: list[float], harness_s: list[float], tolerance: float) -> dict:
    """ratio = harness median / driver median (> 1: our harness timed the batch slower than vLLM's own driver)."""
    d, h = statistics.median(driver_s), statistics.median(harness_s) if harness_s else None
    out = dict(driver_median_s=d, harness_median_s=h, ratio=None, agree=None, tolerance=tolerance)
    if h is not None and d > 0:
        out["ratio"] = h / d
        out["agree"] = abs(out["ratio"] - 1.0) <= tolerance
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--quantization", default=None)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--harness-json", nargs="*", default=[], help="vllm_throughput.py reports of the same engine setup")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--output-json", required=True)
    p.add_argument("--expect-no-atom", action="store_true",
                   help="refuse to run when any atom package is importable (vLLM's baseline, issue 16)")
    ns = p.parse_args(argv)
    if ns.num_iters < 1 or ns.num_iters_warmup < 0:
        p.error("--num-iters must be >= 1 and --num-iters-warmup >= 0")
    missing = [path for path in ns.harness_json if not os.path.exists(path)]
    if missing:
        p.error(f"--harness-json: no such file: {', '.join(missing)}")
    import importlib.util

    found = [m for m in ("atom", "atom_server", "atom_vllm") if importlib.util.find_spec(m) is not None]
    if ns.expect_no_atom and found:
        print(f"vllm_crosscheck: --expect-no-atom, but {', '.join(found)} is importable "
              f"(PYTHONPATH={os.environ.get('PYTHONPATH', '')})", file=sys.stderr)
        return 2

    import vllm
    from vllm.benchmarks import latency
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "latency.json")
        args = ["--model", ns.model, "--input-len", str(ns.input_len), "--output-len", str(ns.output_len),
                "--batch-size", str(ns.batch_size), "--num-iters", str(ns.num_iters),
                "--num-iters-warmup", str(ns.num_iters_warmup), "--load-format", ns.load_format,
                "--dtype", ns.dtype, "--max-model-len", str(ns.input_len + ns.output_len),
                "--gpu-memory-utilization", str(ns.gpu_memory_utilization), "--skip-tokenizer-init",
                "--disable-detokenize", "--no-enable-prefix-caching", "--seed", "0",
                "--kv-cache-dtype", ns.kv_cache_dtype, "--tensor-parallel-size", str(ns.tensor_parallel_size),
                "--output-json", raw]
        args += ["--enforce-eager"] if ns.enforce_eager else []
        args += ["--quantization", ns.quantization] if ns.quantization else []
        args += ["--enable-expert-parallel"] if ns.enable_expert_parallel else []
        at = args.index("--output-json")
        recorded = args[:at] + args[at + 2:]  # its own temporary output file left out
        parser = FlexibleArgumentParser()
        latency.add_cli_args(parser)
        started = time.perf_counter()
        latency.main(parser.parse_args(args))
        took = time.perf_counter() - started
        with open(raw) as f:
            measured = json.load(f)
    harness = harness_times(ns.harness_json, ns.batch_size)
    result = dict(driver=DRIVER, vllm=vllm.__version__, model=ns.model, batch_size=ns.batch_size,
                  input_len=ns.input_len, output_len=ns.output_len, driver_args=recorded,
                  driver_latencies_s=measured["latencies"], harness_json=ns.harness_json, harness_s=harness,
                  atom_importable=found, took_s=took, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  **compare(measured["latencies"], harness, ns.tolerance))
    os.makedirs(os.path.dirname(os.path.abspath(ns.output_json)), exist_ok=True)
    with open(ns.output_json, "w") as f:
        json.dump(result, f, indent=1)
    print(crosscheck_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
