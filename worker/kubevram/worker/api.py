"""The HTTP routes: OpenAI's completions, chat completions and models, plus health, readiness and metrics.

Routes are thin: read the body (up to the state's limit), let
:class:`~kubevram.worker.service.WorkerState` parse it into a :mod:`~kubevram.worker.protocol` model and
build the prompt and sampling parameters on its preparation thread, submit to the engine, answer (JSON,
or SSE ending in ``data: [DONE]``). Every error, an unexpected one included, is in OpenAI's format
``{"error": {"message", "type", "param", "code"}}`` and counted in ``/metrics``; a stream that fails
ends with an error event and ``[DONE]``; a client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubevram.worker.engine import EngineError, Output, RequestHandle
from kubevram.worker.metrics import CONTENT_TYPE_LATEST, WorkerMetrics
from kubevram.worker.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorBody,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    Readiness,
    Usage,
)
from kubevram.worker.service import Prepared, WorkerState

log = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    retry_after: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(
            message=message, type=type or _ERROR_TYPES.get(status, "server_error"), param=param, code=code
        )
    )
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


def _engine_error(exc: EngineError) -> JSONResponse:
    return error_response(
        exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, retry_after=exc.retry_after
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (nothing more is read);
    a client that leaves before it has sent it all is answered 499, as a client that leaves later."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise EngineError(
            499, f"the client closed the connection after {size} bytes of its body", code="client_closed"
        ) from None
    return b"".join(chunks)


def _too_large(limit: int) -> EngineError:
    return EngineError(
        413,
        f"the request body is larger than {limit} bytes, the most this worker takes (--max-body-bytes; "
        "by default 64 KiB plus 64 bytes per token of serving.maxSequenceLength)",
        code="request_too_large",
    )


def _usage(output: Output) -> Usage:
    return Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
    )


def _sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json(exclude_unset=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


_ENDPOINTS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/admin/release",
        "/v1/admin/stats",
        "/v1/admin/sleep",
        "/v1/admin/wake_up",
        "/v1/admin/is_sleeping",
    }
)


class _CountRequests:
    """Counts ``/v1/`` requests by endpoint and status, and answers any unexpected error as an
    OpenAI-shaped 500 (logged in one line), counted like the rest. Plain ASGI: Starlette's
    ``BaseHTTPMiddleware`` (``@app.middleware("http")``) would hide the client's disconnect from the
    routes, and its ``ServerErrorMiddleware`` answers plain text outside this counter."""

    def __init__(self, app: ASGIApp, metrics: WorkerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        counted = path.startswith("/v1/")
        endpoint = path if path in _ENDPOINTS else "other"  # no label per unknown path
        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if counted:
                    self.metrics.requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception as exc:
            log.error("%s %s failed: %s: %s", scope.get("method"), path, type(exc).__name__, exc)
            log.debug("the failed request's traceback", exc_info=exc)
            if started:  # the response is under way: the connection is closed on it
                raise
            response = error_response(
                500,
                f"internal error ({type(exc).__name__}); the request was not served",
                code="internal_error",
            )
            await response(scope, receive, counting_send)


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "A bad field (named in `param`), a body that is not JSON, a prompt too long",
        404: "An unknown `model`",
        413: "A body larger than the worker's limit (`--max-body-bytes`)",
        429: "The queue is full (`Retry-After`)",
        500: "This request's generation failed",
        503: "Loading, shutting down, out of memory, or the engine stopped (`Retry-After` when worth it)",
    }.items()
}


def _generation_route(request_model: type[BaseModel], response_model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a generation route: the strict request body (read by hand, so declared here), the
    JSON answer, the SSE answer of ``stream: true``, and every error status."""
    name = request_model.__name__
    return {
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
            }
        },
        "responses": {
            200: {
                "model": response_model,
                "description": "The answer; with `stream: true`, Server-Sent Events ending in `data: [DONE]`",
                "content": {
                    "text/event-stream": {
                        # One server-sent event (OpenAPI 3.2's itemSchema shape): `data` holds a chunk,
                        # an error body, or `[DONE]`, the last event.
                        "schema": {
                            "type": "object",
                            "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                            "required": ["data"],
                        }
                    }
                },
            },
            **_ERRORS,
        },
    }


