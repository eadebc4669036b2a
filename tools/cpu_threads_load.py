"""Latency of `atom serve` on CPU under load, with the engine's threads as before and as now.

Starts the server (default: the bundled SmolLM2) once per setting, then, with and without a busy loop
occupying one core, sends greedy chat requests one after another and prints the median and range of
their latency. Settings:
  before: torch's default thread count (every logical CPU), not pinned (what `atom serve` did);
  after:  the default plan (physical cores minus one for the API server, pinned; cpu_threads.py).

    python tools/cpu_threads_load.py [--model PATH] [--requests 5] [--tokens 8,32]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

PROMPT = "What is the capital of Germany? Answer in one word."
SETTINGS = {
    "before": {"args": ["--cpu-threads", str(os.cpu_count() or 1)], "env": {"ATOM_CPU_NO_PIN": "1"}},
    "after": {"args": [], "env": {}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: list[str], setting: dict, log_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(setting["env"])
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "atom_server", "serve", *model, *setting["args"], "--host",
                             "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(open(log_path).read())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(open(log_path).read())


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def latencies(url: str, max_tokens: int, n: int) -> list[float]:
    name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
            "model": name, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": PROMPT}]})
        r.raise_for_status()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--requests", type=int, default=5, help="requests per measurement")
    ap.add_argument("--tokens", default="8,32", help="answer lengths (comma-separated)")
    ap.add_argument("--settings", default="before,after")
    ns = ap.parse_args()
    model = [ns.model] if ns.model else []
    lengths = [int(x) for x in ns.tokens.split(",")]
    print(f"{os.cpu_count()} logical CPUs; load average before start: {os.getloadavg()}")
    for name in ns.settings.split(","):
        proc, url = start(model, SETTINGS[name], f"/tmp/cpu_threads_{name}.log")
        try:
            with open(f"/tmp/cpu_threads_{name}.log") as f:
                plan = next((line.strip() for line in f if "CPU engine:" in line), "?")
            print(f"\n== {name}: {plan}")
            latencies(url, 4, 1)  # warm-up
            for loaded in (False, True):
                hog = busy_loop() if loaded else None
                try:
                    for tokens in lengths:
                        xs = latencies(url, tokens, ns.requests)
                        print(f"{name:6s} busy-loop={'yes' if loaded else 'no ':3s} {tokens:3d} tokens: "
                              f"median {statistics.median(xs):6.2f} s, min {min(xs):6.2f}, max {max(xs):6.2f} "
                              f"(n={len(xs)}, load avg {os.getloadavg()[0]:.1f})", flush=True)
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)


if __name__ == "__main__":
    main()
