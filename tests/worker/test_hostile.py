"""The worker under hostile or careless input, through a real HTTP server: no request can hurt another,
the event loop never waits on a request's preparation, memory stays bounded, every error is OpenAI's."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading

import httpx
import psutil
import pytest
from http_helpers import metric, scrape, wait_for

# What the 50 MB body may add to the process's resident memory while it is refused (it took RSS
# from 0.4 GiB to a 10 GiB peak before the limit).
RSS_BOUND = 64 * 2**20


def post(worker, path: str = "/v1/completions", **kw) -> httpx.Response:
    return httpx.post(f"{worker.url}{path}", timeout=60, **kw)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def counted(worker, status: int, endpoint: str = "/v1/completions") -> float:
    return worker.metric("kubevram_worker_requests_total", {"endpoint": endpoint, "status": str(status)})


# ---- 1. size and the event loop -----------------------------------------------------------------


def test_a_50_mb_body_is_refused_while_healthz_answers_and_rss_stays_bounded(make_worker):
    worker = make_worker(max_sequence_length=512)  # a body limit of 64 KiB + 512 x 64 B = 96 KiB
    process = psutil.Process()
    base = process.memory_info().rss
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(process.memory_info().rss)
            done.wait(0.005)

    megabyte = b"a" * 2**20

    def body():  # 50 MB, streamed (no Content-Length): the limit must hold while reading
        yield b'{"prompt": "'
        for _ in range(50):
            yield megabyte
        yield b'"}'

    async def run() -> tuple[httpx.Response, list[int]]:
        async with httpx.AsyncClient(base_url=worker.url, timeout=60) as client:
            big = asyncio.ensure_future(asyncio.to_thread(post, worker, content=body()))
            health = []
            while not big.done() or not health:
                health.append((await client.get("/healthz")).status_code)
            return await big, health

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response, health = asyncio.run(run())
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 413, response.text
    error = error_of(response)
    assert error["code"] == "request_too_large"
    assert "larger than 98304 bytes" in error["message"]
    assert set(health) == {200}
    assert max(peak) - base < RSS_BOUND, f"RSS grew by {(max(peak) - base) / 2**20:.0f} MiB"
    # A declared Content-Length past the limit is refused without reading the body.
    declared = post(worker, content=json.dumps({"prompt": "a" * 200_000}).encode())
    assert declared.status_code == 413
    assert counted(worker, 413) == 2


def test_preparation_runs_off_the_event_loop(make_worker, gate_tokenizer):
    gate, blocked, calls = gate_tokenizer
    worker = make_worker()

    async def run() -> tuple[int, int, httpx.Response]:
        async with httpx.AsyncClient(base_url=worker.url, timeout=20) as client:
            slow = asyncio.ensure_future(
                client.post("/v1/completions", json={"prompt": "BLOCK hello", "max_tokens": 2})
            )
            await asyncio.to_thread(blocked.wait, 20)
            # The prompt is being tokenised (held): the loop still answers, and queues other work.
            health = (await client.get("/healthz")).status_code
            ready = (await client.get("/readyz")).status_code
            gate.set()
            return health, ready, await slow

    health, ready, slow = asyncio.run(run())
    assert (health, ready) == (200, 200)
    assert slow.status_code == 200, slow.text
    assert calls and all(name.startswith("kubevram-prepare") for name in calls)


def test_a_prompt_too_long_in_characters_is_refused_before_tokenising(make_worker, gate_tokenizer):
    _, _, calls = gate_tokenizer
    worker = make_worker(max_sequence_length=512)
    longest = max(len(piece) for piece in worker.engine.tokenizer.get_vocab())
    response = post(worker, json={"prompt": "a" * (512 * longest + 1)})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "context_length_exceeded"
    assert (
        f"cannot fit in 512 tokens (serving.maxSequenceLength; the longest token of this model has {longest}"
        in (error["message"])
    )
    assert calls == []
    chat = post(
        worker, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * 512 * longest}]}
    )
    assert chat.status_code == 400, chat.text
    assert error_of(chat)["param"] == "messages"
    assert calls == []


# ---- 2. one request cannot fail the others --------------------------------------------------------

VALID = {"prompt": "hello world", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def _seven_and_one(worker, poison_body: dict) -> tuple[list[httpx.Response], httpx.Response]:
    """Seven valid requests and one poisonous one, queued while the engine is held so that they are
    prefilled and decoded in one group."""
    gate = threading.Event()

    async def run():
        held = asyncio.ensure_future(worker.engine.run_between_steps(gate.wait))
        async with httpx.AsyncClient(base_url=worker.url, timeout=60) as client:
            valid = [asyncio.ensure_future(client.post("/v1/completions", json=VALID)) for _ in range(7)]
            await asyncio.to_thread(wait_for, lambda: worker.engine.queue_depth == 7, "7 queued requests")
            # json.dumps writes inf as Infinity, as a careless client would (httpx's json= refuses it)
            content = json.dumps(poison_body).encode()
            poison = asyncio.ensure_future(client.post("/v1/completions", content=content))
            await asyncio.to_thread(
                wait_for, lambda: worker.engine.queue_depth == 8 or poison.done(), "the poison to queue"
            )
            gate.set()
            await held
            return list(await asyncio.gather(*valid)), await poison

    try:
        return asyncio.run(run())
    finally:
        gate.set()


@pytest.mark.parametrize(
    ("poison", "status", "param"),
    [
        ({"temperature": 1e-300}, 200, None),  # below 1e-5: greedy
        ({"temperature": 5e-324}, 200, None),
        ({"temperature": 1.0, "top_p": 1e-300}, 400, "top_p"),
        ({"temperature": 1.0, "top_p": 5e-324}, 400, "top_p"),
        ({"repetition_penalty": 1e-300}, 400, "repetition_penalty"),
        ({"repetition_penalty": 5e-324}, 400, "repetition_penalty"),
        ({"chinese": {"alpha": 1e39}}, 400, "chinese.alpha"),
        ({"chinese": {"alpha": float("inf")}}, 400, "chinese.alpha"),
        ({"temperature": 1.0, "seed": 2**64}, 400, "seed"),
    ],
)
def test_one_poisonous_request_in_a_batch_of_eight_leaves_seven_200s(make_worker, poison, status, param):
    worker = make_worker(max_batch_size=8)
    valid, bad = _seven_and_one(worker, {**VALID, **poison})
    assert [r.status_code for r in valid] == [200] * 7, [r.text for r in valid]
    assert {r.json()["usage"]["completion_tokens"] for r in valid} == {4}
    assert bad.status_code == status, bad.text
    if status != 200:
        assert error_of(bad)["param"] == param
        fragment = {"seed": "must be <= 18446744073709551615"}.get(param, "float32")
        if poison.get("chinese", {}).get("alpha") == float("inf"):
            fragment = "finite number"
        assert fragment in error_of(bad)["message"]


def test_the_engine_fails_only_the_row_whose_sampling_fails(make_worker, loaded, monkeypatch):
    """The second line: parameters that slip past validation (here submitted to the engine directly)
    fail their own request; the seven others in the same batch finish in the same steps, unchanged,
    and no garbage collection stalls them."""
    from kubevram.worker.engine import SamplingParams

    worker = make_worker(max_batch_size=8)
    alone = post(worker, json=VALID).json()["choices"][0]["text"]
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or 0)
    gate = threading.Event()
    prompt = loaded.tokenizer("hello world")["input_ids"]

    async def run():
        held = asyncio.ensure_future(worker.engine.run_between_steps(gate.wait))
        async with httpx.AsyncClient(base_url=worker.url, timeout=60) as client:
            valid = [asyncio.ensure_future(client.post("/v1/completions", json=VALID)) for _ in range(7)]
            await asyncio.to_thread(wait_for, lambda: worker.engine.queue_depth == 7, "7 queued requests")
            poison = worker.engine.submit(prompt, SamplingParams(max_tokens=4, temperature=5e-324))
            gate.set()
            await held
            return list(await asyncio.gather(*valid)), [o async for o in poison]

    try:
        valid, outputs = asyncio.run(run())
    finally:
        gate.set()
    assert [r.status_code for r in valid] == [200] * 7
    assert {r.json()["choices"][0]["text"] for r in valid} == {alone}
    assert len(outputs) == 1 and outputs[0].error is not None and outputs[0].error.status == 500
    assert "temperature" in outputs[0].error.message
    assert collections == []
    assert worker.metric("kubevram_worker_sequences_finished_total", {"reason": "error"}) == 1


def test_a_prefill_that_fails_fails_only_the_request_that_makes_it_fail(make_worker, loaded):
    """A group whose prefill fails is prefilled again one request at a time: only the culprit fails."""
    worker = make_worker(max_batch_size=8)
    poison_id = 777

    def refuse(module, args):
        if bool((args[0] == poison_id).any()):
            raise RuntimeError(f"token {poison_id} breaks this model")

    hook = loaded.model.model.embed_tokens.register_forward_pre_hook(refuse)
    try:
        valid, bad = _seven_and_one(worker, {**VALID, "prompt": [5, poison_id, 6]})
    finally:
        hook.remove()
    assert [r.status_code for r in valid] == [200] * 7, [r.text for r in valid]
    assert bad.status_code == 500
    assert "token 777 breaks this model" in error_of(bad)["message"]
    assert worker.metric("kubevram_worker_sequences_finished_total", {"reason": "error"}) == 1


# ---- 3. every error OpenAI's, counted -----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"prompt": "hi", "response_format": ' + b"[" * 5000 + b"]" * 5000 + b"}", "recursion limit"),
        (b'{"prompt": "' + b"\\ud800" + b'"}', "hex escape"),  # a lone surrogate is no text
        (b'{"prompt": "\xff"}', "not JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
    ],
)
def test_bodies_that_broke_the_parser_are_400s(worker, content, fragment):
    before = counted(worker, 400)
    response = post(worker, content=content)
    assert response.status_code == 400, response.text
    assert fragment in error_of(response)["message"]
    assert counted(worker, 400) == before + 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": [False]}, "prompt"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
        ({"prompt": "hi", "max_tokens": 2.0}, "max_tokens"),
    ],
)
def test_types_are_strict(worker, body, param):
    response = post(worker, json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_a_chat_template_that_raises_is_a_400_naming_its_message(make_worker, loaded):
    worker = make_worker()
    template = loaded.tokenizer.chat_template
    loaded.tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    try:
        response = post(
            worker,
            "/v1/chat/completions",
            json={"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
        )
    finally:
        loaded.tokenizer.chat_template = template
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert "Conversation roles must alternate user/assistant" in error["message"]
    assert error["param"] == "messages"
    assert counted(worker, 400, "/v1/chat/completions") == 1


def test_an_unexpected_error_is_an_openai_500_counted_and_logged_in_one_line(make_worker, caplog):
    worker = make_worker()

    def broken(*args, **kwargs):
        raise KeyError("nobody expected this")

    worker.state.sampling_params = broken
    response = post(worker, json={"prompt": "hi"})
    assert response.status_code == 500
    assert error_of(response)["code"] == "internal_error"
    assert counted(worker, 500) == 1
    failures = [r for r in caplog.records if "failed: KeyError" in r.getMessage()]
    assert failures and all(r.exc_info is None for r in failures)


def test_a_client_that_leaves_in_the_middle_of_its_body_is_not_a_server_error(make_worker, caplog):
    """Counted as 499 (the client went away), like the other clients that leave; it was a 500 and an
    ERROR line each, so that a 5xx alert fired for clients that give up an upload."""
    worker = make_worker()
    with socket.create_connection(("127.0.0.1", worker.server.config.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: worker\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"prompt": "hel'
        )
    wait_for(lambda: counted(worker, 499) + counted(worker, 500) > 0, "the request to be answered")
    assert (counted(worker, 499), counted(worker, 500)) == (1, 0)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_405_keeps_the_allow_header(worker):
    response = httpx.get(f"{worker.url}/v1/completions")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert error_of(response)["type"] == "invalid_request_error"


# ---- 4. cancelled requests leave the queue; one reason per request ------------------------------


def test_cancelled_requests_leave_the_queue_at_once(make_worker):
    worker = make_worker(max_batch_size=1, max_queue=4)
    gate = threading.Event()
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "stream": True}

    async def run() -> list[str]:
        held = asyncio.ensure_future(worker.engine.run_between_steps(gate.wait))
        async with httpx.AsyncClient(base_url=worker.url, timeout=30) as client:
            for _ in range(4):  # four clients that give up while their requests wait
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
            await asyncio.to_thread(
                wait_for, lambda: worker.engine.queue_depth == 0, "the cancelled requests to leave the queue"
            )
            assert worker.metric("kubevram_worker_queue_depth") == 0
            # The queue has room again while the engine is still held.
            async with client.stream("POST", "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200
                gate.set()
                await held
                return [line async for line in waiting.aiter_lines() if line.startswith("data: ")]

    try:
        events = asyncio.run(run())
    finally:
        gate.set()
    assert events[-1] == "data: [DONE]"
    finished = {
        reason: worker.metric("kubevram_worker_sequences_finished_total", {"reason": reason})
        for reason in ("stop", "length", "cancelled", "error")
    }
    assert finished["cancelled"] == 4
    assert sum(finished.values()) == 5  # exactly one reason per request


# ---- 5. a dead engine -----------------------------------------------------------------------------


class _Fatal(BaseException):
    """Not an ``Exception``: nothing in a step catches it, so it ends the engine's thread."""


