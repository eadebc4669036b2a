"""Prometheus metrics of the API server: request outcomes, token counters, latency histograms, and the
engine's own gauges/counters as last reported in its heartbeat.

Each series is exported twice: under ATOM's `atom:` names (no labels), and under vLLM's `vllm:` names
with vLLM's labels (`model_name` = the first served name, `engine` = "0") and the same meaning, so
dashboards and alerts written for vLLM (its Grafana dashboard) work unchanged. vLLM series ATOM has
no counterpart for (speculative decoding, KV connectors, LoRA, ...) are not exported."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


PREFIX = "atom:"
VLLM_PREFIX = "vllm:"
VLLM_LABELS = ("model_name", "engine")
disable_created_metrics()  # the *_created series only add noise to the exposition
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))  # 1, 2, 5, 10, ... 500000 (as vLLM)


class _Both:
    """One metric under both names: the `atom:` one and the `vllm:` one (bound to vLLM's labels)."""

    def __init__(self, atom, vllm):
        self.atom, self.vllm = atom, vllm

    def inc(self, amount: float = 1.0) -> None:
        self.atom.inc(amount)
        self.vllm.inc(amount)

    def observe(self, value: float) -> None:
        self.atom.observe(value)
        self.vllm.observe(value)

    def labels(self, **labels) -> _Both:
        return _Both(self.atom.labels(**labels), self.vllm.labels(**labels))


class _EngineStatsCollector:
    """Exposes the latest engine heartbeat; engine counters are cumulative there already."""

    def __init__(self, model_name: str) -> None:
        self.stats: dict[str, float] = {}
        self.model_name = model_name

    def _families(self, kind, name: str, doc: str, value: float):
        atom = kind(PREFIX + name, doc)
        atom.add_metric([], value)
        vllm = kind(VLLM_PREFIX + name, doc, labels=VLLM_LABELS)
        vllm.add_metric([self.model_name, "0"], value)
        return atom, vllm

    def collect(self):
        s = self.stats
        gauges = {
            "num_requests_running": ("num_running", "Requests being decoded or prefilled by the engine"),
            "num_requests_waiting": ("num_waiting", "Requests queued in the engine"),
            "kv_cache_usage_perc": ("kv_cache_usage", "Fraction of KV-cache blocks in use (0..1)"),
        }
        for name, (key, doc) in gauges.items():
            yield from self._families(GaugeMetricFamily, name, doc, float(s.get(key, 0.0)))
        for name, key, doc in (("kv_cache_free_blocks", "num_free_blocks", "KV-cache blocks free"),
                               ("kv_cache_total_blocks", "num_total_blocks", "KV-cache blocks in total")):
            g = GaugeMetricFamily(PREFIX + name, doc)
            g.add_metric([], float(s.get(key, 0.0)))
            yield g
        queries, hits = float(s.get("prefix_cache_queries", 0.0)), float(s.get("prefix_cache_hits", 0.0))
        rate = GaugeMetricFamily(PREFIX + "prefix_cache_hit_rate", "Prefix-cache hits / queries (tokens)")
        rate.add_metric([], hits / queries if queries else 0.0)
        yield rate
        for name, key, doc in (
            ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
            ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache"),
            ("num_preemptions", "num_preemptions", "Sequences preempted by the scheduler"),
        ):
            yield from self._families(CounterMetricFamily, name, doc, float(s.get(key, 0.0)))


class _Partial:
    """A labelled vLLM metric with vLLM's labels filled in; the caller adds its own (finished_reason)."""

    def __init__(self, metric, model_name: str):
        self.metric, self.model_name = metric, model_name

    def labels(self, **labels):
        return self.metric.labels(model_name=self.model_name, engine="0", **labels)


class RequestTracker:
    """Latency and token accounting of one request, fed as its tokens arrive from the engine."""

    def __init__(self, metrics: Metrics, num_prompt_tokens: int):
        self.m = metrics
        self.arrival = time.monotonic()
        self.num_prompt_tokens = num_prompt_tokens
        self.num_generated = 0  # tokens over all of the request's sequences
        self.num_token_steps = 0  # engine steps that brought tokens
        self.first_token_at: float | None = None
        self.last: float | None = None
        self.done = False
        metrics.prompt_tokens.inc(num_prompt_tokens)

    def on_tokens(self, num_new: int, now: float | None = None) -> None:
        """num_new tokens (over all of the request's sequences) came with one engine step."""
        now = time.monotonic() if now is None else now
        self.m.generation_tokens.inc(num_new)
        if self.last is None:
            self.m.ttft.observe(now - self.arrival)
            self.first_token_at = now
        else:
            self.m.itl.observe(now - self.last)
        self.last = now
        self.num_generated += num_new
        self.num_token_steps += 1

    def on_finish(self, reason: str | None) -> None:
        if not self.done:
            self.done = True
            self.m.finished.labels(finished_reason=reason or "unknown").inc()
            now = time.monotonic()
            self.m.e2e.observe(now - self.arrival)
            self.m.request_prompt_tokens.observe(self.num_prompt_tokens)
            self.m.request_generation_tokens.observe(self.num_generated)
            if self.first_token_at is not None and self.num_token_steps > 1:
                self.m.time_per_output_token.observe((now - self.first_token_at) / (self.num_token_steps - 1))

    def on_abort(self) -> None:
        """The client left (or the server cut the request short at shutdown): an abort, not an error."""
        if not self.done:
            self.done = True
            self.m.finished.labels(finished_reason="abort").inc()

    def on_error(self) -> None:
        self.done = True


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r = self.registry

        def both(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kw) -> _Both:
            atom = kind(PREFIX + name, doc, list(labels), registry=r, **kw)
            vllm = kind(VLLM_PREFIX + name, doc, [*VLLM_LABELS, *labels], registry=r, **kw)
            bound = vllm.labels(model_name=model_name, engine="0") if not labels else _Partial(vllm, model_name)
            return _Both(atom, bound)

        self.finished = both(Counter, "request_success", "Finished requests by finish reason", ("finished_reason",))
        self.errors = Counter(PREFIX + "request_errors", "Requests answered with an error, by HTTP status",
                              ["status"], registry=r)
        self.prompt_tokens = both(Counter, "prompt_tokens", "Prompt tokens sent to the engine")
        self.generation_tokens = both(Counter, "generation_tokens", "Tokens generated")
        self.ttft = both(Histogram, "time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS)
        self.itl = both(Histogram, "inter_token_latency_seconds", "Time between generated tokens",
                        buckets=_LATENCY_BUCKETS)
        self.e2e = both(Histogram, "e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS)
        self.time_per_output_token = both(Histogram, "request_time_per_output_token_seconds",
                                          "Per request: (last token - first token) / (output tokens - 1)",
                                          buckets=_LATENCY_BUCKETS)
        self.request_prompt_tokens = both(Histogram, "request_prompt_tokens", "Prompt tokens per request",
                                          buckets=_TOKEN_BUCKETS)
        self.request_generation_tokens = both(Histogram, "request_generation_tokens",
                                              "Generated tokens per request (all n choices)", buckets=_TOKEN_BUCKETS)
        self._engine = _EngineStatsCollector(model_name)
        r.register(self._engine)

    def track_request(self, num_prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens)

    def update_engine_stats(self, stats: dict[str, float]) -> None:
        self._engine.stats = dict(stats)

    def count_error(self, status: int) -> None:
        self.errors.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
