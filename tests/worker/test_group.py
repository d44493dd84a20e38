"""One replica over several pods on the CPU: ``kubevram worker`` processes on 127.0.0.1 with gloo,
started as LeaderWorkerSet starts pods (the plan file the operator renders, and only LWS_LEADER_ADDRESS,
LWS_GROUP_SIZE and LWS_WORKER_INDEX), answer through the leader's HTTP API what one process answers
(greedy text, Chinese steering, stop strings, batching, cancellation, metrics), hold per rank what the
planner budgeted, and a killed rank turns the leader not ready and its answers 503 at once.

Two pods of one rank each (two pipeline stages), and two pods of two local ranks each (tensor parallel
2 x 2 pipeline stages, the pod's second process started by the first)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from group_helpers import TOKEN, Group, start_group, status, stop_group
from http_helpers import metric

SEQUENCE, BATCH = 64, 2
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    """Two pods of one rank each: two pipeline stages."""
    group = start_group(tiny_model_dir, tmp_path_factory.mktemp("group-2"), pods=2, gpus_per_pod=1,
                        sequence=SEQUENCE, batch=BATCH)
    yield group
    stop_group(group)


@pytest.fixture()
def single(make_worker: Any) -> Any:
    """The same model in one process, with the same serving limits."""
    return make_worker(max_batch_size=BATCH, max_sequence_length=SEQUENCE)


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": "the quick brown fox", "max_tokens": 24, **GREEDY}),
    ("/v1/completions", {"prompt": "hello world", "max_tokens": 24, "stop": ["s"], **GREEDY}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 16,
                              "chinese": {"alpha": 10000.0}, **GREEDY}),
    ("/v1/completions", {"prompt": "model", "max_tokens": 20, "ignore_eos": True, **GREEDY}),
]


def _answer(url: str, route: str, body: dict[str, Any]) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens); the model by the name each worker answers to."""
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    response = httpx.post(f"{url}{route}", json={"model": model, **body}, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    return text, choice["finish_reason"], response.json()["usage"]["completion_tokens"]


def test_the_leader_answers_what_one_process_answers(pipeline: Group, single: Any) -> None:
    for route, body in REQUESTS:
        assert _answer(pipeline.leader.url, route, body) == _answer(single.url, route, body), body
    # Two at once: one batch (continuous batching) on every rank, the same answers.
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda rb: _answer(pipeline.leader.url, *rb), REQUESTS[:2]))
    assert both == [_answer(single.url, *rb) for rb in REQUESTS[:2]]


def test_a_cancelled_stream_leaves_the_ranks_in_step(pipeline: Group, single: Any) -> None:
    url = pipeline.leader.url

    def cancelled() -> float:
        return metric(url, "kubevram_worker_sequences_finished_total", reason="cancelled") or 0.0

    before = cancelled()
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": "hello", "max_tokens": 59, "ignore_eos": True, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # the client goes away after the first piece
    deadline = time.monotonic() + 30
    while cancelled() <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled() == before + 1
    route, request = REQUESTS[0]
    assert _answer(url, route, request) == _answer(single.url, route, request)


def test_every_rank_holds_what_the_planner_budgeted(pipeline: Group) -> None:
    """Weights: exactly the plan's bytes per rank. KV cache: the plan budgets maxBatchSize sequences of
    maxSequenceLength tokens; one sequence of that length holds all its tokens but the last (never fed
    back): half of the plan's bytes, less one token in maxSequenceLength."""
    url = pipeline.leader.url
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": "model", "ignore_eos": True, **GREEDY}
    prompt = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 1}, timeout=60).json()
    full = {**body, "max_tokens": SEQUENCE - prompt["usage"]["prompt_tokens"]}
    answer = httpx.post(f"{url}/v1/completions", json=full, timeout=60).json()
    assert answer["usage"]["total_tokens"] == SEQUENCE
    stats = httpx.get(f"{pipeline.leader.admin}/v1/admin/stats",
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    ranks = stats["group"]["ranks"]
    planned = pipeline.replica["group"]["ranks"]
    assert [r["weightsBytes"] for r in ranks] == [r["weights"] for r in planned]
    assert [r["kvCachePeakBytes"] for r in ranks] == [
        r["kvCache"] // BATCH * (SEQUENCE - 1) // SEQUENCE for r in planned
    ]


def test_only_the_leader_serves(pipeline: Group) -> None:
    worker = pipeline.pods[1]
    assert status(worker) == 200
    model = httpx.get(f"{worker.url}/v1/models", timeout=30).json()["data"][0]["id"]
    response = httpx.post(f"{worker.url}/v1/completions", json={"model": model, "prompt": "hi"}, timeout=30)
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_leader"


def test_tensor_and_pipeline_parallel_over_two_pods_of_two(
    tiny_model_dir: Path, tmp_path: Path, single: Any
) -> None:
    group = start_group(tiny_model_dir, tmp_path, pods=2, gpus_per_pod=2, sequence=SEQUENCE, batch=BATCH)
    try:
        layout = group.replica["group"]
        assert (layout["tensorParallel"], layout["pipelineParallel"]) == (2, 2)
        route, body = REQUESTS[2]  # the chat template and the Chinese steering
        assert _answer(group.leader.url, route, body) == _answer(single.url, route, body)
        stats = httpx.get(f"{group.leader.admin}/v1/admin/stats",
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
        assert [r["weightsBytes"] for r in stats["group"]["ranks"]] == [r["weights"] for r in layout["ranks"]]
    finally:
        stop_group(group)


def test_a_killed_worker_rank_turns_the_leader_not_ready(pipeline: Group) -> None:
    """Last: it breaks the module's group."""
    worker = pipeline.pods[1]
    os.killpg(worker.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while status(pipeline.leader) != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    ready = httpx.get(f"{pipeline.leader.url}/readyz", timeout=5)
    assert ready.status_code == 503 and "rank 1 (pod 1)" in ready.json()["error"]
    route, body = REQUESTS[0]
    model = httpx.get(f"{pipeline.leader.url}/v1/models", timeout=30).json()["data"][0]["id"]
    response = httpx.post(f"{pipeline.leader.url}{route}", json={"model": model, **body}, timeout=30)
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_failed"
