"""Admin routes over real HTTP on the CPU tiny model: bearer auth, stats, release under traffic, metrics."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import httpx
import pytest
from http_helpers import AUTH, TOKEN, free_port, output, spawn

from kubevram.worker import memory

PROMPTS = ["hello world", "the quick brown fox", "asks a question about memory", "kubernetes clusters"]


BAD_HEADERS = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": "Bearer"},
    {"Authorization": TOKEN},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
]


def test_admin_routes_answer_401_without_the_token(make_admin):
    admin = make_admin()
    for headers in BAD_HEADERS:
        for method, path in [("POST", "/v1/admin/release"), ("GET", "/v1/admin/stats")]:
            response = httpx.request(method, admin.url + path, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and "bearer token" in error["message"]
    assert httpx.get(admin.url + "/v1/admin/stats", headers=AUTH).status_code == 200
    lower = {"authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
    assert httpx.get(admin.url + "/v1/admin/stats", headers=lower).status_code == 200
    assert admin.monitor.releases == {}  # nothing ran


def test_without_a_configured_token_every_admin_request_is_refused(make_admin):
    admin = make_admin(token=None)
    response = httpx.get(admin.url + "/v1/admin/stats", headers={"Authorization": "Bearer x"})
    assert response.status_code == 401
    assert "KUBEVRAM_ADMIN_TOKEN is not set" in response.json()["error"]["message"]


def test_stats_on_a_cpu_worker(make_admin):
    admin = make_admin()
    stats = httpx.get(admin.url + "/v1/admin/stats", headers=AUTH).json()
    assert stats["devices"] == []
    assert stats["ready"] is True
    assert stats["rssBytes"] > 50 * 2**20
    assert stats["samples"] == [] and stats["lastRelease"] is None and stats["releases"] == {}
    assert {"time", "pid", "oomCount", "running", "queued", "steps", "idleSeconds"} <= set(stats)


def test_release_over_http_then_stats_and_metrics_show_it(make_admin):
    admin = make_admin()
    result = httpx.post(admin.url + "/v1/admin/release", headers=AUTH, timeout=60)
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["reason"] == "request"
    assert body["before"]["devices"] == [] and body["after"]["devices"] == []
    assert body["before"]["rssBytes"] > 0 and body["after"]["rssBytes"] > 0
    assert body["freedBytes"] == 0
    stats = httpx.get(admin.url + "/v1/admin/stats", headers=AUTH).json()
    assert stats["lastRelease"]["time"] == body["time"]
    assert stats["releases"] == {"request": 1}
    text = httpx.get(admin.url + "/metrics").text
    assert 'kubevram_worker_releases_total{reason="request"} 1.0' in text
    rss = [line for line in text.splitlines() if line.startswith("kubevram_worker_process_rss_bytes ")]
    assert rss and float(rss[0].split()[1]) > 50 * 2**20
    assert "# TYPE kubevram_worker_gpu_allocated_bytes gauge" in text  # no device samples on CPU
    assert "kubevram_worker_gpu_allocated_bytes{" not in text
    assert 'kubevram_worker_requests_total{endpoint="/v1/admin/release",status="200"} 1.0' in text


def test_admin_port_app_serves_admin_and_the_main_app_does_not(make_admin):
    admin = make_admin(separate=True)
    assert admin.url != admin.admin_url
    assert httpx.get(admin.url + "/v1/admin/stats", headers=AUTH).status_code == 404
    assert httpx.post(admin.url + "/v1/admin/release", headers=AUTH).status_code == 404
    assert httpx.get(admin.admin_url + "/v1/admin/stats", headers=AUTH).status_code == 200
    assert httpx.get(admin.admin_url + "/v1/admin/stats").status_code == 401
    assert httpx.get(admin.admin_url + "/healthz").json() == {"status": "ok"}
    assert httpx.post(admin.admin_url + "/v1/completions", json={"prompt": "hi"}).status_code == 404


@pytest.mark.slow
def test_release_is_safe_under_concurrent_generation_and_never_runs_during_a_step(make_admin, monkeypatch):
    admin = make_admin(max_batch_size=4)
    engine = admin.engine
    n, max_tokens = 8, 16
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    alone = {
        p: httpx.post(admin.url + "/v1/completions", json={**body, "prompt": p}, timeout=60).json()
        for p in PROMPTS
    }

    # Step and release bookkeeping on one sequence: intervals [start, end) must never overlap.
    order, lock = itertools.count(), threading.Lock()
    steps: list[tuple[int, int]] = []
    releases: list[tuple[int, int, str, int]] = []
    guarded, release_now = engine._guarded, memory.release_now

    def counted_step(step, arg):
        with lock:
            start = next(order)
        try:
            return guarded(step, arg)
        finally:
            with lock:
                steps.append((start, next(order)))

    def counted_release(engine_, devices, reason):
        with lock:
            start = next(order)
        running = engine_.running
        try:
            return release_now(engine_, devices, reason)
        finally:
            with lock:
                releases.append((start, next(order), threading.current_thread().name, running))

    monkeypatch.setattr(engine, "_guarded", counted_step)
    monkeypatch.setattr(memory, "release_now", counted_release)
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait()

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        held = asyncio.ensure_future(engine.run_between_steps(hold))
        await asyncio.to_thread(entered.wait)
        async with httpx.AsyncClient(base_url=admin.url, timeout=120) as client:
            posts = [
                asyncio.ensure_future(client.post("/v1/completions", json={**body, "prompt": PROMPTS[i % 4]}))
                for i in range(n)
            ]
            deadline = time.monotonic() + 60
            while engine.queue_depth < n:
                assert time.monotonic() < deadline, "the requests did not queue"
                await asyncio.sleep(0.005)
            gate.set()
            await held
            released = []
            while not all(p.done() for p in posts) and len(released) < 3:  # again and again under traffic
                released.append(await client.post("/v1/admin/release", headers=AUTH))
            burst = [client.post("/v1/admin/release", headers=AUTH) for _ in range(2)]
            released += await asyncio.gather(*burst)
            return list(await asyncio.gather(*posts)), released

    answers, released = asyncio.run(run())
    assert [r.status_code for r in answers] == [200] * n
    for i, answer in enumerate(answers):
        choice, usage = answer.json()["choices"][0], answer.json()["usage"]
        assert usage["completion_tokens"] == max_tokens
        assert choice["text"] == alone[PROMPTS[i % 4]]["choices"][0]["text"]
    assert [r.status_code for r in released] == [200] * len(released)
    assert len(releases) == len(released) >= 3
    for start, end, thread, _ in releases:
        assert thread == "kubevram-engine"
        overlapping = [(a, b) for a, b in steps if a < end and start < b]
        assert not overlapping, f"release [{start}, {end}) overlaps steps {overlapping}"
    assert any(running > 0 for *_, running in releases), "no release happened while a batch was running"
    assert admin.monitor.releases["request"] == len(released)


@pytest.mark.slow
def test_kubevram_worker_serves_admin_on_its_own_port(tiny_model_dir):
    """The real command: ``--admin-port`` puts the admin routes on a second server, out of the API port."""
    import os
    import signal
    import sys

    port, admin_port = free_port(), free_port()
    command = [sys.executable, "-m", "kubevram.cli", "worker", "--model", str(tiny_model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port)]
    env = {**os.environ, "KUBEVRAM_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    for name in ("KUBEVRAM_POD_NAME", "KUBEVRAM_API_URL", "KUBERNETES_SERVICE_HOST"):
        env.pop(name, None)
    proc = spawn(command, env)
    try:
        url, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, output(proc)
            assert time.monotonic() < deadline, "the worker did not turn ready"
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert httpx.get(f"{url}/v1/admin/stats", headers=AUTH).status_code == 404
        assert httpx.get(f"{admin_url}/v1/admin/stats").status_code == 401
        stats = httpx.get(f"{admin_url}/v1/admin/stats", headers=AUTH).json()
        assert stats["ready"] is True and stats["devices"] == []
        released = httpx.post(f"{admin_url}/v1/admin/release", headers=AUTH, timeout=60)
        assert released.status_code == 200 and released.json()["reason"] == "request"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'kubevram_worker_releases_total{reason="request"} 1.0' in metrics
        assert "kubevram_worker_process_rss_bytes " in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out = output(proc, timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert out.count("Application shutdown complete") == 2, out  # both servers stopped cleanly
    assert "status reporting is off" in out
