"""Sleep and wake over real HTTP on the CPU (the same code path as on a GPU, RSS instead of VRAM).

In process, over the shared tiny model: levels 1 and 2 then a wake answer as before; a request during
sleep wakes the worker (``wakeOnRequest``) or is answered 503 with ``Retry-After``; a sleep waits for
the requests admitted before it and parks what arrives meanwhile, none lost; ``sleepAfterIdleSeconds``.
A worker built from its plan as ``kubevram worker`` builds it, over a model of about 50 MB: the memory
each level frees, read from the process.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import threading

import httpx
import psutil
import pytest
from http_helpers import AUTH, TOKEN, Clock, Pause, metric, wait_for

from kubevram.api.v1alpha1 import MemoryReleaseSpec
from kubevram.api.workerplan import WorkerPlan
from kubevram.worker.admin import register_metrics
from kubevram.worker.loader import load_weights
from kubevram.worker.memory import MemoryMonitor, free_caches
from kubevram.worker.serve import build_state, load_into

BODY = {"prompt": "hello world", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
MiB = 2**20


def complete(url: str, client: httpx.Client | None = None, **fields) -> httpx.Response:
    return (client or httpx).post(f"{url}/v1/completions", json={**BODY, **fields}, timeout=120)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def is_sleeping(url: str, path: str = "/v1/admin/is_sleeping") -> dict:
    response = httpx.get(url + path, headers=AUTH)
    assert response.status_code == 200, response.text
    return dict(response.json())


def weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class Call:
    """An HTTP call in a thread (it may wait for the engine): ``result()`` joins it."""

    def __init__(self, method: str, url: str, timeout: float = 120, **kwargs) -> None:
        self.response: httpx.Response | None = None
        self.timeout = timeout
        self.thread = threading.Thread(target=self._run, args=(method, url), kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, method: str, url: str, **kwargs) -> None:
        self.response = httpx.request(method, url, timeout=self.timeout, **kwargs)

    def result(self) -> httpx.Response:
        self.thread.join(self.timeout)
        assert self.response is not None, "no answer"
        return self.response


@pytest.mark.parametrize("wake_on_request", [True, False], ids=["wake on request", "503 while asleep"])
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_then_wake_answers_as_before(make_admin, loaded, tiny_model_dir, level, wake_on_request):
    admin = make_admin(
        policy=MemoryReleaseSpec(wakeOnRequest=wake_on_request),
        reload=lambda: load_weights(str(tiny_model_dir), None),
    )
    url = admin.url
    before = text(complete(url))

    slept = httpx.post(f"{url}/v1/admin/sleep?level={level}", headers=AUTH, timeout=120)
    assert slept.status_code == 200, slept.text
    record = slept.json()
    assert record["level"] == level and record["reason"] == "request"
    # A CPU worker's weights already live in CPU memory: level 1 moves nothing, level 2 drops them all.
    assert record["weightsBytes"] == (0 if level == 1 else weights_bytes(loaded.model))
    assert record["before"]["devices"] == record["after"]["devices"] == []
    assert record["rssFreedBytes"] == record["before"]["rssBytes"] - record["after"]["rssBytes"]
    assert (admin.engine.model is None) == (level == 2)
    for path in ("/v1/admin/is_sleeping", "/is_sleeping"):  # kubevram's path and vLLM's
        assert is_sleeping(url, path) == {"is_sleeping": True, "level": level}
    assert metric(url, "kubevram_worker_sleep_level") == level

    if wake_on_request:
        assert text(complete(url)) == before  # the request woke it, then was served
        woken_by = "arrival"
    else:
        for stream in (False, True):
            refused = complete(url, stream=stream)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "5"  # no wake measured yet
            assert refused.json()["error"]["code"] == "sleeping"
        assert is_sleeping(url)["is_sleeping"] is True
        woke = httpx.post(f"{url}/wake_up", headers=AUTH, timeout=120)  # vLLM's path
        assert woke.status_code == 200, woke.text
        assert woke.json()["level"] == level
        assert woke.json()["weightsBytes"] == (0 if level == 1 else weights_bytes(loaded.model))
        woken_by = "request"
        assert text(complete(url)) == before
    assert is_sleeping(url) == {"is_sleeping": False, "level": 0}

    stats = httpx.get(f"{url}/v1/admin/stats", headers=AUTH).json()["sleep"]
    assert stats["level"] == 0 and stats["since"] is None and stats["wakeOnRequest"] is wake_on_request
    assert stats["sleeps"] == {str(level): {"request": 1}} and stats["wakes"] == {woken_by: 1}
    assert stats["lastSleep"]["weightsBytes"] == record["weightsBytes"]
    assert stats["lastWake"]["level"] == level and stats["lastWake"]["reason"] == woken_by
    assert metric(url, "kubevram_worker_sleeps_total", level=str(level), reason="request") == 1
    assert metric(url, "kubevram_worker_wakes_total", reason=woken_by) == 1
    assert metric(url, "kubevram_worker_sleep_level") == 0
    endpoint = {"endpoint": "/v1/admin/sleep", "status": "200"}
    assert metric(url, "kubevram_worker_requests_total", **endpoint) == 1


def test_sleep_waits_for_the_admitted_requests_and_parks_what_arrives(make_admin):
    """None lost: the admitted requests run to their end before the sleep; a request that arrives
    while the sleep waits is parked, wakes the worker once it sleeps, and is served."""
    admin = make_admin(max_batch_size=2)
    engine, url = admin.engine, admin.url
    alone = text(complete(url))
    pause = Pause(engine).wait()  # hold the loop: what arrives now is admitted and waits
    admitted = [Call("POST", f"{url}/v1/completions", json=BODY) for _ in range(3)]
    wait_for(lambda: engine.queue_depth == 3, "three admitted requests")
    sleeping = Call("POST", f"{url}/v1/admin/sleep?level=1", headers=AUTH)
    wait_for(lambda: engine.sleeping, "the sleep to be ordered")
    assert is_sleeping(url)["is_sleeping"] is False  # ordered, not asleep: the admitted go first
    late = Call("POST", f"{url}/v1/completions", json=BODY)
    wait_for(lambda: engine.queue_depth == 4, "the late request to be parked")
    assert metric(url, "vllm:num_requests_waiting") == 4  # parked requests count as waiting
    pause.resume()

    for call in admitted:
        response = call.result()
        assert text(response) == alone and response.json()["usage"]["completion_tokens"] == 12
    slept = sleeping.result()
    assert slept.status_code == 200 and slept.json()["level"] == 1, slept.text
    assert slept.json()["waitedSeconds"] >= 0
    assert text(late.result()) == alone
    stats = httpx.get(f"{url}/v1/admin/stats", headers=AUTH).json()["sleep"]
    assert stats["sleeps"] == {"1": {"request": 1}} and stats["wakes"] == {"arrival": 1}
    finished = {
        reason: metric(url, "kubevram_worker_sequences_finished_total", reason=reason)
        for reason in ("length", "error", "cancelled")
    }
    assert finished == {"length": 5, "error": None, "cancelled": None}


def test_a_wake_before_the_sleep_could_happen_calls_it_off(make_admin):
    admin = make_admin()
    engine, url = admin.engine, admin.url
    pause = Pause(engine).wait()
    admitted = Call("POST", f"{url}/v1/completions", json=BODY)
    wait_for(lambda: engine.queue_depth == 1, "an admitted request")
    sleeping = Call("POST", f"{url}/v1/admin/sleep?level=1", headers=AUTH)
    wait_for(lambda: engine.sleeping, "the sleep to be ordered")
    woke = httpx.post(f"{url}/v1/admin/wake_up", headers=AUTH, timeout=60)
    assert woke.status_code == 200 and woke.json() == {"level": 0, "wasAsleep": False}
    cancelled = sleeping.result()
    assert cancelled.status_code == 409 and cancelled.json()["error"]["code"] == "sleep_cancelled"
    pause.resume()
    assert admitted.result().status_code == 200
    assert is_sleeping(url)["is_sleeping"] is False and engine.sleeper.sleeps == {}


def _waking_from_level_2(make_admin, tiny_model_dir):
    """A worker whose wake from level 2 holds in its reload (``reloading`` set) until ``gate`` is set."""
    reloading, gate = threading.Event(), threading.Event()

    def reload():
        reloading.set()
        gate.wait(60)
        return load_weights(str(tiny_model_dir), None)

    return make_admin(reload=reload), reloading, gate


def test_a_wake_up_that_arrives_while_the_worker_wakes_is_answered(make_admin, tiny_model_dir):
    """A wake_up sent while a request is waking the worker (level 2 reloads for seconds on a large
    model) gets that wake's figures; it waited for ever before."""
    admin, reloading, gate = _waking_from_level_2(make_admin, tiny_model_dir)
    url = admin.url
    before = text(complete(url))
    assert httpx.post(f"{url}/v1/admin/sleep?level=2", headers=AUTH, timeout=60).status_code == 200
    arrival = Call("POST", f"{url}/v1/completions", json=BODY)  # wakes it (wakeOnRequest)
    try:
        assert reloading.wait(60), "the request did not wake the worker"
        second = Call("POST", f"{url}/v1/admin/wake_up", headers=AUTH, timeout=30)
        wait_for(lambda: admin.engine._wake_orders, "the wake_up to wait for the wake")
    finally:
        gate.set()
    assert text(arrival.result()) == before
    woke = second.result()
    assert woke.status_code == 200, woke.text
    assert woke.json()["level"] == 2 and woke.json()["reason"] == "arrival"
    assert is_sleeping(url) == {"is_sleeping": False, "level": 0}
    assert admin.engine.sleeper.wakes == {"arrival": 1}


