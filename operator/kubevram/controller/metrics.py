"""The operator's Prometheus metrics: ``kubevram operator --metrics-port PORT`` serves them at ``/metrics``.

Names follow Prometheus' conventions (``kubevram_`` prefix, base units, ``_bytes``, ``_seconds``,
``_total`` on counters); labels are bounded: nodes, GPU indices and products, LLMDeployments, the
ledger's three states, reconcile outcomes, HTTP statuses. :data:`SERIES` lists every series with its
help and labels; the Grafana dashboard (``kubevram.controller.dashboard``) names them from it.

Two kinds of figures:

* events, counted where they happen: reconciles by outcome and their latency (``reconciling``, around
  ``Reconciler.plan_and_apply``), the planner's latency (``planning``), API errors by status (the
  adapter's ``api_error``);
* the state, computed at scrape time by :class:`StateCollector` from what the reconcile path last saw
  (:data:`STATE`: the deployments' statuses and worker pods, the other pods holding GPUs), the node
  watch's cache and the placement ledger, through :func:`kubevram.planner.usage.cluster_usage` (the
  planner's inventory: the maths ``kubevram plan`` and ``kubevram top`` use).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubevram.controller.ledger import LEDGER, Key, Ledger
from kubevram.controller.nodes import NODES
from kubevram.planner.inventory import Reservation
from kubevram.planner.usage import ClusterUsage, DeploymentState, cluster_usage


@dataclass(frozen=True)
class Series:
    """One metric family as exposed: ``name`` with its suffix (``_total`` for counters)."""

    name: str
    kind: str  # gauge | counter | histogram
    help: str
    labels: tuple[str, ...] = ()

    def sample_names(self) -> tuple[str, ...]:
        """The names its samples carry in the exposition format."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


GPU = ("node", "gpu", "product")
NODE = ("node", "product")
DEPLOYMENT = ("namespace", "deployment")

GPU_CAPACITY = Series(
    "kubevram_gpu_memory_capacity_bytes",
    "gauge",
    "GPU memory of the device, as GPU Feature Discovery labels it.",
    GPU,
)
GPU_RESERVED = Series(
    "kubevram_gpu_memory_reserved_bytes",
    "gauge",
    "GPU memory kubevram's plans reserve on the device (an exclusive replica: all of it).",
    GPU,
)
GPU_USED = Series(
    "kubevram_gpu_memory_used_bytes",
    "gauge",
    "GPU memory the torch allocators of the kubevram workers placed on the device hold, as they "
    "report it (status.workers); absent until one reports.",
    GPU,
)
GPU_FREE = Series(
    "kubevram_gpu_memory_free_bytes",
    "gauge",
    "GPU memory a new plan could still take on the device (0 when held whole).",
    GPU,
)
NODE_OTHER = Series(
    "kubevram_node_gpu_memory_other_pods_bytes",
    "gauge",
    "GPU memory of the devices other pods request on the node (which devices, only the device plugin knows).",
    NODE,
)
NODE_FREE = Series(
    "kubevram_node_gpu_memory_free_bytes",
    "gauge",
    "GPU memory a new plan could still take on the node, less what other pods request.",
    NODE,
)
DEPLOYMENT_ESTIMATE = Series(
    "kubevram_deployment_estimate_bytes",
    "gauge",
    "The estimate of one replica by part (weights, kv_cache, activations, overhead_per_gpu, total).",
    (*DEPLOYMENT, "part"),
)
REPLICAS_DESIRED = Series("kubevram_deployment_replicas_desired", "gauge", "spec.replicas.", DEPLOYMENT)
REPLICAS_PLACED = Series(
    "kubevram_deployment_replicas_placed", "gauge", "Replicas the plan placed on nodes and GPUs.", DEPLOYMENT
)
REPLICAS_READY = Series("kubevram_deployment_replicas_ready", "gauge", "Replicas serving.", DEPLOYMENT)
REPLICAS_PENDING = Series(
    "kubevram_deployment_replicas_pending",
    "gauge",
    "Replicas no node can hold now, by the Scheduled condition's reason and the GPU node "
    "class the autoscaling signal asks for.",
    (*DEPLOYMENT, "reason", "gpu_class"),
)
DEPLOYMENT_RESERVED = Series(
    "kubevram_deployment_reserved_bytes",
    "gauge",
    "GPU memory the deployment's replicas reserve, all GPUs together.",
    DEPLOYMENT,
)
DEPLOYMENT_USED = Series(
    "kubevram_deployment_used_bytes",
    "gauge",
    "GPU memory its workers' torch allocators hold now, as they report it.",
    DEPLOYMENT,
)
DEPLOYMENT_PEAK = Series(
    "kubevram_deployment_measured_peak_bytes",
    "gauge",
    "The largest allocator peak one of its workers reported, its GPUs together.",
    DEPLOYMENT,
)
DEPLOYMENT_ERROR = Series(
    "kubevram_deployment_estimate_error_ratio",
    "gauge",
    "(estimate - measured) / measured allocator peak at the largest prefill measured "
    "(status.calibration); positive: the estimate is above.",
    DEPLOYMENT,
)
LEDGER_DEPLOYMENTS = Series(
    "kubevram_ledger_deployments", "gauge", "LLMDeployments in the placement ledger, by state.", ("state",)
)
LEDGER_RESERVATIONS = Series(
    "kubevram_ledger_reservations",
    "gauge",
    "Reservations (one per placed replica) in the placement ledger, by state.",
    ("state",),
)
RECONCILES_SERIES = Series(
    "kubevram_reconciles_total",
    "counter",
    "Reconciliations of LLMDeployments by outcome (planned, pending, invalid, retry, error).",
    ("outcome",),
)
RECONCILE_SECONDS_SERIES = Series(
    "kubevram_reconcile_duration_seconds",
    "histogram",
    "Duration of one reconciliation: read, plan, apply, report.",
)
PLANNING_SECONDS_SERIES = Series(
    "kubevram_planning_duration_seconds",
    "histogram",
    "Duration of the planner's part of a reconciliation (inside the ledger's lock).",
)
API_ERRORS_SERIES = Series(
    "kubevram_api_errors_total",
    "counter",
    "Kubernetes API requests of the operator answered with an error it did not expect, by HTTP status.",
    ("status",),
)

