#!/usr/bin/env python3
"""Collective time per decode step under tensor parallelism (issue 17), from a profile of rank 0.

  PYTHONPATH=packages/atom-core/src:packages/atom-server/src:/tmp/site python3 tools/device/tp_profile.py \
      --model qwen3-8b --tp 2 [--ep] --batch-sizes 1,32,128 --out $OUT/tp_profile_8b_tp2.json

--model is a preset of atom_server.bench (random weights) or a checkpoint folder. For each batch size the
engine takes bs prompts of --input-len random tokens, runs --warmup steps (the prefill and the first
decodes), times --steps decode steps (wall ms/step, the profiler off), then profiles --steps more on rank 0
(torch.profiler; CUDA kernels on a GPU, the gloo record_function ranges on CPU) and reports per step: the
time in all-reduce and all-gather collectives (on a GPU the NCCL kernels, which include waiting for the
slowest rank), the rest of the device time, and their share (TP_PROFILE_TABLE=1 prints the top kernels). Rank 0 runs every collective the workers run
(the same graphs), so its profile counts them all. Works on CPU at small sizes (a check of the tool).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time

import torch

COLLECTIVES = {"all_reduce": re.compile(r"all_?reduce", re.I), "all_gather": re.compile(r"all_?gather", re.I)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _classify(name: str, on_gpu: bool) -> str | None:
    # GPU: the NCCL kernels (inside graph replays too); CPU: the c10d ops, which wait for gloo
    if ("nccl" not in name.lower()) if on_gpu else not name.startswith("c10d::"):
        return None
    for kind, pattern in COLLECTIVES.items():
        if pattern.search(name):
            return kind
    return "other_collective"


def profile_batch(llm, bs: int, input_len: int, warmup: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from atom_server.sampling_params import SamplingParams

    eng = llm.llm_engine
    rng = random.Random(bs)
    params = SamplingParams(temperature=0.0, max_tokens=warmup + 2 * steps + 2, ignore_eos=True)
    ids = [f"p{bs}-{i}" for i in range(bs)]
    for rid in ids:
        eng.add_request(rid, [rng.randrange(eng.runner.vocab_size) for _ in range(input_len)], params)
    for _ in range(warmup):
        eng.step()
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    _sync()
    wall_ms = (time.perf_counter() - t) / steps * 1e3
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            eng.step()
        _sync()
    eng.abort_request(ids)
    while eng.has_unfinished_requests():
        eng.step()
    if os.environ.get("TP_PROFILE_TABLE"):  # the top ops / kernels, for a look by eye
        print(prof.key_averages().table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
                                        row_limit=25, max_name_column_width=70))
    totals = {"all_reduce": 0.0, "all_gather": 0.0, "other_collective": 0.0}
    device_total = 0.0
    calls = {k: 0 for k in totals}
    for ev in prof.key_averages():
        us = (getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)) if on_gpu \
            else ev.self_cpu_time_total
        kind = _classify(ev.key, on_gpu)
        if on_gpu:
            device_total += us
        if kind is not None:
            totals[kind] += us
            calls[kind] += ev.count
    per_step = {k: v / steps for k, v in totals.items()}
    row = dict(batch_size=bs, wall_ms_per_step=wall_ms, steps=steps,
               collective_us_per_step=per_step, collective_calls_per_step={k: v / steps for k, v in calls.items()})
    if on_gpu:
        row["device_us_per_step"] = device_total / steps
        row["collective_share"] = sum(per_step.values()) / max(device_total / steps, 1e-9)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a preset (qwen3-8b, qwen3-30b-a3b, ...) or a checkpoint folder")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--ep", action="store_true", help="--enable-expert-parallel")
    ap.add_argument("--batch-sizes", default="1,32,128")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--engine-args", default="{}", help="JSON dict of extra engine args")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from atom_server.bench import PRESETS, preset_checkpoint
    from atom_server.llm import LLM

    sizes = [int(x) for x in a.batch_sizes.split(",")]
    model, load_format = a.model, "auto"
    if model in PRESETS:
        model, load_format = preset_checkpoint(a.model), "dummy"
    engine_args = {**dict(max_model_len=a.input_len + a.warmup + 2 * a.steps + 8, max_num_seqs=max(sizes),
                          enable_prefix_caching=False, skip_tokenizer_init=True, dtype=a.dtype),
                   **json.loads(a.engine_args)}
    t = time.perf_counter()
    llm = LLM(model, load_format=load_format, tensor_parallel_size=a.tp, enable_expert_parallel=a.ep, **engine_args)
    report = dict(model=a.model, tp=a.tp, ep=a.ep, init_s=time.perf_counter() - t, dtype=a.dtype,
                  device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  graphs=llm.llm_engine.runner.graphs is not None, rows=[])
    try:
        for bs in sizes:
            row = profile_batch(llm, bs, a.input_len, a.warmup, a.steps)
            report["rows"].append(row)
            c = row["collective_us_per_step"]
            share = f", {100 * row['collective_share']:.0f}% of device time" if "collective_share" in row else ""
            print(f"tp={a.tp}{' ep' if a.ep else ''} bs={bs:>4}: {row['wall_ms_per_step']:.3f} ms/step; per step "
                  f"all-reduce {c['all_reduce']:.0f} us ({row['collective_calls_per_step']['all_reduce']:.0f} calls), "
                  f"all-gather {c['all_gather']:.0f} us{share}", flush=True)
            if a.out:
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                with open(a.out, "w") as f:
                    json.dump(report, f, indent=1)
    finally:
        llm.llm_engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