def _openapi(app: FastAPI, state: WorkerState) -> dict[str, Any]:
    """FastAPI's document plus the request models' schemas (validation mode) under components, with
    this worker's limits: ``max_tokens`` at most ``maxSequenceLength``."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, definitions = models_json_schema(
            [(CompletionRequest, "validation"), (ChatCompletionRequest, "validation")],
            ref_template="#/components/schemas/{model}",
        )
        schemas = definitions["$defs"]
        for name, field in (
            ("CompletionRequest", "max_tokens"),
            ("ChatCompletionRequest", "max_tokens"),
            ("ChatCompletionRequest", "max_completion_tokens"),
        ):
            for option in schemas[name]["properties"][field]["anyOf"]:
                if option.get("type") == "integer":
                    option["maximum"] = state.serving.maxSequenceLength
        document.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
        app.openapi_schema = document
    return app.openapi_schema


def create_app(state: WorkerState) -> FastAPI:
    """The worker's FastAPI app over ``state`` (which holds the engine once the model is loaded)."""
    app = FastAPI(title="kubevram worker", docs_url=None, redoc_url=None)
    app.openapi = lambda: _openapi(app, state)  # type: ignore[method-assign]
    app.state.worker = state
    metrics = state.metrics

    @app.exception_handler(EngineError)
    async def _on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return _engine_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)  # 405 keeps Allow

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.get("/healthz")
    async def healthz() -> Health:
        return Health()

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": state.status, "error": state.error}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        limit = state.serving.maxSequenceLength
        return ModelList(data=[ModelCard(id=name, max_model_len=limit) for name in state.model_names])

    @app.post(
        "/v1/completions", response_model=None, **_generation_route(CompletionRequest, CompletionResponse)
    )
    async def completions(request: Request) -> Response:
        started = time.monotonic()
        state.arrived()
        prepared = await state.prepare(
            state.prepare_body, await read_body(request, state.body_limit), CompletionRequest
        )
        body = prepared.request
        assert isinstance(body, CompletionRequest)
        engine = state.require_engine()
        handle = engine.submit(prepared.prompt, prepared.params)
        name = body.model or state.model_names[0]
        echo = _echo(body, prepared.prompt, engine.tokenizer)
        if body.stream:
            return _stream(
                handle,
                request,
                started,
                "/v1/completions",
                _completion_chunks(handle, name, _include_usage(prepared), echo),
            )
        output = await _wait(handle, request)
        if output is None:
            return Response(status_code=499)
        metrics.latency.labels(endpoint="/v1/completions").observe(time.monotonic() - started)
        return JSONResponse(
            CompletionResponse(
                model=name,
                choices=[CompletionChoice(text=echo + output.text, finish_reason=output.finish_reason)],
                usage=_usage(output),
            ).model_dump()
        )

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        **_generation_route(ChatCompletionRequest, ChatCompletionResponse),
    )
    async def chat_completions(request: Request) -> Response:
        started = time.monotonic()
        state.arrived()
        prepared = await state.prepare(
            state.prepare_body, await read_body(request, state.body_limit), ChatCompletionRequest
        )
        handle = state.require_engine().submit(prepared.prompt, prepared.params)
        name = prepared.request.model or state.model_names[0]
        if prepared.request.stream:
            return _stream(
                handle,
                request,
                started,
                "/v1/chat/completions",
                _chat_chunks(handle, name, _include_usage(prepared)),
            )
        output = await _wait(handle, request)
        if output is None:
            return Response(status_code=499)
        metrics.latency.labels(endpoint="/v1/chat/completions").observe(time.monotonic() - started)
        return JSONResponse(
            ChatCompletionResponse(
                model=name,
                choices=[
                    ChatChoice(
                        message=AssistantMessage(content=output.text), finish_reason=output.finish_reason
                    )
                ],
                usage=_usage(output),
            ).model_dump()
        )

    def _stream(
        handle: RequestHandle, request: Request, started: float, endpoint: str, chunks: AsyncIterator[str]
    ) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            first = True
            try:
                async for chunk in chunks:
                    if first:
                        metrics.ttft.observe(time.monotonic() - started)
                        first = False
                    yield chunk
                metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - started)
            finally:
                if not handle.finished:
                    handle.cancel()  # the client went away (or the stream failed): stop generating

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


async def _wait(handle: RequestHandle, request: Request) -> Output | None:
    """The whole result; ``None`` (and the request cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(handle.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                handle.cancel()
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()
            handle.cancel()


def _include_usage(prepared: Prepared) -> bool:
    options = prepared.request.stream_options
    return bool(options and options.include_usage)


def _error_chunk(error: EngineError) -> str:
    return _sse(
        ErrorResponse(
            error=ErrorBody(message=error.message, type=error.type, param=error.param, code=error.code)
        )
    )


def _echo(body: CompletionRequest, prompt: list[int], tokenizer: Any) -> str:
    """What ``echo`` puts before the completion: the prompt text as sent, token-id prompts decoded."""
    if not body.echo:
        return ""
    if isinstance(body.prompt, str):
        return body.prompt
    if body.prompt and isinstance(body.prompt[0], str):
        return str(body.prompt[0])
    return str(tokenizer.decode(prompt, skip_special_tokens=True))


async def _outputs(handle: RequestHandle) -> AsyncIterator[Output]:
    """The handle's outputs; an unexpected error becomes a last output carrying a 500 (so that a
    stream still ends with an error event and ``[DONE]``)."""
    try:
        async for output in handle:
            yield output
    except Exception as exc:
        log.error("stream of request %d failed: %s: %s", handle.id, type(exc).__name__, exc)
        handle.cancel()
        error = EngineError(500, f"internal error ({type(exc).__name__})", type="server_error")
        yield Output("", 0, len(handle.prompt_ids), error=error)


async def _completion_chunks(
    handle: RequestHandle, model: str, include_usage: bool, echo: str
) -> AsyncIterator[str]:
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, reason: str | None, usage: Usage | None = None, choices: bool = True) -> str:
        response = CompletionResponse(
            id=rid,
            created=created,
            model=model,
            usage=usage,
            choices=[CompletionChoice(text=text, finish_reason=reason)] if choices else [],
        )
        return _sse(response)

    if echo:
        yield chunk(echo, None)
    async for output in _outputs(handle):
        if output.error is not None:
            yield _error_chunk(output.error)
            break
        if output.text or output.finish_reason:
            yield chunk(output.text, output.finish_reason)
        if output.finish_reason and include_usage:
            yield chunk("", None, _usage(output), choices=False)
    yield "data: [DONE]\n\n"


async def _chat_chunks(handle: RequestHandle, model: str, include_usage: bool) -> AsyncIterator[str]:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: DeltaMessage | None, reason: str | None, usage: Usage | None = None) -> str:
        choices = [ChatChunkChoice(delta=delta, finish_reason=reason)] if delta is not None else []
        return _sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

    yield chunk(DeltaMessage(role="assistant", content=""), None)
    async for output in _outputs(handle):
        if output.error is not None:
            yield _error_chunk(output.error)
            break
        if output.text or output.finish_reason:
            yield chunk(DeltaMessage(content=output.text), output.finish_reason)
        if output.finish_reason and include_usage:
            yield chunk(None, None, _usage(output))
    yield "data: [DONE]\n\n"
