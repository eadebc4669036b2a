"""Prometheus metrics of the API server: request outcomes, token counters, latency histograms, and the
engine's own gauges/counters as last reported in its heartbeat."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


PREFIX = "atom:"
disable_created_metrics()  # the *_created series only add noise to the exposition
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineStatsCollector:
    """Exposes the latest engine heartbeat; engine counters are cumulative there already."""

    def __init__(self) -> None:
        self.stats: dict[str, float] = {}

    def collect(self):
        s = self.stats
        gauges = {
            "num_requests_running": ("num_running", "Requests being decoded or prefilled by the engine"),
            "num_requests_waiting": ("num_waiting", "Requests queued in the engine"),
            "kv_cache_usage_perc": ("kv_cache_usage", "Fraction of KV-cache blocks in use (0..1)"),
            "kv_cache_free_blocks": ("num_free_blocks", "KV-cache blocks free"),
            "kv_cache_total_blocks": ("num_total_blocks", "KV-cache blocks in total"),
        }
        for name, (key, doc) in gauges.items():
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
            c = CounterMetricFamily(PREFIX + name, doc)
            c.add_metric([], float(s.get(key, 0.0)))
            yield c


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
            self.m.e2e.observe(time.monotonic() - self.arrival)

    def on_abort(self) -> None:
        """The client left (or the server cut the request short at shutdown): an abort, not an error."""
        if not self.done:
            self.done = True
            self.m.finished.labels(finished_reason="abort").inc()

    def on_error(self) -> None:
        self.done = True


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.finished = Counter(PREFIX + "request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=r)
        self.errors = Counter(PREFIX + "request_errors", "Requests answered with an error, by HTTP status",
                              ["status"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens sent to the engine", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between generated tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self._engine = _EngineStatsCollector()
        r.register(self._engine)

    def track_request(self, num_prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens)

    def update_engine_stats(self, stats: dict[str, float]) -> None:
        self._engine.stats = dict(stats)

    def count_error(self, status: int) -> None:
        self.errors.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
