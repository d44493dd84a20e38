"""``/openapi.json`` declares what the worker does, and a fuzzer driven by it finds no 5xx and no answer
that breaks the declared schema (schemathesis against a live worker, a bounded number of examples)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from conftest import worker_over
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed(loaded, serve):
    """A worker with a short sequence limit (48 tokens), so that no generated request runs long."""
    return worker_over(loaded, serve, max_batch_size=4, max_queue=64, max_sequence_length=48)


def test_openapi_declares_request_bodies_errors_and_sse(fuzzed):
    document = httpx.get(f"{fuzzed.url}/openapi.json").json()
    post = document["paths"]["/v1/completions"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    request = document["components"]["schemas"]["CompletionRequest"]
    assert request["additionalProperties"] is False
    assert {"prompt", "temperature", "top_p", "seed", "chinese", "stream"} <= set(request["properties"])
    assert set(post["responses"]) == {"200", "400", "404", "413", "429", "500", "503"}
    assert set(post["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest"
    )
    assert "503" in document["paths"]["/readyz"]["get"]["responses"]


POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE


@pytest.mark.parametrize(
    ("method", "path", "mode", "examples"),
    [
        ("POST", "/v1/completions", POSITIVE, 25),
        ("POST", "/v1/completions", NEGATIVE, 25),
        ("POST", "/v1/chat/completions", POSITIVE, 25),
        ("POST", "/v1/chat/completions", NEGATIVE, 25),
        ("GET", "/v1/models", POSITIVE, 2),
        ("GET", "/readyz", POSITIVE, 2),
        ("GET", "/healthz", POSITIVE, 2),
        ("GET", "/metrics", POSITIVE, 2),
    ],
    ids=lambda value: getattr(value, "value", value),
)
def test_fuzzing_the_served_schema_finds_no_5xx_and_no_undeclared_answer(
    fuzzed, method, path, examples, mode
):
    """schemathesis' strategies from the document the worker serves, run with hypothesis (its pytest
    plugin does not run on pytest 9): valid bodies (positive) and bodies that break the schema
    (negative) alike get a declared status with a body that matches its declared schema, never a 5xx."""
    operation = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")[path][method]
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def call(case):
        response = case.call_and_validate(base_url=fuzzed.url, checks=CHECKS, timeout=60)
        calls.append(response.status_code)

    call()
    assert calls
    assert all(status < 500 for status in calls)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hello", "max_tokens": 3, "stream": True}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        ),
        ("/v1/completions", {"prompt": "hello", "max_tokens": 3, "seed": 2**64}),
        ("/v1/completions", {"prompt": "hello", "max_tokens": 3, "temperature": 1e-300}),
    ],
)
def test_streams_and_edge_values_answer_as_declared(fuzzed, path, body):
    """What a fuzzer may not happen on: an SSE answer, values at the edge of the engine's dtypes."""
    operation = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")[path]["POST"]
    case = operation.Case(body=body, media_type="application/json")
    response = case.call_and_validate(base_url=fuzzed.url, checks=CHECKS, timeout=60)
    assert response.status_code in (200, 400)
    if body.get("stream"):
        assert response.headers["content-type"][0].startswith("text/event-stream")
        assert response.text.rstrip().endswith("data: [DONE]")
