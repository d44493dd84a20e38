"""OpenAI request and response models for ``/v1/completions`` and ``/v1/chat/completions``.

Requests are strict (``extra="forbid"``, no type coercion: ``"5"`` is not 5, ``false`` is not a token id,
``"yes"`` is not ``true``; no ``NaN`` or ``Infinity``): every field OpenAI documents is accepted, fields
the worker cannot honour are rejected with a 400 naming them when they carry a non-default value, and
unknown fields are errors. Extras beyond OpenAI: ``chinese`` (``true``, ``false`` or ``{"alpha": 5.0}``)
and ``repetition_penalty``, ``ignore_eos`` (as vLLM).

Numbers are checked as the engine uses them: the sampler computes in float32, so ``top_p``,
``repetition_penalty`` and ``chinese.alpha`` must be float32 numbers (0 < |x| of at least 1.2e-38 and
at most 3.4e38: 1e-300 would become 0, 1e39 infinity); a ``temperature`` below
:data:`GREEDY_BELOW` means greedy decoding (as vLLM); ``seed`` is in the range
``torch.Generator.manual_seed`` takes, -2**63 to 2**64 - 1.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

#: Temperatures below this (but above 0) decode greedily: dividing logits by less overflows float32.
GREEDY_BELOW = 1e-5
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32
FLOAT32_MAX = 3.4028234663852886e38
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def float32(value: float | None) -> float | None:
    """``value`` if the float32 sampler can compute with it unchanged in magnitude, else a ValueError."""
    if value is not None and value != 0 and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
        raise ValueError(
            f"{value!r} is outside float32's range ({FLOAT32_TINY:.2g} to {FLOAT32_MAX:.2g}), "
            "the dtype sampling computes in"
        )
    return value


def _schema(*options: dict[str, Any]) -> dict[str, Any]:
    """A field's JSON schema stated in full where validators say more than the types (for clients and
    fuzzers reading ``/openapi.json``)."""
    return {"anyOf": list(options)}


_STOP_SCHEMA = _schema(
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
    {"type": "null"},
)
_PROMPT_SCHEMA = _schema(
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ChineseOverride(_Strict):
    """Per-request Chinese steering; unset fields come from the deployment's ``generation.chinese``."""

    enabled: bool = True
    alpha: float | None = Field(default=None, gt=0, description="Probability factor of CJK tokens (float32).")
    suppressLeadingPunctuation: bool | None = None

    _alpha = field_validator("alpha")(float32)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(
        default=None, ge=0, le=2, description=f"0 (or below {GREEDY_BELOW}) decodes greedily."
    )
    top_p: float | None = Field(default=None, gt=0, le=1, description="In (0, 1], a float32 number.")
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request is served.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None, json_schema_extra=_STOP_SCHEMA)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(default=0.0, json_schema_extra={"const": 0}, description="Only 0.")
    frequency_penalty: float = Field(default=0.0, json_schema_extra={"const": 0}, description="Only 0.")
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra={"maxProperties": 0})
    user: str | None = None
    # Extras.
    repetition_penalty: float | None = Field(default=None, gt=0, description="> 0, a float32 number.")
    ignore_eos: bool = False
    chinese: ChineseOverride | None = Field(
        default=None, description="true, false or {alpha, suppressLeadingPunctuation}: Chinese steering."
    )

    _float32 = field_validator("top_p", "repetition_penalty")(float32)

    @field_validator("chinese", mode="before")
    @classmethod
    def _chinese(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, value: float) -> float:
        if value:
            raise ValueError(f"{value!r}: only 0 is supported; use repetition_penalty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] = Field(json_schema_extra=_PROMPT_SCHEMA)
    echo: bool = False
    suffix: str | None = Field(default=None, json_schema_extra={"maxLength": 0})
    best_of: int | None = Field(default=None, ge=1, le=1)
    logprobs: int | None = Field(default=None, ge=0, le=0, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) != 1:
            raise ValueError(f"one prompt per request is served, got {len(value)}")
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported by this server")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ValueError(f"content part type {part.get('type')!r} is not supported (only 'text')")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = Field(default=False, description="Not supported.", json_schema_extra={"const": False})
    top_logprobs: int | None = Field(default=None, ge=0, le=0)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, json_schema_extra={"maxItems": 0})
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

    @field_validator("response_format")
    @classmethod
    def _format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type") not in (None, "text"):
            raise ValueError(f"response_format type {value.get('type')!r} is not supported (only 'text')")
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError("tools are not supported by this server")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """A streamed piece of the assistant's message; unset fields are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _drop_none(self) -> dict[str, Any]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kubevram"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """``/readyz``: 200 ``ready``; 503 ``loading``, ``draining`` (shutting down) or ``failed`` (why in
    ``error``)."""

    status: Literal["ready", "loading", "draining", "failed"]
    error: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