SERIES: tuple[Series, ...] = (
    GPU_CAPACITY,
    GPU_RESERVED,
    GPU_USED,
    GPU_FREE,
    NODE_OTHER,
    NODE_FREE,
    DEPLOYMENT_ESTIMATE,
    REPLICAS_DESIRED,
    REPLICAS_PLACED,
    REPLICAS_READY,
    REPLICAS_PENDING,
    DEPLOYMENT_RESERVED,
    DEPLOYMENT_USED,
    DEPLOYMENT_PEAK,
    DEPLOYMENT_ERROR,
    LEDGER_DEPLOYMENTS,
    LEDGER_RESERVATIONS,
    RECONCILES_SERIES,
    RECONCILE_SECONDS_SERIES,
    PLANNING_SECONDS_SERIES,
    API_ERRORS_SERIES,
)

OUTCOMES = ("planned", "pending", "invalid", "retry", "error")
PLANNING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# ----------------------------------------------------------------------------------- what was seen


class State:
    """What the reconcile path last saw that the API does not keep in one place: per LLMDeployment its
    status and worker pods, and the other pods holding GPUs (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deployments: dict[Key, DeploymentState] = {}
        self._other_pods: list[Mapping[str, Any]] = []

    def observe_deployment(
        self, key: Key, desired: int, status: Mapping[str, Any], pods: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        with self._lock:
            self._deployments[key] = DeploymentState(key[0], key[1], desired, dict(status), tuple(pods))

    def observe_other_pods(self, pods: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            self._other_pods = list(pods)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._deployments.pop(key, None)

    def reset(self) -> None:
        with self._lock:
            self._deployments.clear()
            self._other_pods = []

    def view(self) -> tuple[list[DeploymentState], list[Mapping[str, Any]]]:
        with self._lock:
            return list(self._deployments.values()), list(self._other_pods)


#: The operator process's view, fed by ``kubevram.controller.reconcile``.
STATE = State()


# ------------------------------------------------------------------------------------- the state


def _gauge(series: Series) -> GaugeMetricFamily:
    return GaugeMetricFamily(series.name, series.help, labels=series.labels)


def usage_families(usage: ClusterUsage, ledger_stats: Mapping[str, Any]) -> list[Metric]:
    """The state's metric families from a ``ClusterUsage`` and ``Ledger.stats()``."""
    families = {s.name: _gauge(s) for s in SERIES if s.kind == "gauge"}

    def add(series: Series, labels: Sequence[str], value: float | None) -> None:
        if value is not None:
            families[series.name].add_metric(list(labels), value)

    for node in usage.nodes:
        add(NODE_OTHER, (node.name, node.product), node.other_pods_bytes)
        add(NODE_FREE, (node.name, node.product), node.free_bytes)
        for gpu in node.gpus:
            labels = (node.name, str(gpu.index), gpu.product)
            add(GPU_CAPACITY, labels, gpu.capacity_bytes)
            add(GPU_RESERVED, labels, gpu.reserved_bytes)
            add(GPU_FREE, labels, gpu.free_bytes)
            add(GPU_USED, labels, gpu.used_bytes)
    for d in usage.deployments:
        key = (d.namespace, d.name)
        for part, nbytes in d.estimate.items():
            add(DEPLOYMENT_ESTIMATE, (*key, part), nbytes)
        add(REPLICAS_DESIRED, key, d.desired)
        add(REPLICAS_PLACED, key, d.placed)
        add(REPLICAS_READY, key, d.ready)
        add(REPLICAS_PENDING, (*key, d.pending_reason, d.gpu_class), d.pending)
        add(DEPLOYMENT_RESERVED, key, d.reserved_bytes)
        add(DEPLOYMENT_USED, key, d.used_bytes)
        add(DEPLOYMENT_PEAK, key, d.measured_peak_bytes)
        add(DEPLOYMENT_ERROR, key, d.estimate_error_ratio)
    for state, counts in sorted(ledger_stats.items()):
        add(LEDGER_DEPLOYMENTS, (state,), counts["deployments"])
        add(LEDGER_RESERVATIONS, (state,), counts["reservations"])
    return list(families.values())