def test_a_sleep_asked_while_the_worker_wakes_is_not_answered_already_asleep(make_admin):
    """Asleep, with a request waiting that wakes it: a sleep asked then is 409 ``waking_up`` (the
    worker is about to be awake), not ``alreadyAsleep`` (it then woke while its caller believed it
    asleep)."""
    admin = make_admin()
    engine, url = admin.engine, admin.url
    before = text(complete(url))
    assert httpx.post(f"{url}/v1/admin/sleep?level=1", headers=AUTH, timeout=60).status_code == 200
    pause = Pause(engine).wait()  # the loop sleeps; hold it so that the wake waits
    try:
        arrival = Call("POST", f"{url}/v1/completions", json=BODY)
        wait_for(lambda: engine.queue_depth == 1, "the request to be parked")
        again = httpx.post(f"{url}/v1/admin/sleep?level=1", headers=AUTH, timeout=30)
    finally:
        pause.resume()
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "waking_up"
    assert text(arrival.result()) == before
    assert is_sleeping(url) == {"is_sleeping": False, "level": 0}
    assert engine.sleeper.sleeps == {(1, "request"): 1}


def test_a_drain_during_a_long_wake_ends_the_waiting_requests_at_once(make_admin, tiny_model_dir):
    """SIGTERM while a request wakes the worker from level 2 (a reload of minutes for a large model):
    the drain ends the requests that wait for the wake at once (503 ``shutting_down``). It waited for
    the reload to end first, past the pod's grace period: killed, its status entry left behind."""
    from kubevram.worker.serve import drain

    admin, reloading, gate = _waking_from_level_2(make_admin, tiny_model_dir)
    url = admin.url
    assert httpx.post(f"{url}/v1/admin/sleep?level=2", headers=AUTH, timeout=60).status_code == 200
    arrival = Call("POST", f"{url}/v1/completions", json=BODY)  # parked; it wakes the worker
    ended: list[int] = []
    draining = threading.Thread(target=lambda: ended.append(asyncio.run(drain(admin.state, 0))), daemon=True)
    try:
        assert reloading.wait(60), "the request did not wake the worker"
        draining.start()
        draining.join(30)
        assert ended == [1], "the drain waited for the wake"
        refused = arrival.result()
    finally:
        gate.set()
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    wait_for(lambda: admin.engine.sleep_level == 0, "the wake to end")
    assert metric(url, "vllm:num_requests_waiting") == 0
    assert metric(url, "kubevram_worker_sequences_finished_total", reason="error") == 1