def test_when_the_engine_thread_dies_readiness_fails_and_waiting_requests_get_503(make_worker, loaded):
    worker = make_worker(max_batch_size=1)
    gate, blocked = threading.Event(), threading.Event()

    def die(module, args):
        blocked.set()
        gate.wait(30)
        raise _Fatal("the CUDA context is gone")

    hook = loaded.model.model.embed_tokens.register_forward_pre_hook(die)

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=worker.url, timeout=30) as client:
            running = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": "hi"}))
            await asyncio.to_thread(blocked.wait, 30)
            waiting = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": "hello"}))
            await asyncio.to_thread(wait_for, lambda: worker.engine.queue_depth == 1, "a waiting request")
            gate.set()
            return await running, await waiting

    try:
        running, waiting = asyncio.run(run())
    finally:
        gate.set()
        hook.remove()
    for response in (running, waiting):
        assert response.status_code == 503, response.text
        assert error_of(response)["code"] == "engine_failed"
    ready = httpx.get(f"{worker.url}/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "failed", "error": "_Fatal: the CUDA context is gone"}
    later = post(worker, json={"prompt": "hi"})
    assert later.status_code == 503
    assert "the engine has stopped" in error_of(later)["message"]
    assert httpx.get(f"{worker.url}/healthz").status_code == 200  # the process lives: the probe decides
    assert worker.metric("kubevram_worker_ready") == 0
    # Every request has ended: the gateway's gauges say so (the one being prefilled stayed "running").
    samples = scrape(worker.url)
    assert metric(samples, "vllm:num_requests_running") == 0
    assert metric(samples, "vllm:num_requests_waiting") == 0
    assert metric(samples, "vllm:kv_cache_usage_perc") == 0
