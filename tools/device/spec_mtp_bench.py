"""Issue 15's mechanism benchmark: MTP speculative decoding with a forced acceptance length, against K = 0.

Random weights accept almost nothing, so the benchmark-only synthetic acceptance (`rejection_sample_method:
synthetic`, `synthetic_acceptance_length` L: the mean tokens a verify step commits per row, bonus included)
measures what a verify step costs and what an acceptance length buys. Model: the `deepseek-v2-lite-mtp` preset
(DeepSeek-V2-Lite's shape plus one MTP layer, random weights, bf16).

One process; one engine per K (Triton's compiled kernels carry over from engine to engine), and per engine
each L of that K, set on the live engine (the runner's synthetic acceptance rates: K, the drafts, the graphs
stay). Each (K, L) is `atom bench throughput`'s measurement (atom_server.bench.measure_throughput: random
prompts of --input-len tokens, --output-len new tokens, greedy, EOS ignored; a warm-up, then the medians of
--repeats prefill-only and full runs) at each batch size, and says which path its timed runs took (graph
replays by kind, eager steps: after each prefill every step should replay a graph) and the mean acceptance
length it measured. --eager-ks repeats some K with --enforce-eager (every step eager, as before the verify
graphs). Engines run in the order given (--ks first, then --eager-ks) and stop when --budget-s would be
passed; the JSON and the table are rewritten after every measurement.

  python tools/device/spec_mtp_bench.py [--ks 0,3,1,2] [--lengths 3:4,3,1] [--batch-sizes 1,8] \
      [--eager-ks 3] [--budget-s 450] [--out DIR]

--lengths: L values per K ("K:L,L;K:L,..."); by default, for K > 0: K + 1 (every draft accepted), K, and 1
(none accepted: the pure cost of drafting and verifying). Output: DIR/spec_mtp_bench.json, DIR/spec_mtp_bench.md
(DIR: --out, else $OUT, else the working directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

import torch

from atom_server import LLM
from atom_server.bench import PRESETS, measure_throughput, preset_checkpoint
from atom_server.engine.speculative import synthetic_rates_for_length

PRESET = "deepseek-v2-lite-mtp"


def default_lengths(k: int) -> list[float]:
    return [] if k == 0 else sorted({k + 1, k, 1}, reverse=True)


def parse_lengths(text: str | None, ks: list[int]) -> dict[int, list[float]]:
    out = {k: default_lengths(k) for k in ks}
    for part in filter(None, (text or "").split(";")):
        k, values = part.split(":")
        out[int(k)] = [float(v) for v in values.split(",")]
    for k, values in out.items():
        if k and any(not 1 <= v <= k + 1 for v in values):
            raise SystemExit(f"--lengths: L must be in [1, {k + 1}] for K = {k}, got {values}")
    return out


def set_acceptance_length(llm: LLM, k: int, length: float) -> None:
    """The forced acceptance of the live engine (benchmarks only: the runner reads the rates at every verify)."""
    engine = llm.llm_engine
    spec = dataclasses.replace(engine.runner.speculative, synthetic_acceptance_rates=synthetic_rates_for_length(k, length))
    engine.runner.speculative = spec
    engine.core.speculative = spec


def table(rows: list[dict]) -> str:
    base = {r["batch_size"]: r["output_tok_s"] for r in rows if r["k"] == 0 and not r["eager"]}
    head = ("| K | L (forced) | path | batch | out tok/s | vs K=0 | ms/token | mean accepted length | verify replays "
            "| MTP draft replays | decode replays | eager steps |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        steps = r.get("steps", {})
        ref = base.get(r["batch_size"])
        speed = f"{r['output_tok_s'] / ref:.2f}x" if ref else "-"
        mal = r.get("mean_acceptance_length")
        lines.append(
            f"| {r['k']} | {r['length'] if r['k'] else '-'} | {'eager' if r['eager'] else 'graphs'} | "
            f"{r['batch_size']} | {r['output_tok_s']:,.1f} | {speed} | "
            f"{(r['ms_per_step'] or 0):.2f} | {f'{mal:.2f}' if mal else '-'} | "
            f"{steps.get('graph_replays.verify', 0)} | {steps.get('graph_replays.mtp_drafts', 0)} | "
            f"{steps.get('graph_replays.decode', 0)} | {steps.get('eager_steps', 0)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="0,3,1,2")
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--eager-ks", default="3")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=450)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=2 << 30)
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    ap.add_argument("--model", default=PRESET, help="a preset (random weights) or a checkpoint with an MTP layer")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ns = ap.parse_args()
    started = time.perf_counter()
    ks = [int(k) for k in ns.ks.split(",") if k != ""]
    eager_ks = [int(k) for k in ns.eager_ks.split(",") if k != ""]
    lengths = parse_lengths(ns.lengths, sorted(set(ks + eager_ks)))
    sizes = [int(b) for b in ns.batch_sizes.split(",")]
    os.makedirs(ns.out, exist_ok=True)
    preset = ns.model in PRESETS
    checkpoint = preset_checkpoint(ns.model) if preset else ns.model
    report = dict(model=ns.model, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv), torch=torch.__version__,
                  engines=[], runs=[], skipped=[])

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        with open(os.path.join(ns.out, "spec_mtp_bench.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(ns.out, "spec_mtp_bench.md"), "w") as f:
            f.write(table(report["runs"]) + "\n")

    last_init_s = per_length_s = None  # what the next engine is expected to take: a start-up, one run per L
    engine_bytes = 0  # device memory the last engine held once built
    for eager, k in [(False, k) for k in ks] + [(True, k) for k in eager_ks]:
        values = lengths[k] if k else [None]
        if eager:  # the extremes only: all accepted and none
            values = [v for v in values if v in (k + 1, 1)] or values
        left = ns.budget_s - (time.perf_counter() - started)
        need = None if last_init_s is None else last_init_s + len(values) * per_length_s
        if need is not None and left < need:
            report["skipped"].append(dict(k=k, eager=eager, reason=f"{left:.0f} s of the budget left, about "
                                                                     f"{need:.0f} s needed"))
            print(f"skipped K={k}{' eager' if eager else ''}: out of budget ({left:.0f} s left)", flush=True)
            save()
            continue
        if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] < 1.2 * engine_bytes:
            free = torch.cuda.mem_get_info()[0]
            report["skipped"].append(dict(k=k, eager=eager, reason=f"{free / 2**30:.1f} GiB free, the last engine "
                                                                     f"held {engine_bytes / 2**30:.1f} GiB"))
            print(f"skipped K={k}{' eager' if eager else ''}: the last engine's memory was not given back", flush=True)
            save()
            continue
        t0 = time.perf_counter()
        spec = None if k == 0 else {"method": "mtp", "num_speculative_tokens": k, "rejection_sample_method": "synthetic",
                                    "synthetic_acceptance_length": values[0]}
        extra = {"device": ns.device} if ns.device else {}
        llm = LLM(checkpoint, load_format="dummy" if preset else "auto", seed=0, dtype=ns.dtype,
                  max_model_len=ns.input_len + ns.output_len, max_num_seqs=max(sizes), enable_prefix_caching=False,
                  skip_tokenizer_init=True, kv_cache_memory_bytes=ns.kv_cache_memory_bytes, enforce_eager=eager,
                  speculative_config=spec, served_model_name=ns.model, **extra)
        init_s = last_init_s = time.perf_counter() - t0
        if torch.cuda.is_available():
            engine_bytes = torch.cuda.memory_allocated()
        graphs = llm.llm_engine.runner.graphs
        report["engines"].append(dict(k=k, eager=eager, init_s=init_s,
                                      decode_sizes=list(graphs.sizes) if graphs is not None else [],
                                      verify_sizes=list(graphs.verify_sizes) if graphs is not None else []))
        print(f"K={k}{' eager' if eager else ''}: engine ready in {init_s:.1f} s", flush=True)
        t1 = time.perf_counter()
        for length in values:
            if length is not None:
                set_acceptance_length(llm, k, length)
            for row in measure_throughput(llm, ns.input_len, ns.output_len, sizes, repeats=ns.repeats, quiet=True,
                                          init_s=init_s):
                row.update(k=k, length=length, eager=eager)
                report["runs"].append(row)
                print(f"K={k} L={length} {'eager' if eager else 'graphs'} batch={row['batch_size']}: "
                      f"{row['output_tok_s']:,.1f} tok/s, mean accepted length {row.get('mean_acceptance_length')}, "
                      f"steps {row['steps']}", flush=True)
                save()
        per_length_s = (time.perf_counter() - t1) / len(values)
        llm.llm_engine.shutdown()
        del llm, graphs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            print(f"K={k}: {time.perf_counter() - t0:.0f} s in all; {torch.cuda.memory_allocated() / 2**30:.1f} GiB "
                  "still allocated", flush=True)
    save()
    print(table(report["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