def test_an_idle_worker_falls_asleep_and_a_request_wakes_it(make_admin):
    clock = Clock()
    policy = MemoryReleaseSpec(idleSeconds=0, sleepAfterIdleSeconds=600)
    admin = make_admin(policy=policy, clock=clock)
    url, monitor = admin.url, admin.monitor
    answer = text(complete(url))
    asyncio.run(monitor.check())
    clock.now += 599
    assert asyncio.run(monitor.check()) is None
    clock.now += 1
    slept = asyncio.run(monitor.check())
    assert slept is not None and slept["level"] == 1 and slept["reason"] == "idle"
    assert is_sleeping(url) == {"is_sleeping": True, "level": 1}
    assert text(complete(url)) == answer
    assert is_sleeping(url)["is_sleeping"] is False
    assert asyncio.run(monitor.check()) is None  # the wake was activity: a new idle period
    assert monitor.sleeper.sleeps == {(1, "idle"): 1} and monitor.sleeper.wakes == {"arrival": 1}


def test_a_request_being_prepared_keeps_an_idle_worker_awake(make_admin, gate_tokenizer):
    """``sleepAfterIdleSeconds`` pass while a request is tokenised (a long chat, a backlog on the
    preparation thread): it arrived, so the worker is not idle. The idle sleep came first, and the
    request was refused (``wakeOnRequest: false``) or waited for a sleep and a wake."""
    gate, blocked, _ = gate_tokenizer
    clock = Clock()
    policy = MemoryReleaseSpec(idleSeconds=0, sleepAfterIdleSeconds=600, wakeOnRequest=False)
    admin = make_admin(policy=policy, clock=clock)
    clock.now += 600  # idle for long enough
    arrival = Call("POST", f"{admin.url}/v1/completions", json={**BODY, "prompt": "BLOCK hello"})
    try:
        assert blocked.wait(60), "the request was not prepared"
        assert asyncio.run(admin.monitor.check()) is None
    finally:
        gate.set()
    assert arrival.result().status_code == 200, arrival.result().text
    assert admin.monitor.sleeper.sleeps == {}


