"""The admin routes, behind a bearer token: ``POST /v1/admin/release``, ``GET /v1/admin/stats`` and
sleep and wake, ``POST /v1/admin/sleep?level=1|2``, ``POST /v1/admin/wake_up``,
``GET /v1/admin/is_sleeping``, also served at vLLM's paths (``POST /sleep``, ``POST /wake_up``,
``GET /is_sleeping``) for the tools written for vLLM's sleep mode.

All need ``Authorization: Bearer $KUBEVRAM_ADMIN_TOKEN`` (compared in constant time with
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


def _level(value: str) -> int:
    if value not in ("1", "2"):
        raise EngineError(400, f"level: {value!r} must be 1 or 2", param="level")
    return int(value)


def admin_router(monitor: MemoryMonitor, token: str | None, prefix: str = "/v1/admin") -> APIRouter:
    """The admin routes over ``monitor``, each behind :func:`bearer_auth`; with ``prefix=""`` only
    sleep and wake, at vLLM's paths."""
    router = APIRouter(prefix=prefix, dependencies=[Depends(bearer_auth(token))])

    if prefix:

        @router.post("/release")
        async def release() -> dict[str, Any]:
            """Free cached memory between two engine steps; the figures before and after."""
            return await monitor.release("request")

        @router.get("/stats")
        async def stats() -> dict[str, Any]:
            """Allocator, NVML and process figures; the last release and sleep; the prefill samples; on
            the leader of a multi-node replica, every rank's weights and KV cache peak (``group.ranks``)."""
            out = monitor.stats()
            engine = monitor.engine
            if engine is not None and engine.group is not None and engine.group.rank == 0 and engine.alive:
                out["group"] = {"ranks": await engine.group_stats()}
            return out

    @router.post("/sleep")
    async def sleep(level: str = "1") -> dict[str, Any]:
        """Sleep at ``level`` once the admitted requests have finished; the figures."""
        return await monitor.sleep(_level(level), "request")

    @router.post("/wake_up")
    async def wake_up() -> dict[str, Any]:
        """Wake up (weights back, or reloaded after level 2); the figures."""
        return await monitor.wake("request")

    @router.get("/is_sleeping")
    async def is_sleeping() -> dict[str, Any]:
        """``is_sleeping`` as vLLM answers it, and the level."""
        engine = monitor.engine
        level = engine.sleep_level if engine is not None else 0
        return {"is_sleeping": level > 0, "level": level}

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
    app.include_router(admin_router(monitor, token, prefix=""))
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
        yield from self._sleep()

    def _sleep(self) -> Iterator[Any]:
        """Sleep level, the last sleep's and wake's figures, sleeps and wakes by reason."""
        sleeper = self.monitor.sleeper
        if sleeper is None:
            return
        yield GaugeMetricFamily(
            "kubevram_worker_sleep_level",
            "0 awake; 1 or 2 asleep at that level.",
            value=sleeper.engine.sleep_level,
        )
        last, woke = sleeper.last_sleep or {}, sleeper.last_wake or {}
        for name, doc, value in (
            (
                "sleep_freed_bytes",
                "GPU memory the last sleep freed (reserved bytes, all devices).",
                last.get("freedBytes"),
            ),
            ("sleep_rss_freed_bytes", "Resident memory the last sleep freed.", last.get("rssFreedBytes")),
            (
                "sleep_weights_bytes",
                "Weights the last sleep moved to CPU memory (1) or dropped (2).",
                last.get("weightsBytes"),
            ),
            ("sleep_seconds", "Seconds the last sleep's memory work took.", last.get("seconds")),
            ("wake_seconds", "Seconds the last wake took (weights back or reloaded).", woke.get("seconds")),
        ):
            yield GaugeMetricFamily(f"kubevram_worker_{name}", doc, value=float(value or 0))
        sleeps = CounterMetricFamily(
            "kubevram_worker_sleeps",
            "Sleeps, by level and reason (request, idle).",
            labels=["level", "reason"],
        )
        for (level, reason), count in sorted(sleeper.sleeps.items()):
            sleeps.add_metric([str(level), reason], float(count))
        yield sleeps
        wakes = CounterMetricFamily("kubevram_worker_wakes", "Wakes, by reason (request).", labels=["reason"])
        for reason, count in sorted(sleeper.wakes.items()):
            wakes.add_metric([reason], float(count))
        yield wakes


def register_metrics(registry: CollectorRegistry, monitor: MemoryMonitor) -> MemoryCollector:
    collector = MemoryCollector(monitor)
    registry.register(collector)
    return collector
