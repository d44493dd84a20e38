"""Between the HTTP routes and the engine: prompts, sampling parameters and the worker's settings.

:class:`WorkerState` holds what the routes need: the engine once the model is loaded (``None`` while
loading), the names the model answers to, the serving limits and the generation defaults of the
deployment (``spec.generation``), which requests override field by field.

Everything a request costs before the engine takes it is bounded and kept off the event loop (as
text-generation-inference's router validates in a pool of workers): the body is read up to
:attr:`WorkerState.body_limit` bytes (413 past it, before anything is parsed); parsing, validation,
the chat template and tokenisation run on one worker thread (:meth:`WorkerState.prepare`); and a text
prompt longer in characters than ``maxSequenceLength`` times the longest token of the vocabulary
cannot fit, so it is refused before the tokenizer sees it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError

from kubevram.api.errors import from_validation_error
from kubevram.api.v1alpha1 import GenerationSpec, ServingSpec
from kubevram.worker.engine import Engine, EngineError, SamplingParams
from kubevram.worker.memory import MemoryMonitor
from kubevram.worker.metrics import WorkerMetrics
from kubevram.worker.protocol import GREEDY_BELOW, ChatCompletionRequest, CompletionRequest

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

#: The default request-body limit: this much for the JSON around the prompt, plus
#: :data:`BODY_BYTES_PER_TOKEN` per token of ``maxSequenceLength`` (a token is about 4 bytes of
#: text; JSON escapes a CJK character in 6; a token id takes at most 8 with its comma).
BODY_BASE_BYTES = 64 * 2**10
BODY_BYTES_PER_TOKEN = 64


def default_body_limit(max_sequence_length: int) -> int:
    return BODY_BASE_BYTES + BODY_BYTES_PER_TOKEN * max_sequence_length


@dataclass
class Prepared:
    """A request ready for the engine: the validated body, its prompt's token ids, its parameters."""

    request: CompletionRequest | ChatCompletionRequest
    prompt: list[int]
    params: SamplingParams


