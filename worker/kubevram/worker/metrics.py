"""Prometheus metrics of one worker, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kubevram.worker.engine import EngineHooks

__all__ = ["CONTENT_TYPE_LATEST", "WorkerMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics(EngineHooks):
    """Requests, tokens, queue depth and latency; also the engine's hooks (called on its thread)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kubevram_worker_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("kubevram_worker_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter(
            "kubevram_worker_generation_tokens", "Tokens generated (sampled), all requests.", registry=r
        )
        self.finished = Counter(
            "kubevram_worker_sequences_finished",
            "Sequences that left the engine, by reason (stop, length, cancelled, error).",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "kubevram_worker_queue_depth", "Requests waiting for the engine.", registry=r
        )
        self.running = Gauge("kubevram_worker_running_requests", "Requests in the running batch.", registry=r)
        self.ready = Gauge(
            "kubevram_worker_ready", "1 once the model is loaded, while its engine runs.", registry=r
        )
        self.oom = Gauge(
            "kubevram_worker_oom_total", "Out-of-memory errors survived by the engine.", registry=r
        )
        self.batch_size = Histogram(
            "kubevram_worker_batch_size",
            "Requests per prefilled batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.latency = Histogram(
            "kubevram_worker_request_latency_seconds",
            "Time from arrival to the last token, by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "kubevram_worker_time_to_first_token_seconds",
            "Time from arrival to the first text.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def bind(self, engine: Any) -> None:
        """Read queue depth, running batch, OOM count and whether it runs from ``engine`` at scrape time."""
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.running.set_function(lambda: engine.running)
        self.oom.set_function(lambda: engine.oom_count)
        self.ready.set_function(lambda: float(engine.failure is None))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # EngineHooks
    def on_prefill(self, batch_size: int, prompt_tokens: int) -> None:
        self.batch_size.observe(batch_size)
        self.prompt_tokens.inc(prompt_tokens)

    def on_tokens(self, count: int) -> None:
        self.generation_tokens.inc(count)

    def on_finished(self, reason: str) -> None:
        self.finished.labels(reason=reason).inc()
