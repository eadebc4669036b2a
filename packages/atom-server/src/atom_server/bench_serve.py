"""`atom bench serve`: online benchmark of any OpenAI-compatible completions server (ATOM's, vLLM's, ...).

Flags follow `vllm bench serve`. Prompts are random token ids (exactly --random-input-len of them, sent
as a token-id prompt, so no tokenizer round trip changes their length); requests arrive as a Poisson
process of --request-rate per second (a gamma process with --burstiness != 1; inf: all at once), at most
--max-concurrency in flight, and stream their completions ($OPENAI_API_KEY, when set, is sent as the
key). Per request: TTFT (time to the first chunk with a choice), ITL (time between chunks), TPOT
((E2E - TTFT) / (output tokens - 1)) and E2E latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    start: float = 0.0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="online benchmark of an OpenAI-compatible server",
        description="Online benchmark of an OpenAI-compatible completions server (flags as vllm bench serve).")
    p.add_argument("--backend", type=str, default="openai", choices=["openai", "vllm"],
                   help="request format: both mean the OpenAI completions API with streaming")
    p.add_argument("--base-url", type=str, default=None, help="e.g. http://127.0.0.1:8000 (overrides --host/--port)")
    p.add_argument("--host", type=str, default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", type=str, default="/v1/completions")
    p.add_argument("--model", type=str, default=None, help="model name in requests (default: the first of /v1/models)")
    p.add_argument("--served-model-name", type=str, default=None, help="overrides --model in the requests")
    p.add_argument("--tokenizer", type=str, default=None,
                   help="tokenizer folder, for the vocabulary size of random prompts (default: --model when it is a folder)")
    p.add_argument("--vocab-size", type=int, default=None, help="draw random token ids below this (no tokenizer needed)")
    p.add_argument("--dataset-name", type=str, default="random", choices=["random"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from [len*(1-r), len*(1+r)]")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second, or inf")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival process (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentile-metrics", type=str, default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", type=str, default="99")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--request-timeout", type=float, default=6 * 3600.0, help="seconds per request")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", type=str, default=None)
    p.add_argument("--result-filename", type=str, default=None)
    p.set_defaults(func=run_cmd)
    return p


def api_url(ns: argparse.Namespace) -> str:
    base = (ns.base_url or f"http://{ns.host}:{ns.port}").rstrip("/")
    return base + ns.endpoint


def random_prompts(n: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
                   seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max new tokens) per request."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.randint(lo, hi)

    return [([rng.randrange(vocab) for _ in range(length(input_len))], length(output_len)) for _ in range(n)]


def resolve_vocab(ns: argparse.Namespace) -> int:
    if ns.vocab_size:
        return ns.vocab_size
    source = ns.tokenizer or (ns.model if ns.model and os.path.isdir(ns.model) else None)
    if source is None:
        raise SystemExit("atom bench serve: give --vocab-size, --tokenizer, or a local --model folder "
                         "(random prompts need the vocabulary size)")
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(source))


async def fetch_model_name(session, ns: argparse.Namespace) -> str:
    base = (ns.base_url or f"http://{ns.host}:{ns.port}").rstrip("/")
    async with session.get(base + "/v1/models") as r:
        r.raise_for_status()
        return (await r.json())["data"][0]["id"]


async def send_request(session, url: str, model: str, prompt: list[int], max_tokens: int,
                       ns: argparse.Namespace) -> RequestResult:
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": ns.temperature,
               "stream": True, "stream_options": {"include_usage": True}}
    if ns.ignore_eos:
        payload["ignore_eos"] = True
    out = RequestResult(prompt_len=len(prompt))
    chunks = 0
    start = last = time.perf_counter()
    out.start = start
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return out
            async for raw in resp.content:  # one SSE line at a time
                line = raw.decode("utf-8").strip()
                if not line or line.startswith(":") or not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    out.error = json.dumps(msg["error"])[:300]
                    return out
                now = time.perf_counter()
                if msg.get("choices"):
                    if chunks == 0:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                    chunks += 1
                elif msg.get("usage"):
                    out.output_tokens = int(msg["usage"].get("completion_tokens") or 0)
                    out.prompt_len = int(msg["usage"].get("prompt_tokens") or out.prompt_len)
        out.latency = last - start if chunks else time.perf_counter() - start
        out.output_tokens = out.output_tokens or chunks  # a server without usage: one token per chunk
        out.success = chunks > 0
        if not out.success:
            out.error = "the stream held no completion chunk"
    except Exception as e:  # a failed request is counted, not fatal, as in vllm bench serve
        out.error = f"{type(e).__name__}: {e}"
    return out


async def arrivals(n: int, rate: float, burstiness: float, seed: int):
    """Yields request indices at Poisson (gamma) arrival times."""
    rng = random.Random(seed + 1)
    for i in range(n):
        yield i
        if rate == float("inf") or i == n - 1:
            continue
        await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


def _pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(xs, q)) if xs else 0.0


def summarize(results: list[RequestResult], duration: float, percentiles: list[float],
              metrics: list[str]) -> dict[str, Any]:
    import numpy as np

    ok = [r for r in results if r.success]
    total_out = sum(r.output_tokens for r in ok)
    total_in = sum(r.prompt_len for r in ok)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    s: dict[str, Any] = dict(
        duration=duration, completed=len(ok), failed=len(results) - len(ok),
        total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=len(ok) / duration, output_throughput=total_out / duration,
        total_token_throughput=(total_in + total_out) / duration,
        max_concurrent_requests=_max_in_flight(ok))
    for m in metrics:
        xs = [x * 1e3 for x in series[m]]
        s[f"mean_{m}_ms"] = float(np.mean(xs)) if xs else 0.0
        s[f"median_{m}_ms"] = float(np.median(xs)) if xs else 0.0
        s[f"std_{m}_ms"] = float(np.std(xs)) if xs else 0.0
        for q in percentiles:
            s[f"p{q:g}_{m}_ms"] = _pct(xs, q)
    s["input_lens"] = [r.prompt_len for r in results]
    s["output_lens"] = [r.output_tokens for r in results]
    s["ttfts"] = [r.ttft for r in results]
    s["errors"] = [r.error for r in results]
    return s


def _max_in_flight(results: list[RequestResult]) -> int:
    events = sorted([(r.start, 1) for r in results] + [(r.start + r.latency, -1) for r in results])
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def format_report(s: dict[str, Any], percentiles: list[float], metrics: list[str]) -> str:
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(name: str, value: Any, fmt: str = ".2f") -> None:
        lines.append(f"{name:<40}{value:>10{fmt}}")

    row("Successful requests:", s["completed"], "")
    row("Failed requests:", s["failed"], "")
    row("Maximum request concurrency:", str(s.get("max_concurrency")), "")
    row("Benchmark duration (s):", s["duration"])
    row("Total input tokens:", s["total_input_tokens"], "")
    row("Total generated tokens:", s["total_output_tokens"], "")
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for m in metrics:
        lines.append("{s:{c}^{n}}".format(s=METRIC_NAMES[m], n=w, c="-"))
        row(f"Mean {m.upper()} (ms):", s[f"mean_{m}_ms"])
        row(f"Median {m.upper()} (ms):", s[f"median_{m}_ms"])
        for q in percentiles:
            row(f"P{q:g} {m.upper()} (ms):", s[f"p{q:g}_{m}_ms"])
    lines.append("=" * w)
    return "\n".join(lines)


async def benchmark(ns: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    url = api_url(ns)
    if not ns.endpoint.rstrip("/").endswith("completions") or "chat" in ns.endpoint:
        raise SystemExit(f"atom bench serve: --endpoint must be a completions endpoint, got {ns.endpoint!r}")
    metrics = [m.strip() for m in ns.percentile_metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise SystemExit(f"atom bench serve: unknown --percentile-metrics {bad}; choose from {list(METRICS)}")
    percentiles = [float(q) for q in ns.metric_percentiles.split(",") if q.strip()]
    vocab = resolve_vocab(ns)
    work = random_prompts(ns.num_prompts, ns.random_input_len, ns.random_output_len, ns.random_range_ratio,
                          vocab, ns.seed)
    timeout = aiohttp.ClientTimeout(total=ns.request_timeout)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, force_close=False)
    key = os.environ.get("OPENAI_API_KEY")  # as vllm bench serve: sent as a bearer token when set
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers,
                                     trust_env=False) as session:
        model = ns.served_model_name or ns.model or await fetch_model_name(session, ns)
        test = await send_request(session, url, model, work[0][0], min(work[0][1], 4), ns)
        if not test.success:
            raise SystemExit(f"atom bench serve: the test request to {url} failed: {test.error}")
        sem = asyncio.Semaphore(ns.max_concurrency) if ns.max_concurrency else None
        bar = None
        if not ns.disable_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(work), desc="requests", file=sys.stderr)

        async def one(i: int) -> RequestResult:
            prompt, max_tokens = work[i]
            if sem is None:
                r = await send_request(session, url, model, prompt, max_tokens, ns)
            else:
                async with sem:
                    r = await send_request(session, url, model, prompt, max_tokens, ns)
            if bar is not None:
                bar.update(1)
            return r

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(i)) async for i in arrivals(len(work), ns.request_rate, ns.burstiness,
                                                                       ns.seed)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
    summary = summarize(list(results), duration, percentiles, metrics)
    summary.update(date=time.strftime("%Y%m%d-%H%M%S"), backend=ns.backend, endpoint=ns.endpoint, base_url=url,
                   model_id=model, num_prompts=ns.num_prompts, request_rate=ns.request_rate,
                   burstiness=ns.burstiness, max_concurrency=ns.max_concurrency,
                   random_input_len=ns.random_input_len, random_output_len=ns.random_output_len,
                   ignore_eos=ns.ignore_eos, seed=ns.seed)
    summary["_report"] = format_report(summary, percentiles, metrics)
    return summary


def result_path(ns: argparse.Namespace, s: dict[str, Any]) -> str:
    name = ns.result_filename
    if not name:
        rate = "inf" if ns.request_rate == float("inf") else f"{ns.request_rate:g}"
        conc = f"-concurrency{ns.max_concurrency}" if ns.max_concurrency else ""
        name = f"{ns.backend}-{rate}qps{conc}-{str(s['model_id']).split('/')[-1]}-{s['date']}.json"
    return os.path.join(ns.result_dir, name) if ns.result_dir else name


def run_cmd(ns: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    if ns.num_prompts < 1 or ns.random_input_len < 1 or ns.random_output_len < 1:
        raise SystemExit("atom bench serve: --num-prompts, --random-input-len and --random-output-len must be >= 1")
    if ns.request_rate <= 0 or ns.burstiness <= 0:
        raise SystemExit("atom bench serve: --request-rate and --burstiness must be > 0")
    summary = asyncio.run(benchmark(ns))
    print(summary.pop("_report"))
    if ns.save_result:
        path = result_path(ns, summary)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {path}")
    return 1 if summary["completed"] == 0 else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atom bench")
    add_parser(parser.add_subparsers(dest="bench_command"))
    ns = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return ns.func(ns, parser)


if __name__ == "__main__":
    sys.exit(main())
