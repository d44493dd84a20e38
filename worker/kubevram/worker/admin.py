"""The admin routes: ``POST /v1/admin/release`` and ``GET /v1/admin/stats``, behind a bearer token.

Both need ``Authorization: Bearer $KUBEVRAM_ADMIN_TOKEN`` (compared in constant time with
``hmac.compare_digest``); anything else is answered 401 in OpenAI's error format. A worker without a
token refuses every admin request. :func:`install_admin` mounts them on the main app or on an app of
their own (:func:`create_admin_app`), which ``kubevram worker --admin-port`` serves on a port the
Service does not expose. :class:`MemoryCollector` exports the same figures to Prometheus.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from kubevram.worker.engine import EngineError
from kubevram.worker.memory import MemoryMonitor, process_rss

TOKEN_ENV = "KUBEVRAM_ADMIN_TOKEN"


class AdminAuthError(Exception):
    """A request to an admin route without the right bearer token."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _error(status: int, message: str, type_: str, code: str | None = None, **headers: str) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def bearer_auth(token: str | None) -> Any:
    """A FastAPI dependency that lets through only ``Authorization: Bearer <token>``."""
    expected = (token or "").encode("utf-8")

    async def check(request: Request) -> None:
        if not expected:
            raise AdminAuthError(f"admin routes are disabled: {TOKEN_ENV} is not set on this worker")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            raise AdminAuthError(f"missing or wrong bearer token (Authorization: Bearer ${TOKEN_ENV})")

    return check


def admin_router(monitor: MemoryMonitor, token: str | None) -> APIRouter:
    """The two admin routes over ``monitor``, each behind :func:`bearer_auth`."""
    router = APIRouter(prefix="/v1/admin", dependencies=[Depends(bearer_auth(token))])

    @router.post("/release")
    async def release() -> dict[str, Any]:
        """Free cached memory between two engine steps; the figures before and after."""
        return await monitor.release("request")

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        """Allocator, NVML and process figures; the last release; the prefill samples."""
        return monitor.stats()

    return router


def install_admin(app: FastAPI, monitor: MemoryMonitor, token: str | None) -> FastAPI:
    """Mount the admin routes on ``app`` with their error handlers (401, and 503 while loading)."""

    async def on_auth(request: Request, exc: AdminAuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"}
        return _error(401, exc.message, "authentication_error", "invalid_api_key", **headers)

    async def on_engine(request: Request, exc: EngineError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        return _error(exc.status, exc.message, exc.type, exc.code, **headers)

    app.add_exception_handler(AdminAuthError, on_auth)  # type: ignore[arg-type]
    if EngineError not in app.exception_handlers:
        app.add_exception_handler(EngineError, on_engine)  # type: ignore[arg-type]
    app.include_router(admin_router(monitor, token))
    return app


def create_admin_app(monitor: MemoryMonitor, token: str | None) -> FastAPI:
    """An app with only the admin routes (and ``/healthz``), for a port kept out of the Service."""
    app = FastAPI(title="kubevram worker admin", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return install_admin(app, monitor, token)


# ------------------------------------------------------------------------------------ Prometheus

_DEVICE_GAUGES = {
    "allocatedBytes": ("kubevram_worker_gpu_allocated_bytes", "Bytes the torch allocator has handed out."),
    "reservedBytes": ("kubevram_worker_gpu_reserved_bytes", "Bytes the torch allocator holds from CUDA."),
    "peakAllocatedBytes": ("kubevram_worker_gpu_peak_allocated_bytes", "Peak allocated bytes since start."),
    "peakReservedBytes": ("kubevram_worker_gpu_peak_reserved_bytes", "Peak reserved bytes since start."),
    "activeBytes": ("kubevram_worker_gpu_active_bytes", "Bytes in active allocator blocks."),
    "fragmentationBytes": (
        "kubevram_worker_gpu_fragmentation_bytes",
        "Inactive split bytes: free space inside cached segments that cannot be returned.",
    ),
    "allocRetries": ("kubevram_worker_gpu_alloc_retries", "Allocations retried after freeing the cache."),
    "ooms": ("kubevram_worker_gpu_ooms", "Out-of-memory errors the allocator raised."),
    "totalBytes": ("kubevram_worker_gpu_total_bytes", "Device memory (NVML)."),
    "usedBytes": ("kubevram_worker_gpu_used_bytes", "Device memory used by every process (NVML)."),
    "freeBytes": ("kubevram_worker_gpu_free_bytes", "Device memory free (NVML)."),
    "budgetBytes": ("kubevram_worker_gpu_budget_bytes", "Bytes the plan gives this GPU (maxMemory)."),
}


class MemoryCollector(Collector):
    """The monitor's figures at scrape time: per-device gauges, process RSS, releases."""

    def __init__(self, monitor: MemoryMonitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only (the figures need a loaded model)

    def collect(self) -> Iterator[Any]:
        devices = self.monitor.device_stats()
        for key, (name, doc) in _DEVICE_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["device"])
            for stats in devices:
                if stats.get(key) is not None:
                    family.add_metric([str(stats["index"])], float(stats[key]))
            yield family
        yield GaugeMetricFamily(
            "kubevram_worker_process_rss_bytes", "Resident set size of the worker.", value=process_rss()
        )
        last = self.monitor.last_release or {}
        yield GaugeMetricFamily(
            "kubevram_worker_release_freed_bytes",
            "GPU cache bytes the last release returned.",
            value=float(last.get("freedBytes") or 0),
        )
        releases = CounterMetricFamily(
            "kubevram_worker_releases",
            "Memory releases, by reason (request, idle, watermark).",
            labels=["reason"],
        )
        for reason, count in sorted(self.monitor.releases.items()):
            releases.add_metric([reason], float(count))
        yield releases


def register_metrics(registry: CollectorRegistry, monitor: MemoryMonitor) -> MemoryCollector:
    collector = MemoryCollector(monitor)
    registry.register(collector)
    return collector
