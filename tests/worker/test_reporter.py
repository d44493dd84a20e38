"""The status reporter against kmock's Kubernetes emulator over real HTTP."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import kmock
import pytest

from kubevram.worker.memory import MemoryMonitor, Sample
from kubevram.worker.reporter import KubeAPI, StatusReporter

GROUP_VERSION = "llm.kubevram.io/v1alpha1"
COLLECTION = f"/apis/{GROUP_VERSION}/namespaces/ai/llmdeployments"


@pytest.fixture
async def cluster():
    """kmock's emulator on a local port, knowing LLMDeployments and their status subresource."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        info = emulator.resources[f"{GROUP_VERSION}/llmdeployments"]
        info.kind = "LLMDeployment"
        info.namespaced = True
        info.verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
        info.subresources = {"status"}
        yield emulator, str(server.url).rstrip("/")


async def create(url: str, name: str = "qwen") -> None:
    body = {
        "apiVersion": GROUP_VERSION,
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": "ai"},
        "spec": {"model": {"id": "Qwen/Qwen2-0.5B"}},
        "status": {"phase": "Running", "readyReplicas": 2},
    }
    async with httpx.AsyncClient() as client:
        (await client.post(url + COLLECTION, json=body)).raise_for_status()


async def read(url: str, name: str = "qwen") -> dict:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}{COLLECTION}/{name}")
        response.raise_for_status()
        return response.json()


def reporter(url: str, pod: str = "qwen-0", **kw) -> StatusReporter:
    monitor = kw.pop("monitor", None) or MemoryMonitor()
    return StatusReporter(
        monitor, KubeAPI(url, token=kw.pop("token", "t0k3n")), "ai", "qwen", pod, node="gpu-1", **kw
    )


async def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.01)


async def test_report_patches_only_its_own_entry_of_the_status_subresource(cluster):
    emulator, url = cluster
    await create(url)
    monitor = MemoryMonitor()
    monitor._add_sample(Sample(tokens=512, batch=1, peakAllocatedBytes=3 * 2**30, baseAllocatedBytes=2**30))
    a = reporter(url, "qwen-0", monitor=monitor, model="Qwen/Qwen2-0.5B", weights="bfloat16")
    b = reporter(url, "qwen-1")
    async with a.api.client() as client:
        assert await a.report_once(client)
        assert await b.report_once(client)
    obj = await read(url)
    assert obj["spec"] == {"model": {"id": "Qwen/Qwen2-0.5B"}}
    status = obj["status"]
    assert status["phase"] == "Running" and status["readyReplicas"] == 2  # the operator's fields stay
    assert set(status["workers"]) == {"qwen-0", "qwen-1"}
    entry = status["workers"]["qwen-0"]
    assert entry["node"] == "gpu-1" and entry["model"] == "Qwen/Qwen2-0.5B" and entry["weights"] == "bfloat16"
    assert entry["devices"] == [] and entry["rssBytes"] > 0 and entry["ready"] is False
    assert entry["samples"] == [
        {"tokens": 512, "batch": 1, "peakAllocatedBytes": 3 * 2**30, "baseAllocatedBytes": 2**30}
    ]
    assert entry["time"].endswith("Z") and "lastRelease" not in entry and entry["oomCount"] == 0
    patches = [r for r in emulator if r.method == kmock.method.PATCH]
    assert len(patches) == 2
    for request in patches:
        assert request.url.path == f"{COLLECTION}/qwen/status"
        assert request.headers["Content-Type"] == "application/merge-patch+json"
        assert request.headers["Authorization"] == "Bearer t0k3n"
    assert patches[0].data == {"status": {"workers": {"qwen-0": entry}}}


async def test_the_token_file_is_read_for_every_request(cluster, tmp_path):
    emulator, url = cluster
    await create(url)
    token = tmp_path / "token"
    token.write_text("first\n")
    r = StatusReporter(MemoryMonitor(), KubeAPI(url, token_file=str(token)), "ai", "qwen", "qwen-0")
    async with r.api.client() as client:
        assert await r.report_once(client)
        token.write_text("rotated")
        assert await r.report_once(client)
    patches = [r for r in emulator if r.method == kmock.method.PATCH]
    assert [p.headers["Authorization"] for p in patches] == ["Bearer first", "Bearer rotated"]


