"""Where a decode step's time goes in atom-server's engine (run on the GPU machine).

For each preset: `atom_server.bench.run_throughput` (tok/s at the given batch sizes), then, on the same
engine, a per-phase host timing of the engine step (perf_counter around schedule / prepare / replay /
sample / sync / bookkeeping, whichever exist in the code on the path), the GPU time of one graph replay
per batch size (CUDA events), the top kernels of a few engine steps (torch.profiler) and those of the decode
step alone (graph replays under torch.profiler: launches and GPU us a step per kernel).

    PYTHONPATH=packages/atom-core/src:packages/atom-server/src python3 tools/device/decode_profile.py \
        --presets qwen3-0.6b --batch-sizes 1,32,128 --label new --out $OUT/prof_new.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

from atom_server.bench import run_throughput
from atom_server.llm import LLM
from atom_server.sampling_params import SamplingParams

TIMES: dict[str, list[float]] = defaultdict(list)


def wrap(obj, attr: str, name: str) -> None:
    fn = getattr(obj, attr, None)
    if fn is None:
        return

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TIMES[name].append(time.perf_counter() - t)

    setattr(obj, attr, timed)


def instrument(engine) -> None:
    r = engine.runner
    wrap(engine, "step", "step (total)")
    wrap(engine.scheduler, "schedule", "scheduler.schedule")
    wrap(engine.scheduler, "commit", "scheduler.commit")
    wrap(r, "execute", "runner.execute")
    wrap(r, "launch_decode", "runner.launch_decode (async)")
    if getattr(engine, "step_inputs", None) is not None:
        wrap(engine.step_inputs, "build", "step_inputs.build (StepInput)")
    wrap(r, "_forward", "  runner._forward (old: inputs+replay)")
    wrap(r.model, "compute_logits", "  model.compute_logits (eager)")
    wrap(r, "_sample_rows", "  runner._sample_rows")
    g = r.graphs
    if g is not None:
        wrap(g, "prepare", "  graphs.prepare (inputs + H2D)")
        wrap(g, "replay", "  graphs.replay (launch)")
        wrap(g, "fetch_tokens", "  graphs.fetch_tokens (D2H launch)")
        wrap(g, "tokens_list", "  graphs.tokens_list (wait GPU + tolist)")
        wrap(g, "run", "  graphs.run (old: inputs + replay)")
    wrap(engine, "_append", "  engine._append (per seq)")
    wrap(engine, "_output", "  engine._output (per request)")
    wrap(engine, "_resolve", "  engine._resolve (async bookkeeping)")


def profile_steps(llm: LLM, bs: int, input_len: int, output_len: int) -> dict:
    eng = llm.llm_engine
    vocab = eng.runner.vocab_size
    g = torch.Generator().manual_seed(bs)
    prompts = [{"prompt_token_ids": torch.randint(0, vocab, (input_len,), generator=g).tolist()} for _ in range(bs)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    TIMES.clear()
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    rows = {k: dict(calls=len(v), median_us=statistics.median(v) * 1e6, total_ms=sum(v) * 1e3)
            for k, v in TIMES.items()}
    steps = len(TIMES.get("step (total)", []))
    return dict(batch_size=bs, wall_s=wall, steps=steps, phases=rows)


def graph_gpu_times(llm: LLM, sizes: list[int]) -> dict[int, float]:
    g = llm.llm_engine.runner.graphs
    out = {}
    if g is None or getattr(llm.llm_engine.runner, "world_size", 1) > 1:  # TP: rank 0 alone would wait forever
        return out
    for bs in sizes:
        key = min(s for s in g.graphs if s >= bs)
        graph = g.graphs[key][0]
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(50):
            graph.replay()
        b.record()
        torch.cuda.synchronize()
        out[bs] = a.elapsed_time(b) / 50 * 1e3  # us
    return out


def kernel_table(llm: LLM, bs: int, input_len: int, steps: int = 8) -> str:
    """Top kernels of one generate() of bs prompts: the prefill and `steps` decode steps (0: the prefill alone)."""
    from torch.profiler import ProfilerActivity, profile

    eng = llm.llm_engine
    vocab = eng.runner.vocab_size
    prompts = [{"prompt_token_ids": [(7 * i + j) % vocab for j in range(input_len)]} for i in range(bs)]
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    try:
        return prof.key_averages().table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=70)
    except Exception:  # older names
        return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=70)


def replay_kernel_table(llm: LLM, bs: int, replays: int = 20) -> list[dict]:
    """The kernels of one decode step alone: `replays` replays of the batch-size graph under torch.profiler (its
    static inputs hold the last step the engine ran), per kernel the launches and GPU us a step, largest first.
    The kernel table above mixes in the prefill of its 9 steps; this one has none. With programmatic dependent
    launch a kernel starts before its predecessor ends and its time includes that wait: run with ATOM_PDL=0 for
    times that add up to the step."""
    from torch.profiler import ProfilerActivity, profile

    g = llm.llm_engine.runner.graphs
    if g is None:
        return []
    graph = g.graphs[min(s for s in g.graphs if s >= bs)][0]
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = ev.self_cuda_time_total
        if us > 0:
            rows.append(dict(name=ev.key, calls_per_step=ev.count / replays, us_per_step=us / replays))
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="qwen3-0.6b")
    ap.add_argument("--batch-sizes", default="1,32,128")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--kernels", default="1,128", help="batch sizes for the torch.profiler kernel table")
    ap.add_argument("--kernel-steps", type=int, default=8,
                    help="decode steps in the kernel table after the prefill (0: the prefill alone)")
    ap.add_argument("--engine-args", default="{}", help="JSON dict of extra engine args")
    a = ap.parse_args()
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    results = []
    holder: list[LLM] = []
    orig_init = LLM.__init__

    def init(self, *args, **kw):
        orig_init(self, *args, **kw)
        holder.append(self)

    LLM.__init__ = init
    for preset in a.presets.split(","):
        holder.clear()
        t = time.perf_counter()
        rows = run_throughput(preset, input_len=a.input_len, output_len=a.output_len, batch_sizes=sizes,
                              quiet=True, **json.loads(a.engine_args))
        res = dict(label=a.label, preset=preset, bench_s=time.perf_counter() - t,
                   rows=[{k: r[k] for k in ("batch_size", "output_tok_s", "ms_per_step", "prefill_ms", "init_s")}
                         for r in rows])
        llm = holder[0]
        eng = llm.llm_engine
        res["weight_gb"] = sum(p.numel() * p.element_size() for p in eng.runner.model.parameters()) / 1e9
        for r in res["rows"]:
            print(f"[{a.label}] {preset} bs={r['batch_size']:>4} out tok/s {r['output_tok_s']:>10.1f}  "
                  f"ms/step {r['ms_per_step']:.3f}  prefill {r['prefill_ms']:.1f} ms  init {r['init_s']:.1f}s",
                  flush=True)
        res["graph_gpu_us"] = graph_gpu_times(llm, sizes)
        print(f"[{a.label}] {preset} graph replay GPU us: "
              + ", ".join(f"bs{k}={v:.0f}" for k, v in res["graph_gpu_us"].items()), flush=True)
        if not a.no_profile:
            instrument(eng)
            res["phases"] = [profile_steps(llm, bs, a.input_len, a.output_len) for bs in sizes]
            for p in res["phases"]:
                print(f"[{a.label}] {preset} bs={p['batch_size']} wall {p['wall_s'] * 1e3:.1f} ms, "
                      f"{p['steps']} steps; phase: calls, median us, total ms")
                for k, v in p["phases"].items():
                    print(f"    {k:<44} {v['calls']:>6} {v['median_us']:>10.1f} {v['total_ms']:>10.2f}")
            res["kernels"] = {}
            for bs in [int(x) for x in a.kernels.split(",") if x]:
                tab = kernel_table(llm, bs, a.input_len, a.kernel_steps)
                res["kernels"][bs] = tab
                print(f"[{a.label}] {preset} kernels, bs={bs} (the prefill and {a.kernel_steps} decode steps):\n{tab}",
                      flush=True)
                rows = replay_kernel_table(llm, bs)
                res.setdefault("decode_kernels", {})[bs] = rows
                total = sum(r["us_per_step"] for r in rows)
                print(f"[{a.label}] {preset} decode step alone, bs={bs} (graph replays): {total:.0f} us of kernels "
                      "a step; kernel, launches a step, us a step, share", flush=True)
                for r in rows[:30]:
                    print(f"    {r['name'][:70]:<70} {r['calls_per_step']:>6.1f} {r['us_per_step']:>9.1f} "
                          f"{100 * r['us_per_step'] / total:>5.1f}%", flush=True)
        results.append(res)
        del llm, eng
        holder.clear()
        torch.cuda.empty_cache()
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
