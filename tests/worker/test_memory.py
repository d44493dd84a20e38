"""Memory statistics, the release procedure and the automatic-release policy on the CPU tiny model."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from http_helpers import Clock

from kubevram.api.v1alpha1 import MemoryReleaseSpec
from kubevram.api.workerplan import WorkerPlan
from kubevram.worker import memory
from kubevram.worker.engine import Engine, EngineError, SamplingParams
from kubevram.worker.memory import MemoryMonitor, model_devices, release_now, snapshot
from kubevram.worker.metrics import WorkerMetrics


@pytest.fixture
def engine_with(loaded):
    """``engine_with(monitor, max_batch_size=4)``: a started engine over the shared tiny model."""
    started: list[Engine] = []

    def make(monitor: MemoryMonitor | None = None, max_batch_size: int = 4) -> Engine:
        engine = Engine(
            loaded.model,
            loaded.tokenizer,
            max_batch_size=max_batch_size,
            token_classes=loaded.token_classes,
            eos_token_ids=loaded.eos_token_ids,
            hooks=monitor,
        )
        if monitor is not None:
            monitor.bind(engine)
        engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.stop()


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("gave up waiting")
        time.sleep(0.001)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_cpu_model_has_no_devices_and_snapshot_is_the_process(loaded):
    assert model_devices(loaded.model) == []
    shot = snapshot([])
    assert shot["devices"] == []
    assert shot["rssBytes"] > 50 * 2**20  # torch alone is bigger than this


async def test_release_runs_the_tiny_forward_and_reports_before_after(loaded, engine_with):
    engine = engine_with()
    seen: list[tuple[int, ...]] = []
    hook = loaded.model.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        result = await engine.run_between_steps(lambda: release_now(engine, [], "test"))
    finally:
        hook.remove()
    assert seen == [(1, 2)]  # one forward of two tokens
    assert result["reason"] == "test"
    assert result["before"]["devices"] == result["after"]["devices"] == []
    assert result["before"]["rssBytes"] > 0 and result["after"]["rssBytes"] > 0
    assert result["rssFreedBytes"] == result["before"]["rssBytes"] - result["after"]["rssBytes"]
    assert result["freedBytes"] == 0 and result["freedBytesByDevice"] == {}
    assert result["droppedRequests"] == 0
    assert result["engineStep"] == engine.steps


async def test_release_drops_the_rows_of_cancelled_requests_and_the_rest_finish(loaded, engine_with):
    engine = engine_with(max_batch_size=4)
    prompts = [loaded.tokenizer(p)["input_ids"] for p in ("hello world", "the quick brown fox", "kubernetes")]
    alone = [(await engine.submit(p, greedy(40)).result()).text for p in prompts]
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait()

    held = asyncio.ensure_future(engine.run_between_steps(hold))  # all three then join one batch
    await asyncio.to_thread(entered.wait)
    steps = engine.steps
    handles = [engine.submit(p, greedy(40)) for p in prompts]
    gate.set()
    await held
    await asyncio.to_thread(wait_until, lambda: engine.steps > steps)  # the batch has been prefilled

    def cancel_then_release() -> tuple[dict, int, int]:
        # Between two steps of the running batch: the client of the middle request goes away.
        assert engine._batch is not None and len(engine._batch.rows) == 3
        handles[1].cancel()
        result = release_now(engine, [], "test")
        cache_rows = engine._batch.cache.layers[0].keys.shape[0]
        return result, len(engine._batch.rows), cache_rows

    result, rows, cache_rows = await engine.run_between_steps(cancel_then_release)
    assert result["droppedRequests"] == 1
    assert rows == 2 and cache_rows == 2 and engine.running == 2
    first, third = await handles[0].result(), await handles[2].result()
    assert (first.text, third.text) == (alone[0], alone[2])
    assert first.completion_tokens == third.completion_tokens == 40


async def test_release_is_idempotent_and_generation_is_unchanged(loaded, engine_with):
    engine = engine_with()
    prompt = loaded.tokenizer("hello world")["input_ids"]
    before = (await engine.submit(prompt, greedy(24)).result()).text
    results = [await engine.run_between_steps(lambda: release_now(engine, [], "test")) for _ in range(3)]
    after = (await engine.submit(prompt, greedy(24)).result()).text
    assert before == after
    for result in results:
        assert set(result) >= {"before", "after", "freedBytes", "rssFreedBytes", "seconds", "engineStep"}
        assert result["droppedRequests"] == 0


async def test_monitor_release_needs_a_model_and_records_the_last_release(engine_with):
    monitor = MemoryMonitor(inner=WorkerMetrics())
    with pytest.raises(EngineError) as info:
        await monitor.release()
    assert info.value.status == 503
    engine_with(monitor)
    result = await monitor.release("request")
    assert monitor.last_release == {
        "time": result["time"],
        "reason": "request",
        "freedBytes": result["freedBytes"],
        "rssFreedBytes": result["rssFreedBytes"],
        "seconds": result["seconds"],
    }
    assert monitor.releases == {"request": 1}
    assert monitor.changed.is_set()
    stats = monitor.stats()
    assert stats["ready"] is True and stats["devices"] == [] and stats["samples"] == []
    assert stats["lastRelease"] == monitor.last_release
    assert stats["rssBytes"] > 0


async def test_monitor_forwards_hooks_to_the_metrics(loaded, engine_with):
    metrics = WorkerMetrics()
    engine = engine_with(MemoryMonitor(inner=metrics))
    await engine.submit(loaded.tokenizer("hello")["input_ids"], greedy(5)).result()
    await engine.run_between_steps(lambda: None)  # a barrier: the last step's hooks have run
    assert metrics.registry.get_sample_value("kubevram_worker_prompt_tokens_total") > 0
    assert metrics.registry.get_sample_value("kubevram_worker_generation_tokens_total") == 5
    finished = {"reason": "length"}
    assert metrics.registry.get_sample_value("kubevram_worker_sequences_finished_total", finished) == 1


async def test_idle_release_once_per_idle_period(loaded, engine_with):
    clock = Clock()
    monitor = MemoryMonitor(inner=WorkerMetrics(), policy=MemoryReleaseSpec(idleSeconds=300), clock=clock)
    engine = engine_with(monitor)
    assert monitor.due() is None
    clock.now += 299
    assert monitor.due() is None
    clock.now += 1
    assert monitor.due() == "idle"
    result = await monitor.check()
    assert result is not None and result["reason"] == "idle"
    clock.now += 1000
    assert monitor.due() is None  # released once; nothing happened since
    await engine.submit(loaded.tokenizer("hello")["input_ids"], greedy(3)).result()
    await engine.run_between_steps(lambda: None)  # a barrier: the step that finished it is over
    assert monitor.due() is None  # the activity restarted the idle clock
    clock.now += 300
    assert monitor.due() == "idle"
    assert await monitor.check() is not None
    assert monitor.releases == {"idle": 2}


async def test_idle_zero_disables_and_cpu_has_no_watermark(engine_with):
    clock = Clock()
    monitor = MemoryMonitor(
        inner=WorkerMetrics(), policy=MemoryReleaseSpec(idleSeconds=0, highWatermark=0.01), clock=clock
    )
    engine_with(monitor)
    clock.now += 10**6
    assert monitor.due() is None
    assert await monitor.check() is None


def test_monitor_takes_budgets_and_policy_from_the_plan():
    plan = WorkerPlan.parse(
        {
            "deployment": {"name": "d", "namespace": "ai"},
            "model": {"id": "m"},
            "memoryRelease": {"idleSeconds": 60, "highWatermark": 0.8},
            "maxMemory": {"0": 20 * 2**30, "1": 22 * 2**30, "cpu": 64 * 2**30},
        }
    )
    monitor = MemoryMonitor.for_plan(WorkerMetrics(), plan)
    assert monitor.budgets == {0: 20 * 2**30, 1: 22 * 2**30}
    assert monitor.policy.idleSeconds == 60 and monitor.policy.highWatermark == 0.8
    assert MemoryMonitor.for_plan(WorkerMetrics(), None).policy == MemoryReleaseSpec()


def test_samples_keep_the_largest_peak_per_size_and_the_latest_sizes():
    monitor = MemoryMonitor(max_samples=3)
    for tokens, peak in [(10, 100), (20, 200), (10, 90), (30, 300), (10, 120), (40, 400)]:
        monitor._add_sample(memory.Sample(tokens, 1, peak, 50))
    kept = [(s["tokens"], s["peakAllocatedBytes"]) for s in monitor.samples()]
    assert kept == [(10, 120), (30, 300), (40, 400)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_stats_on_cuda():  # runs in the GPU tier's environment; skipped on CPU
    torch.zeros(1, device="cuda")
    stats = memory.device_stats(0)
    assert set(memory.TORCH_STATS) <= set(stats)
    assert stats["totalBytes"] > 0
