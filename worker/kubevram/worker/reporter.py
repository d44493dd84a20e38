"""Each worker reports its memory into its LLMDeployment: ``status.workers.<pod>``.

A JSON merge patch (``Content-Type: application/merge-patch+json``) on the status subresource,
``PATCH /apis/llm.kubevram.io/v1alpha1/namespaces/{ns}/llmdeployments/{name}/status`` with
``{"status": {"workers": {"<pod>": {...}}}}``, touches only this pod's entry: the operator's fields and
the other workers' entries stay. The worker's ServiceAccount may only ``get`` and ``patch``
``llmdeployments/status`` in its namespace (the chart's workers' ClusterRole, bound per namespace).

No Kubernetes client: plain HTTPS with ``httpx``, in-cluster from ``KUBERNETES_SERVICE_HOST``/``PORT``,
the service-account token (re-read for every request: projected tokens rotate) and its CA;
``KUBEVRAM_API_URL`` (and optionally ``KUBEVRAM_API_TOKEN``) point it elsewhere (tests, ``kubectl proxy``).
Who it reports for: ``KUBEVRAM_POD_NAME``, ``KUBEVRAM_DEPLOYMENT``, ``KUBEVRAM_NAMESPACE`` (the
operator's pod template sets them); without them the reporter stays off.

Rate: every ``interval`` seconds (``KUBEVRAM_REPORT_INTERVAL``, 30), and soon after a release, but never
twice within ``min_interval`` (``KUBEVRAM_REPORT_MIN_INTERVAL``, 10). A failed patch is logged and
retried with exponential backoff (``interval x 2^(failures-1)``, capped at ``backoff_cap``, 10 % jitter);
it is never fatal. On a clean shutdown the pod removes its entry.

The entry (bytes are integers)::

    time, node, model, weights (precision), ready, rssBytes, oomCount,          # absent when unknown
    devices: [{index, name, allocatedBytes, peakAllocatedBytes, reservedBytes, peakReservedBytes,
               activeBytes, fragmentationBytes, allocRetries, ooms, totalBytes, usedBytes, freeBytes,
               budgetBytes}],
    lastRelease: {time, reason, freedBytes, rssFreedBytes, seconds} | null,
    sleep: {level, since, wakeOnRequest, lastSleep: {level, reason, time, seconds, freedBytes,
            rssFreedBytes, weightsBytes} | null, lastWake: {level, reason, time, seconds,
            weightsBytes} | null, sleeps: {"<level>": {"<reason>": n}}, wakes: {"<reason>": n}},
    samples: [{tokens, batch, peakAllocatedBytes, baseAllocatedBytes}]   # CUDA workers only

``samples`` are the operator's calibration input: per prefill size (prompt tokens of the batch) the
peak allocated bytes during that prefill, summed over the pod's GPUs (``baseAllocatedBytes``: allocated
just before it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kubevram.worker.memory import MemoryMonitor, now_rfc3339

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "llm.kubevram.io", "v1alpha1", "llmdeployments"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_INTERVAL = 30.0
DEFAULT_MIN_INTERVAL = 10.0
DEFAULT_BACKOFF_CAP = 300.0
MERGE_PATCH = "application/merge-patch+json"


@dataclass
class KubeAPI:
    """Where the Kubernetes API is and how to authenticate to it."""

    base_url: str
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KubeAPI | None:
        """``KUBEVRAM_API_URL`` if set, else the in-cluster API; ``None`` outside a cluster."""
        env = os.environ if env is None else env
        url = env.get("KUBEVRAM_API_URL")
        if url:
            return cls(url.rstrip("/"), token=env.get("KUBEVRAM_API_TOKEN") or None)
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            return None
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return cls(
            f"https://{host}:{port}",
            token_file=f"{SERVICE_ACCOUNT_DIR}/token",
            ca_file=f"{SERVICE_ACCOUNT_DIR}/ca.crt",
        )

    def _token(self) -> str | None:
        if self.token_file:
            try:
                return Path(self.token_file).read_text(encoding="utf-8").strip() or None
            except OSError as exc:
                log.warning("cannot read the service-account token %s: %s", self.token_file, exc)
        return self.token

    def client(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = True
        if self.ca_file:
            verify = ssl.create_default_context(cafile=self.ca_file)
        return httpx.AsyncClient(base_url=self.base_url, verify=verify, timeout=self.timeout)

    def status_path(self, namespace: str, name: str) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"

    async def patch_status(
        self, client: httpx.AsyncClient, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch the status subresource; raises ``httpx.HTTPError`` on failure."""
        headers = {"Content-Type": MERGE_PATCH, "Accept": "application/json"}
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = await client.patch(self.status_path(namespace, name), json=dict(patch), headers=headers)
        response.raise_for_status()
        body = response.json()
        return body if isinstance(body, dict) else {}


