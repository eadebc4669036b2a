"""Soak test of `atom serve` (a benchmark, not a CI test): mixed requests at high concurrency, with client
disconnects and invalid bodies mixed in; reports 5xx counts, leaked KV blocks and memory before/after.

    PYTHONPATH=packages/atom-core/src:packages/atom-server/src python tools/soak_server.py \
        [--model PATH] [--requests 1000] [--concurrency 64] [--disconnect-rate 0.1] [--invalid-rate 0.1]

Without --model it writes the tests' tiny llama checkpoint (packages/atom-server/tests/tiny_checkpoint.py)
to a temporary folder. Traffic goes to 127.0.0.1 only; the run is bounded by --requests and --timeout.
Exit status 1 when a valid request got a 5xx, a block leaked or the engine did not survive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "packages", "atom-server", "tests")
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
WORDS = "the quick brown fox jumps over a lazy dog while paged attention stores keys and values".split()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(folder: str) -> str:
    sys.path.insert(0, TESTS)
    from tiny_checkpoint import write_tiny_llama

    path = write_tiny_llama(folder, max_position_embeddings=1024)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    return path


# ---- request mix ----------------------------------------------------------------------------------------
def valid_request(rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    common = {"max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0.0, 0.7, 1.0]),
              "stream": rng.random() < 0.5, "n": rng.choice([1, 1, 1, 2, 3])}
    if rng.random() < 0.3:
        common["stop"] = [rng.choice(WORDS)[:2], "."]
    if rng.random() < 0.3:
        common["seed"] = rng.randint(-(1 << 63), (1 << 63) - 1)
    if rng.random() < 0.2:
        common["ignore_eos"] = True
    if common["stream"] and rng.random() < 0.5:
        common["stream_options"] = {"include_usage": True}  # the final usage chunk (reasoning tokens counted there)
    if rng.random() < 0.5:
        body = {"prompt": prompt if rng.random() < 0.8 else [prompt, prompt[::-1]], **common}
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
            body["echo"] = rng.random() < 0.5
        return "/v1/completions", body
    if rng.random() < 0.3:  # the Responses API (no n)
        body = {"input": prompt if rng.random() < 0.7 else [{"role": "user", "content": prompt}],
                "max_output_tokens": common["max_tokens"], "temperature": common["temperature"],
                "stream": common["stream"], "instructions": rng.choice([None, "Be brief."])}
        return "/v1/responses", {k: v for k, v in body.items() if v is not None}
    body = {"messages": [{"role": "user", "content": prompt}], **common}
    if rng.random() < 0.2:
        body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
    return "/v1/chat/completions", body


def invalid_request(rng: random.Random) -> tuple[str, object]:
    choices = [
        ("/v1/completions", b'{"prompt": "x",'),  # malformed JSON
        ("/v1/completions", {"prompt": 5}),
        ("/v1/completions", {"prompt": "x", "max_tokens": -3}),
        ("/v1/completions", {"prompt": "x", "top_k": 1 << 63}),
        ("/v1/completions", {"prompt": "x", "seed": 1 << 64}),
        ("/v1/completions", {"prompt": [1 << 64]}),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [-(1 << 63) - 1]}),
        ("/v1/completions", {"prompt": "x", "n": 1000}),
        ("/v1/completions", {"prompt": ["x"] * 1000}),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}),
        ("/v1/completions", {"prompt": "x", "logprobs": 10000}),
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1/0 }}"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "chat_template": "{% for i in range(99999) %}{% for j in range(99999) %}"
                                                   "{% endfor %}{% endfor %}"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 9}),
        ("/detokenize", {"tokens": [10 ** 12]}),
        ("/v1/responses", {"input": []}),
        ("/v1/responses", {"input": "x", "previous_response_id": "resp_1"}),
        ("/v1/responses", {"input": [{"type": "input_image"}]}),
        ("/v1/responses", {"input": "x", "max_output_tokens": 10 ** 9}),
        ("/v1/responses", {"input": "x", "tools": [{"type": "web_search"}]}),
    ]
    return rng.choice(choices)


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def add(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1


async def one(c: httpx.AsyncClient, url: str, rng: random.Random, args, tally: Tally) -> None:
    roll = rng.random()
    t = time.monotonic()
    if roll < args.invalid_rate:
        path, body = invalid_request(rng)
        kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        r = await c.post(url + path, timeout=args.timeout, **kw)
        tally.add(f"invalid {r.status_code // 100}xx")
        if r.status_code >= 500:
            tally.failures.append(f"invalid body -> {r.status_code}: {r.text[:200]}")
        return
    path, body = valid_request(rng, args.max_tokens)
    disconnect = roll < args.invalid_rate + args.disconnect_rate
    try:
        if body["stream"]:
            async with c.stream("POST", url + path, json=body, timeout=args.timeout) as r:
                lines = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        if disconnect and len(lines) >= 2:
                            tally.add("disconnected (stream)")
                            return
                status = r.status_code
                ended = bool(lines) and (lines[-1] == "data: [DONE]" if path != "/v1/responses" else
                                         '"response.completed"' in lines[-1] or '"response.incomplete"' in lines[-1])
                if status == 200 and (not ended or any('"error"' in x for x in lines if '"error": null' not in x)):
                    tally.failures.append(f"stream without its end or with an error event: {lines[-2:]}")
        else:
            r = await c.post(url + path, json=body, timeout=(0.05 + rng.random() * 0.3) if disconnect else args.timeout)
            status = r.status_code
            if status >= 500:
                tally.failures.append(f"valid body -> {status}: {r.text[:200]}")
    except httpx.TimeoutException:
        if disconnect:
            tally.add("disconnected (plain)")
            return
        raise
    tally.add(f"valid {status // 100}xx {path}")
    if status >= 500:
        tally.failures.append(f"valid body -> {status}")
    tally.latencies.append(time.monotonic() - t)


async def soak(url: str, args) -> Tally:
    rng = random.Random(args.seed)
    tally = Tally()
    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency)

    async with httpx.AsyncClient(limits=limits) as c:
        async def guarded(i: int) -> None:
            async with sem:
                try:
                    await one(c, url, random.Random(rng.random()), args, tally)
                except Exception as e:  # a transport error on a request we did not mean to drop
                    tally.add("client error")
                    tally.failures.append(f"request {i}: {type(e).__name__}: {e}")

        await asyncio.gather(*(guarded(i) for i in range(args.requests)))
    return tally


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the tests' tiny llama)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--disconnect-rate", type=float, default=0.1)
    ap.add_argument("--invalid-rate", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the summary JSON here")
    ap.add_argument("serve_args", nargs="*", help="extra `atom serve` flags (after --), e.g. "
                    "-- --trust-request-chat-template (then the invalid mix's templates are rendered and refused)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="atom-soak-")
    model = args.model or tiny_checkpoint(tmp)
    port = free_port()
    log = open(os.path.join(tmp, "server.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "atom_server", "serve", model, "--host", "127.0.0.1",
                             "--port", str(port), "--uvicorn-log-level", "warning",
                             *args.serve_args],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                print(open(log.name).read()[-3000:])
                return 1
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        for _ in range(4):  # warm-up, so "before" is a serving process
            httpx.post(url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 8}, timeout=120)
        engine_pid = httpx.get(url + "/debug/stats", timeout=10).json()["engine_pid"]
        before = {"api_mb": rss_mb(proc.pid), "engine_mb": rss_mb(engine_pid)}
        cpu_before = {"api": cpu_s(proc.pid), "engine": cpu_s(engine_pid)}
        start = time.monotonic()
        tally = asyncio.run(soak(url, args))
        elapsed = time.monotonic() - start

        def idle():
            s = httpx.get(url + "/debug/stats", timeout=10).json()
            st = s["stats"]
            return (s.get("active_requests", 0) == 0 and st["num_running"] == 0 and st["num_waiting"] == 0), s

        for _ in range(100):
            done, stats = idle()
            if done:
                break
            time.sleep(0.2)
        after = {"api_mb": rss_mb(proc.pid), "engine_mb": rss_mb(engine_pid)}
        cpu = {k: round(cpu_s(pid) - cpu_before[k], 1) for k, pid in (("api", proc.pid), ("engine", engine_pid))}
        st = stats["stats"]
        leaked = int(st["num_total_blocks"] - st["num_free_blocks"])
        alive = httpx.get(url + "/health", timeout=10).status_code == 200 and stats["engine_pid"] == engine_pid
        metrics = httpx.get(url + "/metrics", timeout=10).text
        errors_5xx = sum(float(line.split()[-1]) for line in metrics.splitlines()
                         if line.startswith('atom:request_errors_total{status="5'))
        lat = sorted(tally.latencies)
        summary = {
            "requests": args.requests, "concurrency": args.concurrency, "elapsed_s": round(elapsed, 1),
            "counts": dict(sorted(tally.counts.items())),
            "valid_5xx": sum(1 for f in tally.failures if f.startswith("valid")),
            "server_5xx_metric": errors_5xx, "failures": tally.failures[:10],
            "leaked_blocks": leaked, "engine_alive_same_pid": alive,
            "latency_s": {"p50": round(statistics.median(lat), 3) if lat else None,
                          "p99": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None},
            "cpu_s": cpu,
            "rss_before_mb": {k: round(v, 1) for k, v in before.items()},
            "rss_after_mb": {k: round(v, 1) for k, v in after.items()},
            "engine_stats": st,
        }
        print(json.dumps(summary, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1)
        ok = not tally.failures and leaked == 0 and alive and errors_5xx == 0
        return 0 if ok else 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
