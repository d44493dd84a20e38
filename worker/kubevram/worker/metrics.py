"""Prometheus metrics of one worker, in a registry of its own (several apps can live in one process).

Besides kubevram's own series, the gauges an Inference Gateway's endpoint picker reads from a model
server (the Gateway API Inference Extension's model server protocol), with vLLM's names and labels
(``model_name``, ``engine``), so that the default configuration picks kubevram workers as it picks vLLM
(:class:`GatewayCollector`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from kubevram.worker.engine import Engine, EngineHooks

__all__ = ["CONTENT_TYPE_LATEST", "GatewayCollector", "WorkerMetrics"]

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

    def bind(self, engine: Any, model_name: str = "") -> None:
        """Read queue depth, running batch, OOM count, whether it runs and the gateway's gauges
        (:class:`GatewayCollector`, labelled ``model_name``) from ``engine`` at scrape time."""
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.running.set_function(lambda: engine.running)
        self.oom.set_function(lambda: engine.oom_count)
        self.ready.set_function(lambda: float(engine.failure is None))
        self.registry.register(GatewayCollector(engine, model_name))

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


class GatewayCollector(Collector):
    """vLLM's gauges with the meanings an Inference Gateway's endpoint picker expects, read from the
    engine at scrape time:

    - ``vllm:num_requests_waiting``: requests waiting for the engine (queued, or parked while it sleeps);
    - ``vllm:num_requests_running``: requests in the running batch or being prefilled;
    - ``vllm:kv_cache_usage_perc``: the share (0-1) of the planned KV cache budget that the running
      batch's cache holds (:attr:`Engine.kv_cache_usage`);
    - ``vllm:cache_config_info``: an info gauge (value 1) whose labels describe that cache as vLLM's
      ``CacheConfig`` does: ``block_size`` 1 (the cache grows a position at a time), ``num_gpu_blocks``
      the positions the budget holds, ``kv_cache_memory_bytes`` the budget, ``cache_dtype``,
      ``enable_prefix_caching`` False (each request is prefilled afresh). Absent until the loop has
      measured the cache.
    """

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.labels = {"model_name": model_name, "engine": "0"}

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def collect(self) -> Iterator[Any]:
        engine = self.engine
        yield self._gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", engine.queue_depth
        )
        yield self._gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            engine.requests_running,
        )
        yield self._gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage: the share of the planned KV cache budget in use. 1 means 100 percent usage.",
            engine.kv_cache_usage,
        )
        budget, per_position = engine.kv_cache_budget_bytes, engine.kv_bytes_per_position
        if budget is None or not per_position:
            return
        info = {
            "block_size": "1",
            "cache_dtype": engine.kv_cache_dtype or "auto",
            "enable_prefix_caching": "False",
            "engine": self.labels["engine"],
            "kv_cache_memory_bytes": str(budget),
            "num_gpu_blocks": str(budget // per_position),
        }
        family = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the engine's KV cache.", labels=list(info)
        )
        family.add_metric(list(info.values()), 1)
        yield family