@dataclass
class StatusReporter:
    """Patches ``status.workers.<pod>`` from ``monitor``'s figures; see the module docstring."""

    monitor: MemoryMonitor
    api: KubeAPI
    namespace: str
    deployment: str
    pod: str
    node: str | None = None
    model: str | None = None
    weights: str | None = None
    interval: float = DEFAULT_INTERVAL
    min_interval: float = DEFAULT_MIN_INTERVAL
    backoff_cap: float = DEFAULT_BACKOFF_CAP
    clock: Callable[[], float] = time.monotonic
    failures: int = field(default=0, init=False)
    reports: int = field(default=0, init=False)
    last_error: str | None = field(default=None, init=False)
    _last_attempt: float = field(default=-float("inf"), init=False)

    @classmethod
    def from_env(
        cls, monitor: MemoryMonitor, plan: Any | None = None, env: Mapping[str, str] | None = None
    ) -> StatusReporter | None:
        """A reporter for this pod, or ``None`` (logged) where there is no API or no identity."""
        env = os.environ if env is None else env
        pod, deployment = env.get("KUBEVRAM_POD_NAME"), env.get("KUBEVRAM_DEPLOYMENT")
        namespace = env.get("KUBEVRAM_NAMESPACE")
        if plan is not None:
            deployment = deployment or plan.deployment.name
            namespace = namespace or plan.deployment.namespace
        api = KubeAPI.from_env(env)
        if not (pod and deployment and api):
            log.info("status reporting is off: it needs KUBEVRAM_POD_NAME, KUBEVRAM_DEPLOYMENT and an API")
            return None
        return cls(
            monitor,
            api,
            namespace or "default",
            deployment,
            pod,
            node=env.get("KUBEVRAM_NODE_NAME") or None,
            model=plan.model.id if plan is not None else None,
            weights=str(plan.precision.weights) if plan is not None else None,
            interval=float(env.get("KUBEVRAM_REPORT_INTERVAL") or DEFAULT_INTERVAL),
            min_interval=float(env.get("KUBEVRAM_REPORT_MIN_INTERVAL") or DEFAULT_MIN_INTERVAL),
        )

    def entry(self) -> dict[str, Any]:
        """This pod's status entry (the figures of ``GET /v1/admin/stats`` that belong in the status)."""
        stats = self.monitor.stats()
        entry = {
            "time": now_rfc3339(),
            "node": self.node,
            "model": self.model,
            "weights": self.weights,
            "ready": stats["ready"],
            "rssBytes": stats["rssBytes"],
            "oomCount": stats["oomCount"],
            "devices": stats["devices"],
            "lastRelease": stats["lastRelease"],
            "sleep": stats["sleep"],
            "samples": stats["samples"],
        }
        return {k: v for k, v in entry.items() if v is not None}  # a merge patch's null deletes

    def patch(self, entry: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"status": {"workers": {self.pod: entry}}}

    async def report_once(self, client: httpx.AsyncClient, entry: Mapping[str, Any] | None = None) -> bool:
        """One patch (``entry`` ``None``: this pod's current entry); False, logged, on any failure."""
        self._last_attempt = self.clock()
        body = self.patch(self.entry() if entry is None else entry)
        try:
            await self.api.patch_status(client, self.namespace, self.deployment, body)
        except httpx.HTTPStatusError as exc:
            self._failed(f"API answered {exc.response.status_code}: {_reason(exc.response)}")
            return False
        except (httpx.HTTPError, OSError, ValueError) as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return False
        if self.failures:
            log.info("status reporting works again after %d failure(s)", self.failures)
        self.failures, self.last_error = 0, None
        self.reports += 1
        return True

    def _failed(self, message: str) -> None:
        self.failures += 1
        self.last_error = message
        log.warning(
            "cannot patch %s/%s status.workers.%s (%s); retrying in about %.0f s",
            self.namespace,
            self.deployment,
            self.pod,
            message,
            self.backoff(self.failures),
        )

    def backoff(self, failures: int) -> float:
        """Seconds before the next attempt after ``failures`` failures in a row (no jitter)."""
        if failures <= 0:
            return self.interval
        return float(min(self.backoff_cap, self.interval * 2 ** min(failures - 1, 32)))

    def next_delay(self) -> float:
        delay = self.backoff(self.failures)
        return delay * random.uniform(0.9, 1.1) if self.failures else delay

    async def run(self) -> None:
        """Report until cancelled; on cancellation remove this pod's entry (best effort)."""
        log.info(
            "reporting memory into %s/%s status.workers.%s every %.0f s",
            self.namespace,
            self.deployment,
            self.pod,
            self.interval,
        )
        async with self.api.client() as client:
            try:
                while True:
                    await self.report_once(client)
                    await self._wait(self.next_delay())
            except asyncio.CancelledError:
                await asyncio.shield(self._remove(client))
                raise

    async def _wait(self, delay: float) -> None:
        """Sleep ``delay``; when healthy a release cuts it short (to ``min_interval`` after the last)."""
        changed = self.monitor.changed
        if self.failures:
            await asyncio.sleep(delay)
            return
        try:
            await asyncio.wait_for(changed.wait(), timeout=delay)
        except TimeoutError:
            return
        changed.clear()
        rest = self._last_attempt + self.min_interval - self.clock()
        if rest > 0:
            await asyncio.sleep(rest)

    async def _remove(self, client: httpx.AsyncClient) -> None:
        try:
            await asyncio.wait_for(
                self.api.patch_status(client, self.namespace, self.deployment, self.patch(None)), timeout=5
            )
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            log.info("could not remove status.workers.%s on shutdown: %s", self.pod, exc)


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return response.reason_phrase