class StateCollector(Collector):
    """Computes the state's families at scrape time from its sources."""

    def __init__(
        self,
        state: State,
        ledger: Ledger,
        nodes: Callable[[], Sequence[Mapping[str, Any]]],
    ) -> None:
        self.state = state
        self.ledger = ledger
        self.nodes = nodes

    def usage(self) -> ClusterUsage:
        deployments, other_pods = self.state.view()
        reservations: Iterable[Reservation] = self.ledger.snapshot()
        return cluster_usage(self.nodes(), other_pods, reservations, deployments)

    def collect(self) -> Iterable[Metric]:
        return usage_families(self.usage(), self.ledger.stats())

    def describe(self) -> Iterable[Metric]:
        return [_gauge(s) for s in SERIES if s.kind == "gauge"]


# ------------------------------------------------------------------------------------ the events

REGISTRY = CollectorRegistry()
RECONCILES = Counter(
    RECONCILES_SERIES.name, RECONCILES_SERIES.help, RECONCILES_SERIES.labels, registry=REGISTRY
)
RECONCILE_SECONDS = Histogram(RECONCILE_SECONDS_SERIES.name, RECONCILE_SECONDS_SERIES.help, registry=REGISTRY)
PLANNING_SECONDS = Histogram(
    PLANNING_SECONDS_SERIES.name, PLANNING_SECONDS_SERIES.help, buckets=PLANNING_BUCKETS, registry=REGISTRY
)
API_ERRORS = Counter(
    API_ERRORS_SERIES.name, API_ERRORS_SERIES.help, API_ERRORS_SERIES.labels, registry=REGISTRY
)
for _outcome in OUTCOMES:  # every outcome from the start, at 0 (rate() sees the first one)
    RECONCILES.labels(_outcome)
REGISTRY.register(StateCollector(STATE, LEDGER, NODES.all))
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...


@contextlib.contextmanager
def reconciling(outcome_of: Callable[[BaseException | None], str]) -> Iterator[None]:
    """Time one reconciliation and count it under ``outcome_of(the exception it raised, or None)``."""
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        RECONCILES.labels(outcome_of(exc)).inc()
        raise
    else:
        RECONCILES.labels(outcome_of(None)).inc()
    finally:
        RECONCILE_SECONDS.observe(time.perf_counter() - started)


def planning() -> Any:
    """Time the planner's part of a reconciliation (a context manager)."""
    return PLANNING_SECONDS.time()


def api_error(status: int) -> None:
    """An API request answered ``status`` (not 2xx)."""
    API_ERRORS.labels(str(status)).inc()


def serve(port: int, host: str = "0.0.0.0") -> Callable[[], None]:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns what stops it."""
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


def reset() -> None:
    """Operator start: forget what an earlier run in this process saw (counters keep counting)."""
    STATE.reset()


__all__ = [
    "OUTCOMES",
    "REGISTRY",
    "SERIES",
    "STATE",
    "Series",
    "State",
    "StateCollector",
    "api_error",
    "planning",
    "reconciling",
    "reset",
    "serve",
    "usage_families",
]
