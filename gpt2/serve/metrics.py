"""`GET /metrics`: the server's Prometheus metrics, in the text format, through prometheus_client.

Names follow vLLM's where it has one (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`,
...), so dashboards and alerts written for vLLM read this server too; the rest are `gpt2:`. Every
series carries `model_name`. Latencies are measured where the client's bytes leave from: when a
token's output reaches the HTTP process's event loop.

The per-token observations (time to first token, inter-token latency) are on the streaming hot path,
where prometheus_client's Histogram.observe (~2 us with its lock) would cost ~10% of the event loop
at 45K tokens/s; so they are counted in plain bucket arrays (one bisect, ~0.3 us; everything runs
on the event loop's thread) and handed to the library as histogram families when scraped. The
engine's gauges and counters (running and waiting sequences, KV slots in use, steps, step
durations, tokens generated) are read from its stats at scrape time, and the HTTP answers by route
and status are counted in a dict. Each Service has its own CollectorRegistry: nothing is
registered process-wide.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gpt2.inference.engine import STEP_BUCKETS_S

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


class Buckets:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum of observations."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds, self.counts, self.sum = tuple(bounds), [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


def histogram(name: str, doc: str, model: str, bounds: Sequence[float], counts: list[int], total: float) -> Metric:
    """A histogram family from per-bucket counts (Prometheus wants cumulative ones)."""
    family = HistogramMetricFamily(name, doc, labels=["model_name"])
    cumulative, buckets = 0, []
    for bound, count in zip((*bounds, float("inf")), counts):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
    family.add_metric([model], buckets, sum_value=total)
    return family


class ServingMetrics:
    """What the HTTP side counts (one instance per Service) and the collector that exposes it."""

    def __init__(self, model_id: str, engine_stats: Callable[[], dict], healthy: Callable[[], bool]) -> None:
        self.model, self.engine_stats, self.healthy = model_id, engine_stats, healthy
        self.registry = CollectorRegistry()
        self.http: dict[tuple[str, int], int] = defaultdict(int)  # answers by (route, status code)
        self.ttft = Buckets(TTFT_BUCKETS_S)
        self.itl = Buckets(ITL_BUCKETS_S)
        self.e2e = Buckets(E2E_BUCKETS_S)
        self.prompt = 0  # prompt tokens of every sequence submitted
        self.finishes = dict.fromkeys(FINISH_REASONS, 0)
        self.registry.register(_Collector(self))

    # --- the event loop's observations ---------------------------------------------------------------

    def answered(self, route: str, status: int) -> None:
        self.http[route, status] += 1

    def prompt_tokens(self, n: int) -> None:
        self.prompt += n

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, reason: str, n: int = 1) -> None:
        self.finishes[reason if reason in self.finishes else "error"] += n

    def request_done(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, m: ServingMetrics) -> None:
        self.m = m

    def collect(self) -> Iterable[Metric]:
        m, model = self.m, [self.m.model]
        yield from self._engine(model)
        http = CounterMetricFamily(
            "gpt2:http_requests", "HTTP answers by route and status code", labels=["model_name", "route", "code"]
        )
        for (route, status), n in sorted(m.http.items()):
            http.add_metric([m.model, route, str(status)], n)
        yield http
        done = CounterMetricFamily(
            "vllm:request_success", "Finished sequences by finish reason", labels=["model_name", "finished_reason"]
        )
        for reason, n in m.finishes.items():
            done.add_metric([m.model, reason], n)
        yield done
        prompt = CounterMetricFamily("vllm:prompt_tokens", "Prompt tokens prefilled", labels=["model_name"])
        prompt.add_metric(model, m.prompt)
        yield prompt
        for name, doc, b in (
            ("vllm:time_to_first_token_seconds", "Time from request arrival to its first token", m.ttft),
            ("vllm:inter_token_latency_seconds", "Time between a sequence's successive tokens", m.itl),
            ("vllm:e2e_request_latency_seconds", "Time from request arrival to its end", m.e2e),
        ):
            yield histogram(name, doc, m.model, b.bounds, b.counts, b.sum)

    def _engine(self, model: list[str]) -> Iterable[Metric]:
        """The engine's state as of its latest report (none while it starts)."""
        up = GaugeMetricFamily("gpt2:engine_healthy", "1 while /health answers 200", labels=["model_name"])
        up.add_metric(model, 1.0 if self.m.healthy() else 0.0)
        yield up
        stats = self.m.engine_stats()
        if not stats:
            return
        gauges = (
            ("vllm:num_requests_running", "Sequences holding a KV-cache slot", stats["running"]),
            ("vllm:num_requests_waiting", "Sequences waiting for a slot", stats["waiting"]),
            ("gpt2:kv_slots_used", "KV-cache slots in use", stats["running"]),
            ("gpt2:kv_slots", "KV-cache slots (--max-batch)", stats["slots"]),
            ("vllm:kv_cache_usage_perc", "Fraction of KV-cache slots in use", stats["running"] / stats["slots"]),
        )
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(model, value)
            yield g
        for name, doc, value in (
            ("vllm:generation_tokens", "Tokens generated and delivered", stats["tokens"]),
            ("gpt2:engine_steps", "Decode steps launched", stats["steps"]),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(model, value)
            yield c
        yield histogram(
            "gpt2:engine_step_seconds",
            "Duration of one engine step boundary (admit, prefill, launch a decode step, deliver)",
            model[0],
            STEP_BUCKETS_S,
            stats["step_counts"],
            stats["engine_busy_s"],
        )
