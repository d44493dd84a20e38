"""The HTTP routes: OpenAI's completions, chat completions and models, plus health, readiness and metrics.

Routes are thin: parse the body into a :mod:`~kubevram.worker.protocol` model, let
:class:`~kubevram.worker.service.WorkerState` build the prompt and sampling parameters, submit to the
engine, answer (JSON, or SSE ending in ``data: [DONE]``). Every error is in OpenAI's format
``{"error": {"message", "type", "param", "code"}}``; a client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubevram.api.errors import from_validation_error
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
    ModelCard,
    ModelList,
    Usage,
)
from kubevram.worker.service import WorkerState

M = TypeVar("M", bound=BaseModel)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
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
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(
            message=message, type=type or _ERROR_TYPES.get(status, "server_error"), param=param, code=code
        )
    )
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _engine_error(exc: EngineError) -> JSONResponse:
    return error_response(
        exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, retry_after=exc.retry_after
    )


async def _parse(request: Request, model: type[M]) -> M:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise EngineError(400, f"the body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = from_validation_error(exc)
        raise EngineError(400, str(error), param=error.field or None) from None


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
    {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/admin/release", "/v1/admin/stats"}
)


class _CountRequests:
    """Counts ``/v1/`` requests by endpoint and status. Plain ASGI: Starlette's ``BaseHTTPMiddleware``
    (``@app.middleware("http")``) would hide the client's disconnect from the routes."""

    def __init__(self, app: ASGIApp, metrics: WorkerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        endpoint = path if path in _ENDPOINTS else "other"  # no label per unknown path

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(state: WorkerState) -> FastAPI:
    """The worker's FastAPI app over ``state`` (which holds the engine once the model is loaded)."""
    app = FastAPI(title="kubevram worker", docs_url=None, redoc_url=None)
    app.state.worker = state
    metrics = state.metrics

    @app.exception_handler(EngineError)
    async def _on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return _engine_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            {"status": "failed" if state.load_error else "loading", "error": state.load_error},
            status_code=503,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        limit = state.serving.maxSequenceLength
        return ModelList(data=[ModelCard(id=name, max_model_len=limit) for name in state.model_names])

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        started = time.monotonic()
        body = await _parse(request, CompletionRequest)
        state.check_model(body.model)
        engine = state.require_engine()
        prompt = state.completion_prompt(engine, body)
        handle = engine.submit(prompt, state.sampling_params(body, len(prompt)))
        name = body.model or state.model_names[0]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(
                handle,
                request,
                started,
                "/v1/completions",
                _completion_chunks(handle, name, include_usage, _echo(body, prompt, engine.tokenizer)),
            )
        output = await _wait(handle, request)
        if output is None:
            return Response(status_code=499)
        metrics.latency.labels(endpoint="/v1/completions").observe(time.monotonic() - started)
        text = _echo(body, prompt, engine.tokenizer) + output.text
        return JSONResponse(
            CompletionResponse(
                model=name,
                choices=[CompletionChoice(text=text, finish_reason=output.finish_reason)],
                usage=_usage(output),
            ).model_dump()
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        started = time.monotonic()
        body = await _parse(request, ChatCompletionRequest)
        state.check_model(body.model)
        engine = state.require_engine()
        prompt = state.chat_prompt(engine, body)
        handle = engine.submit(prompt, state.sampling_params(body, len(prompt)))
        name = body.model or state.model_names[0]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(
                handle, request, started, "/v1/chat/completions", _chat_chunks(handle, name, include_usage)
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
    async for output in handle:
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
    async for output in handle:
        if output.error is not None:
            yield _error_chunk(output.error)
            break
        if output.text or output.finish_reason:
            yield chunk(DeltaMessage(content=output.text), output.finish_reason)
        if output.finish_reason and include_usage:
            yield chunk(None, None, _usage(output))
    yield "data: [DONE]\n\n"