def test_bad_levels_and_missing_tokens_are_refused(make_admin):
    admin = make_admin()  # no reload: level 2 cannot wake
    url = admin.url
    for level, says in (("3", "level: '3' must be 1 or 2"), ("2", "level: 2 drops the weights")):
        refused = httpx.post(f"{url}/v1/admin/sleep?level={level}", headers=AUTH)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "level"
        assert says in refused.json()["error"]["message"]
    for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
        for prefix in ("/v1/admin", ""):
            assert httpx.request(method, url + prefix + path).status_code == 401
    assert is_sleeping(url)["is_sleeping"] is False and admin.engine.sleeper.sleeps == {}
    separate = make_admin(separate=True)
    assert httpx.post(f"{separate.url}/sleep", headers=AUTH).status_code == 404  # admin port only
    assert is_sleeping(separate.admin_url, "/is_sleeping")["is_sleeping"] is False


@pytest.fixture(scope="module")
def model_50mb(make_model_dir):
    """A Llama of about 50 MB (float32) with the tiny tokenizer, saved like a real model."""
    return make_model_dir("llama-50mb", hidden=384, intermediate=1024, layers=8, heads=8)


def test_a_worker_loaded_from_its_plan_frees_the_measured_memory_when_it_sleeps(model_50mb, tmp_path, serve):
    """A worker built from its plan file as ``kubevram worker --plan`` builds it (``wakeOnRequest:
    false``, a planned KV budget): level 1 keeps a CPU worker's weights in memory; level 2 drops them
    (the process's resident memory falls by most of their size) and reloads them from the files; the
    answers stay the same; the 503s carry Retry-After."""
    weights = (model_50mb / "model.safetensors").stat().st_size
    plan = WorkerPlan.parse(
        {
            "deployment": {"name": "big"},
            "model": {"id": str(model_50mb)},
            "precision": {"weights": "float32"},
            "serving": {"maxBatchSize": 2, "maxSequenceLength": 256},
            "memoryRelease": {"wakeOnRequest": False},
            "kvCacheBytes": 1_000_000,
        }
    )
    (tmp_path / "plan.json").write_text(plan.to_json())
    state, plan = build_state(argparse.Namespace(model=str(model_50mb), plan=str(tmp_path / "plan.json")))
    state.memory = MemoryMonitor.for_plan(state.metrics, plan)  # as run_worker does
    register_metrics(state.metrics.registry, state.memory)
    load_into(state, str(model_50mb), plan)
    url = serve(state, TOKEN).url
    resident = psutil.Process().memory_info
    with httpx.Client(headers=AUTH, timeout=120) as client:
        answer = text(complete(url, client))
        assert metric(url, "vllm:cache_config_info", kv_cache_memory_bytes="1000000", block_size="1") == 1

        # Each baseline after the heap trim a sleep runs itself: else the sleep also hands back what
        # earlier tests in this process freed (RSS fell by 34 MiB at level 1 in one run of three).
        free_caches([])
        rss = resident().rss
        one = client.post(f"{url}/v1/admin/sleep?level=1").json()
        assert one["level"] == 1 and one["weightsBytes"] == 0  # a CPU worker: nothing to move
        assert resident().rss > rss - weights // 2  # the weights stay in memory
        refused = complete(url, client)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        woke = client.post(f"{url}/v1/admin/wake_up").json()
        assert text(complete(url, client)) == answer

        free_caches([])
        rss = resident().rss
        two = client.post(f"{url}/sleep?level=2").json()
        assert two["level"] == 2 and abs(two["weightsBytes"] - weights) < MiB
        dropped = rss - resident().rss
        assert dropped > 0.6 * weights, f"RSS fell by {dropped / MiB:.1f} MiB of {weights / MiB:.1f}"
        assert two["rssFreedBytes"] > 0.6 * weights, two
        refused = complete(url, client, stream=True)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "sleeping"
        assert refused.headers["retry-after"] == str(max(1, math.ceil(woke["seconds"])))
        woke = client.post(f"{url}/wake_up").json()
        assert woke["level"] == 2 and abs(woke["weightsBytes"] - weights) < MiB  # reloaded
        assert text(complete(url, client)) == answer
        assert resident().rss > rss - weights // 2  # back in memory

        stats = client.get(f"{url}/v1/admin/stats").json()["sleep"]
        assert stats["sleeps"] == {"1": {"request": 1}, "2": {"request": 1}}
        assert stats["wakes"] == {"request": 2} and stats["lastWake"]["level"] == 2
        assert metric(url, "kubevram_worker_sleep_rss_freed_bytes") == two["rssFreedBytes"]
        assert metric(url, "kubevram_worker_wake_seconds") == woke["seconds"]
