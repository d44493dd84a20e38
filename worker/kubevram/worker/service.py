"""Between the HTTP routes and the engine: prompts, sampling parameters and the worker's settings.

:class:`WorkerState` holds what the routes need: the engine once the model is loaded (``None`` while
loading), the names the model answers to, the serving limits and the generation defaults of the
deployment (``spec.generation``), which requests override field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubevram.api.v1alpha1 import GenerationSpec, ServingSpec
from kubevram.worker.engine import Engine, EngineError, SamplingParams
from kubevram.worker.memory import MemoryMonitor
from kubevram.worker.metrics import WorkerMetrics
from kubevram.worker.protocol import ChatCompletionRequest, CompletionRequest


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

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def require_engine(self) -> Engine:
        if self.engine is None:
            if self.load_error:
                raise EngineError(
                    503, f"the model failed to load: {self.load_error}", type="service_unavailable"
                )
            raise EngineError.loading()
        return self.engine

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

    def completion_prompt(self, engine: Engine, request: CompletionRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = engine.model.get_output_embeddings().weight.shape[0]
            bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise EngineError(
                    400, f"prompt: token ids {bad[:5]} are outside [0, {vocab})", param="prompt"
                )
            return [int(t) for t in prompt]
        text = prompt if isinstance(prompt, str) else str(prompt[0])
        return list(engine.tokenizer(text)["input_ids"])

    def chat_prompt(self, engine: Engine, request: ChatCompletionRequest) -> list[int]:
        tokenizer = engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise EngineError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        except ValueError as exc:
            raise EngineError(400, f"messages: {exc}", param="messages") from None
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
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
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if request.temperature is None else request.temperature,
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