async def test_failures_are_logged_and_backed_off_never_raised(cluster, caplog):
    _, url = cluster
    r = reporter(url, interval=30.0, backoff_cap=300.0)
    caplog.set_level(logging.WARNING, logger="kubevram.worker.reporter")
    async with r.api.client() as client:
        assert not await r.report_once(client)  # the LLMDeployment does not exist (yet)
        assert r.failures == 1 and "404" in (r.last_error or "")
        assert "cannot patch ai/qwen status.workers.qwen-0 (API answered 404" in caplog.text
        assert not await r.report_once(client)
        assert r.failures == 2
        await create(url)
        assert await r.report_once(client)
        assert r.failures == 0 and r.last_error is None and r.reports == 1
    assert [r.backoff(n) for n in range(0, 7)] == [30, 30, 60, 120, 240, 300, 300]
    r.failures = 3
    assert all(108 <= r.next_delay() <= 132 for _ in range(50))  # 120 s, 10 % jitter


async def test_an_unreachable_api_is_a_failure_not_a_crash():
    with socket_port() as port:
        r = reporter(f"http://127.0.0.1:{port}")
    async with r.api.client() as client:
        assert not await r.report_once(client)
    assert r.failures == 1 and "ConnectError" in (r.last_error or "")


class socket_port:
    """A port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def test_run_retries_until_the_resource_exists_reports_after_a_release_and_removes_its_entry(cluster):
    _, url = cluster
    monitor = MemoryMonitor()
    r = reporter(url, monitor=monitor, interval=0.05, min_interval=0.0, backoff_cap=0.1)
    task = asyncio.create_task(r.run())
    await wait_for(lambda: r.failures >= 2, "failed attempts")
    await create(url)
    await wait_for(lambda: r.reports >= 1, "a report once the resource exists")
    assert "qwen-0" in (await read(url))["status"]["workers"]
    # Now slow: the next periodic report is far away, but a release is reported at once.
    r.interval = 3600.0
    await wait_for(lambda: r.reports >= 2, "the report in flight")
    reports = r.reports
    monitor.changed.set()
    await wait_for(lambda: r.reports == reports + 1, "the report after a release")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    status = (await read(url))["status"]
    assert "qwen-0" not in (status.get("workers") or {})
    assert status["phase"] == "Running"


def test_api_and_reporter_from_the_environment():
    assert KubeAPI.from_env({}) is None
    api = KubeAPI.from_env({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    assert api is not None and api.base_url == "https://10.96.0.1:443"
    assert api.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert api.ca_file == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    six = KubeAPI.from_env({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"})
    assert six is not None and six.base_url == "https://[fd00::1]:6443"
    proxy = KubeAPI.from_env({"KUBEVRAM_API_URL": "http://127.0.0.1:8001/", "KUBERNETES_SERVICE_HOST": "x"})
    assert proxy is not None and proxy.base_url == "http://127.0.0.1:8001" and proxy.token_file is None
    env = {
        "KUBEVRAM_API_URL": "http://127.0.0.1:8001",
        "KUBEVRAM_POD_NAME": "qwen-abc",
        "KUBEVRAM_DEPLOYMENT": "qwen",
        "KUBEVRAM_NAMESPACE": "ai",
        "KUBEVRAM_NODE_NAME": "gpu-1",
        "KUBEVRAM_REPORT_INTERVAL": "60",
    }
    r = StatusReporter.from_env(MemoryMonitor(), None, env)
    assert r is not None
    assert (r.pod, r.deployment, r.namespace, r.node, r.interval) == ("qwen-abc", "qwen", "ai", "gpu-1", 60.0)
    assert r.api.status_path("ai", "qwen") == f"{COLLECTION}/qwen/status"
    assert StatusReporter.from_env(MemoryMonitor(), None, {**env, "KUBEVRAM_POD_NAME": ""}) is None
