"""Prometheus metrics of the server, with vLLM's names under the ``aphrodite:`` prefix.

Engine gauges and token counters are read at scrape time from the snapshot the engine thread
publishes after each step, so serving adds no per-step work for them. Latency histograms are
observed on the event loop as outputs reach the handlers.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from aphrodite.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)

__all__ = ["ServerMetrics", "RequestTimer", "log_stats_periodically"]

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    """Reads the engine's latest stats snapshot when Prometheus scrapes."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> Metric:
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats
        yield self._gauge("aphrodite:num_requests_running", "Sequences in the running batch.", s.num_running)
        yield self._gauge("aphrodite:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield self._gauge("aphrodite:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).",
                          s.kv_cache_usage)
        yield self._gauge("aphrodite:num_kv_cache_blocks", "KV cache blocks in total.", s.num_blocks)
        yield self._gauge("aphrodite:num_kv_cache_blocks_free", "KV cache blocks not held by any request.",
                          s.num_free_blocks)
        yield self._counter("aphrodite:prompt_tokens", "Prompt tokens processed.", s.num_prompt_tokens)
        yield self._counter("aphrodite:generation_tokens", "Tokens generated.", s.num_generation_tokens)
        yield self._counter("aphrodite:num_preemptions", "Sequences preempted for lack of KV cache.",
                            s.num_preemptions)


class ServerMetrics:
    """One registry per app, so several servers (or tests) in a process do not collide."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.ttft = Histogram("aphrodite:time_to_first_token_seconds", "Time to the first generated token.",
                              labels, buckets=_TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.tpot = Histogram("aphrodite:time_per_output_token_seconds", "Time per generated token after the "
                              "first.", labels, buckets=_TPOT_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("aphrodite:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                             labels, buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)
        self._success = Counter("aphrodite:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name

    def count_finished(self, reason: str | None) -> None:
        self._success.labels(self._model_name, reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one engine request, fed each cumulative output."""

    __slots__ = ("metrics", "arrival", "last", "tokens", "done")

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.last: float | None = None
        self.tokens = 0
        self.done = False

    def observe(self, num_tokens: int, finished: bool, finish_reason: str | None = None) -> None:
        now = time.monotonic()
        new = num_tokens - self.tokens
        if new > 0:
            if self.last is None:
                self.metrics.ttft.observe(now - self.arrival)
            else:
                self.metrics.tpot.observe((now - self.last) / new)
            self.last = now
            self.tokens = num_tokens
        if finished and not self.done:
            self.done = True
            self.metrics.e2e.observe(now - self.arrival)
            self.metrics.count_finished(finish_reason)


async def log_stats_periodically(engine: AsyncLLMEngine, interval: float = 10.0) -> None:
    """Log throughput and cache usage every ``interval`` seconds while the engine is busy."""
    last = engine.stats
    last_t = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        s, now = engine.stats, time.monotonic()
        busy = s.num_running or s.num_waiting or s != last
        if busy:
            dt = max(now - last_t, 1e-9)
            logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                        "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%",
                        (s.num_prompt_tokens - last.num_prompt_tokens) / dt,
                        (s.num_generation_tokens - last.num_generation_tokens) / dt,
                        s.num_running, s.num_waiting, 100 * s.kv_cache_usage)
        last, last_t = s, now