@dataclass
class WorkerState:
    model_names: list[str]
    serving: ServingSpec = field(default_factory=ServingSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    engine: Engine | None = None
    load_error: str | None = None
    # Allocator statistics, release and samples (kubevram.worker.memory); the engine's hooks when set.
    memory: MemoryMonitor | None = None
    # Request bodies larger than this are refused (413); None: default_body_limit(maxSequenceLength).
    max_body_bytes: int | None = None
    # Set on SIGTERM: readiness fails and new requests are refused while the running ones finish.
    draining: bool = False
    _pool: concurrent.futures.ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _token_chars: int | None = field(default=None, init=False, repr=False)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive and not self.draining

    @property
    def status(self) -> str:
        """What ``/readyz`` says: ready, loading, failed (the load or the engine), draining."""
        if self.load_error or (self.engine is not None and self.engine.failure):
            return "failed"
        if self.draining:
            return "draining"
        return "ready" if self.ready else "loading"

    @property
    def error(self) -> str | None:
        return self.load_error or (self.engine.failure if self.engine is not None else None)

    @property
    def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return default_body_limit(self.serving.maxSequenceLength)

    def require_engine(self) -> Engine:
        if self.draining:
            raise EngineError(
                503,
                "the worker is shutting down; retry on another replica",
                type="service_unavailable",
                code="shutting_down",
                retry_after=1,
            )
        if self.engine is None:
            if self.load_error:
                raise EngineError(
                    503, f"the model failed to load: {self.load_error}", type="service_unavailable"
                )
            raise EngineError.loading()
        if self.engine.failure is not None:
            raise self.engine.dead_error()
        return self.engine

    def arrived(self) -> None:
        """A generation request came: activity for the memory monitor's idle periods."""
        if self.memory is not None:
            self.memory.arrived()

    # ---- off the event loop -------------------------------------------------------------------

    async def prepare(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the preparation thread (parsing, templates, tokenisation)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kubevram-prepare")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def parse(self, body: bytes, model: type[M]) -> M:
        """The body as ``model`` (strict JSON: no lone surrogates, at most 200 levels deep); 400 if not."""
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            error = from_validation_error(_without_union_tags(exc))
            raise EngineError(400, _body_message(str(error), exc), param=error.field or None) from None

    def prepare_body(
        self, body: bytes, model: type[CompletionRequest] | type[ChatCompletionRequest]
    ) -> Prepared:
        """A body as ``model``, checked, its prompt tokenised (on the preparation thread)."""
        request = self.parse(body, model)
        self.check_model(request.model)
        engine = self.require_engine()
        if isinstance(request, ChatCompletionRequest):
            prompt = self.chat_prompt(engine, request)
        else:
            prompt = self.completion_prompt(engine, request)
        return Prepared(request, prompt, self.sampling_params(request, len(prompt)))

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise EngineError(
                404,
                f"The model '{name}' does not exist; this worker serves "
                f"{', '.join(repr(n) for n in self.model_names)}.",
                param="model",
                code="model_not_found",
            )

    # ---- prompts --------------------------------------------------------------------------------

    def token_chars(self, engine: Engine) -> int:
        """Characters of the vocabulary's longest token (its longest piece as the tokenizer stores it,
        which decodes to at most as many characters); computed once."""
        if self._token_chars is None:
            self._token_chars = max((len(piece) for piece in engine.tokenizer.get_vocab()), default=1)
        return self._token_chars

    def check_text_length(self, engine: Engine, text: str, param: str) -> None:
        """Refuse, before tokenising it, a text too long in characters to fit in any tokenisation."""
        limit = self.serving.maxSequenceLength * self.token_chars(engine)
        if len(text) > limit:
            raise EngineError(
                400,
                f"{param}: {len(text)} characters cannot fit in {self.serving.maxSequenceLength} tokens "
                f"(serving.maxSequenceLength; the longest token of this model has "
                f"{self.token_chars(engine)} characters)",
                param=param,
                code="context_length_exceeded",
            )

    def completion_prompt(self, engine: Engine, request: CompletionRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            if len(prompt) > self.serving.maxSequenceLength:
                engine.check_admission(len(prompt), 0)
            vocab = engine.vocab_size  # the model itself may be asleep (level 2)
            bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise EngineError(
                    400, f"prompt: token ids {bad[:5]} are outside [0, {vocab})", param="prompt"
                )
            return [int(t) for t in prompt]
        text = prompt if isinstance(prompt, str) else str(prompt[0])
        self.check_text_length(engine, text, "prompt")
        return list(engine.tokenizer(text)["input_ids"])

    def chat_prompt(self, engine: Engine, request: ChatCompletionRequest) -> list[int]:
        tokenizer = engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise EngineError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        except ValueError as exc:
            raise EngineError(400, f"messages: {exc}", param="messages") from None
        self.check_text_length(engine, "".join(m["content"] for m in messages), "messages")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # the template's raise_exception(): e.g. roles out of order
            raise EngineError(
                400, f"messages: the chat template refused them: {exc}", param="messages"
            ) from None
        self.check_text_length(engine, text, "messages")
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- sampling -------------------------------------------------------------------------------

    def sampling_params(
        self, request: CompletionRequest | ChatCompletionRequest, prompt_tokens: int
    ) -> SamplingParams:
        """Request fields over the deployment's defaults; ``max_tokens`` defaults to what still fits."""
        defaults = self.generation.defaults
        max_tokens = request.max_tokens
        if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
            max_tokens = request.max_completion_tokens
        if max_tokens is None:
            max_tokens = max(1, min(defaults.maxNewTokens, self.serving.maxSequenceLength - prompt_tokens))
        spec = self.generation.chinese
        enabled, alpha, suppress = spec.enabled, spec.alpha, spec.suppressLeadingPunctuation
        override = request.chinese
        if override is not None:
            enabled = override.enabled
            alpha = override.alpha if override.alpha is not None else alpha
            if override.suppressLeadingPunctuation is not None:
                suppress = override.suppressLeadingPunctuation
        temperature = defaults.temperature if request.temperature is None else request.temperature
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=defaults.topP if request.top_p is None else request.top_p,
            repetition_penalty=(
                defaults.repetitionPenalty
                if request.repetition_penalty is None
                else request.repetition_penalty
            ),
            stop=tuple(request.stop_list()),
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            chinese_alpha=alpha if enabled else 1.0,
            suppress_leading_punctuation=enabled and suppress,
        )


def _is_union_tag(part: str | int) -> bool:
    """Whether a part of an error's location names a union member (``str``, ``list[int]``), not a field."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none") or "[" in part or part.startswith("function-")
    )


def _without_union_tags(exc: ValidationError) -> ValidationError:
    """``exc`` with the union members left out of its locations (``prompt``, not ``prompt.list[int][0]``)."""
    details: list[Any] = [
        {
            "type": error["type"],
            "loc": tuple(part for part in error["loc"] if not _is_union_tag(part)),
            "input": error["input"],
            **({"ctx": error["ctx"]} if "ctx" in error else {}),
        }
        for error in exc.errors(include_url=False)
    ]
    return ValidationError.from_exception_data(exc.title, details)


def _body_message(message: str, exc: ValidationError) -> str:
    """The parse error without pydantic's empty location (``: 'Invalid JSON: ...'`` reads badly)."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return f"the body is not JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
    if first["type"] == "model_type":
        return f"the body must be a JSON object, got {type(first.get('input')).__name__}"
    return message
