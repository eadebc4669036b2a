"""`atom bench throughput|serve`: the offline throughput benchmark and the online serving benchmark.

Hook into `atom` with `bench_cli.add_parser(subparsers)`; runs on its own as
`python -m atom_server.bench_cli throughput ...` / `python -m atom_server.bench_cli serve ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

from atom_server.config import EngineArgs, HelpFormatter

# Flags whose EngineArgs default suits serving but not a benchmark of random prompts.
_BENCH_DEFAULTS = dict(enable_prefix_caching=False, max_num_seqs=None)
# Set by the benchmark itself, never from the command line.
_NOT_FORWARDED = {"model", "load_format", "seed", "tokenizer", "skip_tokenizer_init"}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_throughput_parser(subparsers) -> argparse.ArgumentParser:
    from atom_server.bench import PRESETS

    p = subparsers.add_parser(
        "throughput", help="offline throughput on random prompts (greedy, EOS ignored)",
        formatter_class=HelpFormatter,
        description="Offline throughput: random prompts of --input-len tokens, --output-len new tokens each, "
                    "greedy, EOS ignored; per batch size a full and a prefill-only warm-up run, then the median "
                    "of --num-iters. "
                    f"--model takes a checkpoint or a preset shape ({', '.join(sorted(PRESETS))}) that runs "
                    "with random weights (default: the bundled SmolLM2-135M-Instruct).")
    EngineArgs.add_cli_args(p)
    p.set_defaults(**_BENCH_DEFAULTS)
    for action in p._actions:  # what the benchmark's own defaults mean
        if action.dest == "max_num_seqs":
            action.help = "most sequences in one batch (default: the largest of --batch-sizes)"
        elif action.dest == "enable_prefix_caching":
            action.help = "reuse the KV cache of shared prompt prefixes (default: off: random prompts share none)"
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="new tokens per request")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 32, 128], help="comma-separated (default: 1,32,128)")
    p.add_argument("--num-iters", type=int, default=3, help="timed runs per batch size (the median is reported)")
    p.add_argument("--warmup-runs", type=int, default=1,
                   help="untimed full + prefill-only runs per batch size before the timed ones")
    p.add_argument("--output-json", type=str, default=None, help="write the results here (default: print only)")
    p.set_defaults(func=run_throughput_cmd, bench_parser=p)  # errors name `throughput`, however it was reached
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`bench` with its subcommands `throughput` and `serve`."""
    from atom_server import bench_serve

    p = subparsers.add_parser("bench", help="benchmarks: offline throughput, online serving",
                              description="Benchmarks of ATOM (and of any OpenAI-compatible server).")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True
    add_throughput_parser(sub)
    bench_serve.add_parser(sub)
    return p


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("atom-core", "atom-server", "torch", "triton", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def _write_json(path: str, report: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def throughput_report(ns: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark; with --output-json, rewrites the file after every batch size."""
    from atom_server.bench import run_throughput

    names = {f.name for f in dataclasses.fields(EngineArgs)} - _NOT_FORWARDED
    engine = {n: getattr(ns, n) for n in sorted(names) if getattr(ns, n, None) is not None}
    started = time.time()
    report = dict(engine="atom", model=ns.model, device=_device_name(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  versions=_versions(), command=" ".join(sys.argv),
                  args=dict(input_len=ns.input_len, output_len=ns.output_len, batch_sizes=ns.batch_sizes,
                            load_format=ns.load_format, seed=ns.seed, num_iters=ns.num_iters,
                            warmup_runs=ns.warmup_runs, **engine),
                  runs=[])

    from atom_server import startup

    def on_row(rows: list[dict[str, Any]]) -> None:
        report.update(runs=list(rows), wall_s=time.time() - started, startup=startup.profile_report())
        if ns.output_json:
            _write_json(ns.output_json, report)

    run_throughput(ns.model, input_len=ns.input_len, output_len=ns.output_len, batch_sizes=ns.batch_sizes,
                   load_format=ns.load_format, seed=ns.seed, repeats=ns.num_iters, warmup_runs=ns.warmup_runs,
                   on_row=on_row, progress=True,
                   **engine)
    return report


def run_throughput_cmd(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from atom_server.bench import PRESETS

    parser = getattr(ns, "bench_parser", parser)
    if ns.model is None:
        from atom_server.default_model import DefaultModelMissing, resolve_model_path

        try:
            ns.model = resolve_model_path()
        except DefaultModelMissing as e:
            parser.error(f"{e}; or give --model (a checkpoint or one of {', '.join(sorted(PRESETS))})")
    if ns.model not in PRESETS and not os.path.exists(ns.model):
        parser.error(f"model {ns.model!r} is neither a path nor a preset ({', '.join(sorted(PRESETS))})")
    if ns.num_iters < 1 or ns.input_len < 1 or ns.output_len < 1:
        parser.error("--input-len, --output-len and --num-iters must be >= 1")
    if ns.warmup_runs < 0:
        parser.error("--warmup-runs must be >= 0")
    if ns.model in PRESETS:
        ns.load_format = "dummy"  # a preset is a config-only checkpoint: random weights
    import logging

    from atom_server.engine.executor import ExecutorFatalError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"atom bench throughput: {ns.model} (loading the model; start-up phases are logged)", flush=True)
    try:
        throughput_report(ns)
        from atom_server import startup

        if startup.profiling():  # the compiles of the warm-ups too (the first requests of each batch size)
            print(startup.format_profile(), flush=True)
    except ExecutorFatalError as e:  # a tensor-parallel worker died: say which, no traceback of rank 0
        print(f"atom bench throughput: {e}", file=sys.stderr)
        return 1
    if ns.output_json:
        print(f"wrote {ns.output_json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atom bench", description="ATOM benchmarks")
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True
    add_throughput_parser(sub)
    from atom_server import bench_serve

    bench_serve.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    return ns.func(ns, parser)


if __name__ == "__main__":
    sys.exit(main())
