"""The OpenAI-compatible API through a real HTTP server on the tiny random Llama with a CJK tokenizer."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
import torch
from http_helpers import sse_events, wait_for

from kubevram.api.v1alpha1 import ChineseSpec, GenerationSpec
from kubevram.worker.logits import classify_text, is_punctuation
from kubevram.worker.service import WorkerState

# With a random model the logits carry no preference for Chinese, so the tests steer hard:
# alpha = 1e4 adds log(1e4) ~ 9.2 to every CJK, punctuation and EOS logit.
STRONG = {"alpha": 1e4}
PROMPTS = ["hello world", "the quick brown fox", "asks a question about memory", "kubernetes clusters"]


def cjk_share(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(1 for c in chars if any(classify_text(c))) / len(chars)


def complete(worker, **body):
    return httpx.post(f"{worker.url}/v1/completions", json={"temperature": 0, **body}, timeout=60)


def test_health_ready_models(worker):
    assert httpx.get(f"{worker.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{worker.url}/readyz").status_code == 200
    models = httpx.get(f"{worker.url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == 512


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chinese_on_steers_greedy_output_and_off_does_not(worker, prompt):
    on = complete(worker, prompt=prompt, max_tokens=32, chinese=STRONG, seed=7)
    off = complete(worker, prompt=prompt, max_tokens=32, chinese=False, seed=7)
    assert on.status_code == 200, on.text
    text_on = on.json()["choices"][0]["text"]
    text_off = off.json()["choices"][0]["text"]
    assert text_on.strip(), "steered output is empty"
    assert cjk_share(text_on) >= 0.9, text_on
    assert not is_punctuation(text_on.strip()[0]), text_on
    assert cjk_share(text_off) < 0.9, text_off


def test_leading_punctuation_is_suppressed_only_when_asked(worker):
    # Strongly steered, the greedy first token for this prompt is punctuation ('"'); suppression forbids it
    # for the first token only (punctuation still appears later).
    firsts, texts = {}, {}
    for suppress in (False, True):
        chinese = {**STRONG, "suppressLeadingPunctuation": suppress}
        response = complete(worker, prompt="kubernetes clusters", max_tokens=16, chinese=chinese)
        assert response.status_code == 200, response.text
        texts[suppress] = response.json()["choices"][0]["text"]
        assert cjk_share(texts[suppress]) >= 0.9
        firsts[suppress] = texts[suppress].strip()[0]
    assert is_punctuation(firsts[False]), texts
    assert not is_punctuation(firsts[True]), texts


def test_chat_completion_is_steered(worker):
    body = {
        "messages": [{"role": "user", "content": "你好！"}],
        "max_tokens": 16,
        "temperature": 0,
        "chinese": STRONG,
    }
    payload = httpx.post(f"{worker.url}/v1/chat/completions", json=body, timeout=60).json()
    assert payload["object"] == "chat.completion"
    message = payload["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert cjk_share(message["content"]) >= 0.9
    off = httpx.post(f"{worker.url}/v1/chat/completions", json={**body, "chinese": False}, timeout=60).json()
    assert cjk_share(off["choices"][0]["message"]["content"]) < 0.9


def test_deployment_default_applies_and_request_overrides(make_worker):
    steered = GenerationSpec(chinese=ChineseSpec(enabled=True, alpha=1e4))
    worker = make_worker(generation=steered)
    default = complete(worker, prompt="hello world", max_tokens=24).json()["choices"][0]["text"]
    off = complete(worker, prompt="hello world", max_tokens=24, chinese=False).json()["choices"][0]["text"]
    assert cjk_share(default) >= 0.9
    assert cjk_share(off) < 0.9


def test_usage_is_counted(worker, loaded):
    prompt = "the quick brown fox"
    payload = complete(worker, prompt=prompt, max_tokens=5, ignore_eos=True).json()
    prompt_tokens = len(loaded.tokenizer(prompt)["input_ids"])
    assert payload["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
    }
    assert payload["choices"][0]["finish_reason"] == "length"
    assert payload["object"] == "text_completion"


def test_token_id_prompts_and_echo(worker, loaded):
    ids = loaded.tokenizer("the quick brown fox")["input_ids"]
    by_text = complete(worker, prompt="the quick brown fox", max_tokens=6, ignore_eos=True).json()
    by_ids = complete(worker, prompt=ids, max_tokens=6, ignore_eos=True).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"] == by_text["usage"]
    echoed = complete(worker, prompt="the quick brown fox", max_tokens=6, ignore_eos=True, echo=True).json()
    assert echoed["choices"][0]["text"] == "the quick brown fox" + by_text["choices"][0]["text"]


def test_chat_without_a_template_is_refused(make_worker, loaded):
    worker = make_worker()
    template, loaded.tokenizer.chat_template = loaded.tokenizer.chat_template, None
    try:
        response = httpx.post(
            f"{worker.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
    finally:
        loaded.tokenizer.chat_template = template
    assert response.status_code == 400
    assert "no chat template" in response.json()["error"]["message"]


def test_streaming_matches_the_whole_answer(worker):
    whole = complete(worker, prompt="hello world", max_tokens=20, ignore_eos=True).json()
    with httpx.stream(
        "POST",
        f"{worker.url}/v1/completions",
        timeout=60,
        json={
            "prompt": "hello world",
            "max_tokens": 20,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == whole["usage"]
    assert len(chunks) > 3  # incremental, not one piece


def test_chat_streaming(worker):
    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "chinese": STRONG,
    }
    with httpx.stream("POST", f"{worker.url}/v1/chat/completions", json=body, timeout=60) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert cjk_share(content) >= 0.9


def test_stop_strings_cut_the_text_in_whole_and_streamed_answers(worker):
    full = complete(worker, prompt="hello world", max_tokens=24, chinese=STRONG, ignore_eos=True)
    text = full.json()["choices"][0]["text"]
    stop = text[5:7]
    cut = complete(worker, prompt="hello world", max_tokens=24, chinese=STRONG, ignore_eos=True, stop=[stop])
    choice = cut.json()["choices"][0]
    assert choice["text"] == text[: text.index(stop)]
    assert choice["finish_reason"] == "stop"
    body = {
        "prompt": "hello world",
        "max_tokens": 24,
        "temperature": 0,
        "chinese": STRONG,
        "ignore_eos": True,
        "stop": stop,
        "stream": True,
    }
    with httpx.stream("POST", f"{worker.url}/v1/completions", json=body, timeout=60) as response:
        chunks = [json.loads(e) for e in sse_events(response)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


def test_seeds_reproduce_sampling_alone_and_in_a_batch(worker):
    body = {"prompt": "hello world", "max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "ignore_eos": True}
    alone = complete(worker, **body, seed=123).json()["choices"][0]["text"]
    again = complete(worker, **body, seed=123).json()["choices"][0]["text"]
    other = complete(worker, **body, seed=124).json()["choices"][0]["text"]
    assert alone == again
    assert alone != other

    async def batch() -> list[str]:
        async with httpx.AsyncClient(base_url=worker.url, timeout=60) as client:
            seeds = [123, 5, 6, 7]
            responses = await asyncio.gather(
                *[client.post("/v1/completions", json={**body, "seed": s}) for s in seeds]
            )
        return [r.json()["choices"][0]["text"] for r in responses]

    assert (asyncio.run(batch()))[0] == alone


def test_repetition_penalty_changes_greedy_output(worker):
    plain = complete(worker, prompt="hello", max_tokens=24, ignore_eos=True).json()["choices"][0]["text"]
    penalised = complete(
        worker, prompt="hello", max_tokens=24, ignore_eos=True, repetition_penalty=5.0
    ).json()["choices"][0]["text"]
    assert plain != penalised


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        ({"prompt": "hi", "max_tokens": 600}, 400, "max_tokens", "maximum context length is 512 tokens"),
        ({"prompt": "hi", "bogus": 1}, 400, "bogus", "bogus: unknown field"),
        ({"prompt": "hi", "temperature": 3}, 400, "temperature", "temperature: 3 must be <= 2"),
        ({"prompt": "hi", "chinese": {"alpha": 0}}, 400, "chinese.alpha", "must be > 0"),
        ({"prompt": "hi", "model": "gpt-4"}, 404, "model", "The model 'gpt-4' does not exist"),
        ({"prompt": "hi", "presence_penalty": 1}, 400, "presence_penalty", "use repetition_penalty"),
        ({"max_tokens": 3}, 400, "prompt", "prompt: is required"),
        ({"prompt": [5, 10_000]}, 400, "prompt", "outside [0, 900)"),
    ],
)
def test_errors_in_openai_format(worker, body, status, param, fragment):
    response = httpx.post(f"{worker.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]
    assert error["param"] == param


def test_malformed_body_and_unknown_route(worker):
    response = httpx.post(f"{worker.url}/v1/completions", content=b"{nope", timeout=30)
    assert response.status_code == 400
    assert "not JSON" in response.json()["error"]["message"]
    missing = httpx.get(f"{worker.url}/v1/nothing", timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


def test_not_ready_answers_503(serve):
    waiting = serve(WorkerState(model_names=["tiny"]))
    assert httpx.get(f"{waiting.url}/healthz").status_code == 200
    ready = httpx.get(f"{waiting.url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "loading"
    response = httpx.post(f"{waiting.url}/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_loading"
    assert response.headers["retry-after"] == "5"


def test_concurrent_requests_are_batched_and_all_answered(make_worker, loaded):
    worker = make_worker(max_batch_size=4, max_queue=64)
    gate = threading.Event()
    batch_sizes: list[int] = []
    hook = loaded.model.model.embed_tokens.register_forward_pre_hook(
        lambda module, args: batch_sizes.append(args[0].shape[0])
    )

    def body(i: int) -> dict:
        return {"prompt": PROMPTS[i % 4], "max_tokens": 6 + i % 3, "temperature": 0, "ignore_eos": True}

    async def run() -> list[httpx.Response]:
        # Hold the engine between two steps so that all 16 requests queue, then let it go.
        held = asyncio.ensure_future(worker.engine.run_between_steps(gate.wait))
        async with httpx.AsyncClient(base_url=worker.url, timeout=120) as client:
            posts = [asyncio.ensure_future(client.post("/v1/completions", json=body(i))) for i in range(16)]
            await asyncio.to_thread(wait_for, lambda: worker.engine.queue_depth == 16, "16 queued requests")
            gate.set()
            await held
            return list(await asyncio.gather(*posts))

    try:
        responses = asyncio.run(run())
    finally:
        hook.remove()
    assert [r.status_code for r in responses] == [200] * 16
    assert [r.json()["usage"]["completion_tokens"] for r in responses] == [6 + i % 3 for i in range(16)]
    # Batched up to the limit, never past it; requests joined as others finished.
    assert max(batch_sizes) == 4
    assert worker.metric("kubevram_worker_batch_size_sum") == 16
    assert (
        worker.metric("kubevram_worker_requests_total", {"endpoint": "/v1/completions", "status": "200"})
        == 16
    )
    # Every greedy answer, batched or joined mid-flight, equals the answer to the same request alone.
    for i, response in enumerate(responses):
        alone = complete(worker, **body(i)).json()["choices"][0]["text"]
        assert response.json()["choices"][0]["text"] == alone, i


def test_a_request_joins_a_running_batch(make_worker, loaded):
    worker = make_worker(max_batch_size=4)
    long_body = {"prompt": "the quick brown fox", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    short_body = {"prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    alone_long = complete(worker, **long_body).json()["choices"][0]["text"]
    alone_short = complete(worker, **short_body).json()["choices"][0]["text"]
    gate, blocked = threading.Event(), threading.Event()
    gate.set()
    calls = []

    def hold(module, args):
        calls.append(tuple(args[0].shape))  # the input ids: (batch, tokens)
        if not gate.is_set():
            blocked.set()
            gate.wait()

    hook = loaded.model.model.embed_tokens.register_forward_pre_hook(hold)

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=worker.url, timeout=120) as client:
            first = asyncio.ensure_future(client.post("/v1/completions", json=long_body))
            await asyncio.to_thread(wait_for, lambda: worker.engine.steps > 3, "the long request to run")
            gate.clear()
            await asyncio.to_thread(blocked.wait, 30)
            second = asyncio.ensure_future(client.post("/v1/completions", json=short_body))
            await asyncio.to_thread(
                wait_for, lambda: worker.engine.queue_depth == 1, "the short one to queue"
            )
            gate.set()
            return await first, await second

    try:
        long_response, short_response = asyncio.run(run())
    finally:
        gate.set()
        hook.remove()
    assert long_response.json()["choices"][0]["text"] == alone_long
    assert short_response.json()["choices"][0]["text"] == alone_short
    # The short request's prefill ran alone, then decode steps carried both rows.
    assert (2, 1) in calls


def test_queue_full_answers_429_with_retry_after(make_worker):
    worker = make_worker(max_batch_size=1, max_queue=2)
    gate = threading.Event()

    async def run() -> tuple[list[httpx.Response], httpx.Response]:
        held = asyncio.ensure_future(worker.engine.run_between_steps(gate.wait))
        async with httpx.AsyncClient(base_url=worker.url, timeout=60) as client:
            body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
            queued = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(2)]
            await asyncio.to_thread(wait_for, lambda: worker.engine.queue_depth == 2, "2 queued requests")
            refused = await client.post("/v1/completions", json=body)
            gate.set()
            await held
            return list(await asyncio.gather(*queued)), refused

    queued, refused = asyncio.run(run())
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert [r.status_code for r in queued] == [200, 200]


def test_out_of_memory_fails_the_request_and_the_worker_keeps_serving(make_worker, loaded):
    worker = make_worker()
    layer = loaded.model.model.layers[0]
    raised = []

    def fail_once(module, args):
        if not raised:
            raised.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = layer.register_forward_pre_hook(fail_once)
    try:
        failed = complete(worker, prompt="hello", max_tokens=4)
    finally:
        handle.remove()
    assert failed.status_code == 503
    assert failed.json()["error"]["code"] == "out_of_memory"
    assert worker.engine.oom_count == 1
    assert worker.engine.running == 0
    assert worker.engine._batch is None  # the failed batch's cache and tensors are gone
    ok = complete(worker, prompt="hello", max_tokens=4)
    assert ok.status_code == 200
    assert worker.metric("kubevram_worker_oom_total") == 1
    assert worker.metric("kubevram_worker_sequences_finished_total", {"reason": "error"}) == 1


def test_out_of_memory_while_joining_fails_only_the_newcomer(make_worker, loaded):
    worker = make_worker(max_batch_size=4)
    long_body = {"prompt": "the quick brown fox", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    alone = complete(worker, **long_body).json()["choices"][0]["text"]
    armed = threading.Event()
    running_at_oom = []

    def oom_on_prefill(module, args):
        if armed.is_set() and args[0].shape[1] > 1:  # a prefill while the long request decodes
            armed.clear()
            running_at_oom.append(worker.engine.running)
            raise torch.OutOfMemoryError("CUDA out of memory")

    hook = loaded.model.model.embed_tokens.register_forward_pre_hook(oom_on_prefill)

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=worker.url, timeout=120) as client:
            first = asyncio.ensure_future(client.post("/v1/completions", json=long_body))
            await asyncio.to_thread(wait_for, lambda: worker.engine.running == 1, "the long request to run")
            armed.set()
            second = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5})
            return await first, second

    try:
        first, second = asyncio.run(run())
    finally:
        hook.remove()
    assert running_at_oom == [1]  # the newcomer was joining a running batch
    assert second.status_code == 503
    assert second.json()["error"]["code"] == "out_of_memory"
    assert first.status_code == 200
    assert first.json()["choices"][0]["text"] == alone


def test_out_of_memory_while_streaming_sends_an_error_event(make_worker, loaded):
    worker = make_worker()
    calls = []

    def fail_on_third(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")

    handle = loaded.model.model.layers[0].register_forward_pre_hook(fail_on_third)
    try:
        body = {"prompt": "hello", "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{worker.url}/v1/completions", json=body, timeout=60) as response:
            events = sse_events(response)
    finally:
        handle.remove()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "out_of_memory"
    assert complete(worker, prompt="hello", max_tokens=3).status_code == 200


def test_a_disconnected_stream_is_cancelled(make_worker, loaded):
    worker = make_worker()
    gate, blocked = threading.Event(), threading.Event()
    gate.set()

    def hold(module, args):
        if not gate.is_set():
            blocked.set()
            gate.wait()

    hook = loaded.model.model.layers[0].register_forward_pre_hook(hold)
    try:
        body = {"prompt": "hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", f"{worker.url}/v1/completions", json=body) as response,
        ):
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            gate.clear()
            assert blocked.wait(30)
            request = worker.engine._batch.rows[0].handle
        # The client has gone: the server notices and cancels the request while the engine is held.
        assert request.cancelled.wait(30)
    finally:
        gate.set()
        hook.remove()
    wait_for(lambda: worker.engine.running == 0, "the cancelled request to leave the batch")
    assert worker.metric("kubevram_worker_sequences_finished_total", {"reason": "cancelled"}) == 1
    assert worker.metric("kubevram_worker_generation_tokens_total") < 400
    assert complete(worker, prompt="hello", max_tokens=3).status_code == 200


def test_a_disconnected_plain_request_is_cancelled(make_worker, loaded):
    worker = make_worker()
    gate, blocked = threading.Event(), threading.Event()
    gate.set()
    calls = []

    def hold(module, args):
        calls.append(1)
        if len(calls) == 3:  # hold the engine at its second decode step
            gate.clear()
            blocked.set()
            gate.wait()

    hook = loaded.model.model.embed_tokens.register_forward_pre_hook(hold)
    try:
        body = {"prompt": "hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{worker.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1))
        assert blocked.wait(30)
        request = worker.engine._batch.rows[0].handle
        assert request.cancelled.wait(30)
    finally:
        gate.set()
        hook.remove()
    wait_for(lambda: worker.engine.running == 0, "the cancelled request to leave the batch")
    assert worker.metric("kubevram_worker_sequences_finished_total", {"reason": "cancelled"}) == 1
    assert worker.metric("kubevram_worker_generation_tokens_total") < 400


def test_metrics_endpoint(worker):
    complete(worker, prompt="hello", max_tokens=2)
    text = httpx.get(f"{worker.url}/metrics").text
    for name in (
        "kubevram_worker_requests_total",
        "kubevram_worker_prompt_tokens_total",
        "kubevram_worker_generation_tokens_total",
        "kubevram_worker_queue_depth",
        "kubevram_worker_request_latency_seconds_bucket",
    ):
        assert name in text
