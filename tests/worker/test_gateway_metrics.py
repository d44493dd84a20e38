"""The gauges an Inference Gateway's endpoint picker reads, with vLLM's names, over real HTTP under
concurrent load: they move as requests queue, run and finish (states observed, nothing timed)."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from http_helpers import Pause, metric, scrape, wait_for

LONG = {"prompt": "hello world", "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stream": True}
LABELS = {"model_name": "tiny", "engine": "0"}


def bytes_per_position(loaded) -> float:
    """Ground truth from transformers: the bytes a real ``past_key_values`` holds per position after a
    forward of 7 tokens through the tiny model."""
    from transformers import DynamicCache

    cache = DynamicCache(config=loaded.model.config)
    with torch.inference_mode():
        loaded.model(input_ids=torch.arange(3, 10)[None], use_cache=True, cache=cache)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return held / 7


class Stream:
    """A streaming completion in a thread: ``first`` is set once its first event has arrived."""

    def __init__(self, url: str) -> None:
        self.first = threading.Event()
        self.events: list[str] = []
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=LONG, timeout=120) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    self.first.set()
        self.first.set()

    def finish(self) -> list[str]:
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.events


def gauges(url: str) -> tuple[float | None, float | None, float | None]:
    """Waiting, running, KV cache usage: one scrape."""
    samples = scrape(url)
    return (
        metric(samples, "vllm:num_requests_waiting", **LABELS),
        metric(samples, "vllm:num_requests_running", **LABELS),
        metric(samples, "vllm:kv_cache_usage_perc", **LABELS),
    )


@pytest.mark.parametrize("planned", [None, 3_000_000], ids=["no plan", "planned budget"])
def test_gauges_move_as_requests_queue_run_and_finish(make_worker, loaded, planned):
    worker = make_worker(max_batch_size=2, max_sequence_length=512, kv_cache_budget_bytes=planned)
    engine, url = worker.engine, worker.url
    per_position = bytes_per_position(loaded)
    # The plan's kvCacheBytes; without one, maxBatchSize x maxSequenceLength positions.
    budget = planned if planned is not None else 2 * 512 * per_position

    assert gauges(url) == (0, 0, 0)
    ((info, one),) = scrape(url)["vllm:cache_config_info"]
    assert one == 1
    assert info == {
        "block_size": "1",
        "cache_dtype": "float32",
        "enable_prefix_caching": "False",
        "engine": "0",
        "kv_cache_memory_bytes": str(int(budget)),
        "num_gpu_blocks": str(int(budget // per_position)),
    }

    first = Pause(engine).wait()  # the loop holds between two steps: what arrives waits
    running = [Stream(url) for _ in range(2)]
    wait_for(lambda: gauges(url) == (2, 0, 0), "two requests waiting")
    taken = Pause(engine)  # the next turn takes both from the queue, then holds before their prefill
    first.resume()
    taken.wait()
    assert gauges(url) == (0, 2, 0)
    prefilled = Pause(engine)  # the turn after: prefilled, a batch of two with their KV cache
    taken.resume()
    prefilled.wait()
    waiting = [Stream(url) for _ in range(3)]  # no room: they wait
    wait_for(lambda: gauges(url)[0] == 3, "three more requests waiting")
    waiting_now, running_now, usage = gauges(url)
    assert (waiting_now, running_now) == (3, 2)
    rows, columns = engine._batch.input_ids.shape
    held = rows * (columns - 1) * per_position  # the cache holds every column but the last
    assert usage == pytest.approx(held / budget)
    assert 0 < usage < 1
    prefilled.resume()
    for stream in running + waiting:
        events = stream.finish()
        assert stream.status == 200 and events[-1] == "[DONE]"
        assert '"finish_reason":"length"' in events[-2].replace(" ", "")  # none lost, each to its end
    wait_for(lambda: gauges(url) == (0, 0, 0), "every gauge back to 0")
