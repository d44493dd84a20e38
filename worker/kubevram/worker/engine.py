"""The engine: the one thread that owns the model and runs the inference loop.

Requests arrive from the HTTP layer (any thread or event loop) through :meth:`Engine.submit`, wait in a
bounded queue, and are batched, up to ``max_batch_size``, into one left-padded batch: one prefill,
then one decode step per token with a KV cache (``DynamicCache``), every row sampled with its own
parameters (:mod:`kubevram.worker.logits`). Rows leave the batch when they finish, hit a stop string
or are cancelled (the cache shrinks with them, and columns that became padding in every row are cut);
waiting requests join the running batch between two steps: they are prefilled as a group, then group
and batch are left-padded to one width, KV cache included, and concatenated (continuous batching; for
caches that cannot be concatenated, such as sliding-window ones, new requests wait for the batch to
empty). Text is decoded incrementally and handed back through an ``asyncio.Queue`` per request.

Failures stay with the request that caused them: a row whose sampling fails (parameters the maths
cannot take) leaves the batch alone, its cache rows with it, and the other rows go on in the same step;
a group whose prefill fails is prefilled again one request at a time, so only the request that fails
alone is failed. An out-of-memory error in a step fails the requests of that step (status 503), drops
their cache and tensors, collects garbage and empties the CUDA cache (only then: a collection stalls
every stream); the loop goes on serving. A failed request is logged in one line (the traceback at
debug level). A request cancelled while it waits leaves the queue at once; every request ends in
exactly one ``on_finished`` reason: ``stop``, ``length``, ``cancelled`` or ``error``.

If the loop itself dies, :attr:`Engine.failure` says why, every waiting request is answered 503 at once
and new ones are refused (readiness turns 503). Hook points for the states to come (sleep/wake, a
distributed mode): :meth:`run_between_steps` runs a function on the engine thread between two steps
(the VRAM release uses it; so do :meth:`abort_all` and a drain), :class:`EngineHooks` sees every
prefill, step and finished request, and :meth:`_step` is the one place a step is chosen.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gc
import inspect
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from kubevram.worker.logits import (
    ChineseLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressLeadingPunctuationLogitsProcessor,
    TemperatureLogitsWarper,
    TokenClasses,
    TopPLogitsWarper,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineError(Exception):
    """A request the engine refuses or could not finish: ``status`` is the HTTP status to answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @classmethod
    def loading(cls) -> EngineError:
        """503 for a request that needs the model before it has loaded."""
        return cls(
            503,
            "the model is still loading; retry when /readyz answers 200",
            type="service_unavailable",
            code="model_loading",
            retry_after=5,
        )


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation. ``temperature == 0`` is greedy; ``chinese_alpha == 1`` is off."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    chinese_alpha: float = 1.0
    suppress_leading_punctuation: bool = False


@dataclass
class Output:
    """One piece of a request's result: new ``text``; the last one has ``finish_reason`` set."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None
    error: EngineError | None = None


class RequestHandle:
    """What :meth:`Engine.submit` returns: iterate it for :class:`Output` pieces; cancel it to stop."""

    _ids = itertools.count()

    def __init__(
        self, prompt_ids: Sequence[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.loop = loop
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()
        self.finished = False
        self._withdraw: Callable[[RequestHandle], None] | None = None  # set by Engine.submit

    def cancel(self) -> None:
        """Stop generating for this request: a waiting request leaves the queue now, a running one
        before the engine's next step."""
        self.cancelled.set()
        if self._withdraw is not None:
            self._withdraw(self)

    def _put(self, output: Output) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, output)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[Output]:
        while True:
            output = await self.queue.get()
            yield output
            if output.finish_reason is not None or output.error is not None:
                return

    async def result(self) -> Output:
        """All the text at once (raises the request's :class:`EngineError`, if any)."""
        text, last = [], None
        async for output in self:
            text.append(output.text)
            last = output
        assert last is not None
        if last.error is not None:
            raise last.error
        return Output("".join(text), last.completion_tokens, last.prompt_tokens, last.finish_reason)


class EngineHooks:
    """Callbacks the engine calls on its thread (metrics); the default does nothing."""

    def on_prefill(self, batch_size: int, prompt_tokens: int) -> None: ...

    def on_tokens(self, count: int) -> None: ...

    def on_finished(self, reason: str) -> None: ...


@dataclass
class _Row:
    handle: RequestHandle
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    emitted: int = 0
    checked: int = 0


@dataclass
class _Batch:
    rows: list[_Row]
    input_ids: torch.Tensor  # (batch, seq): every token so far, left-padded
    attention_mask: torch.Tensor  # (batch, seq)
    positions: torch.Tensor  # (batch,): position of the last token
    prompt_length: int  # padded prompt length (the first step is at this length)
    cache: Any


class Engine:
    """Owns ``model`` and ``tokenizer``; one loop thread; see the module docstring."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 1,
        max_queue: int = 256,
        max_sequence_length: int = 4096,
        token_classes: TokenClasses | None = None,
        eos_token_ids: Sequence[int] = (),
        hooks: EngineHooks | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_queue ({max_queue}) must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_sequence_length = max_sequence_length
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.hooks = hooks or EngineHooks()
        self.device = _input_device(model)
        # Remote-code models may not take ``logits_to_keep``; without it a prefill computes every position.
        self._keep_last = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}
        # transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40).
        self._cache_arg = "cache" if _takes(model, "cache") else "past_key_values"
        self.token_classes = token_classes.to(self.device) if token_classes is not None else None
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or [0])[0])
        self._eos = torch.tensor(self.eos_token_ids or [-1], device=self.device)
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._callbacks: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._cond = threading.Condition()
        self._batch: _Batch | None = None
        self._joinable: bool | None = None  # whether new requests may join a running batch
        self._merged = False
        self._sampled = False  # whether the step being run has sampled (and so answered) its rows
        self._prefilling: list[RequestHandle] = []  # the requests the step being run prefills
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: str | None = None  # why the loop died, if it did
        self._generator = torch.Generator(device=self.device)
        self._generator.seed()
        self.running = 0
        self.steps = 0
        self.oom_count = 0

    # ---- the outside: any thread --------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def alive(self) -> bool:
        """Whether the loop runs (or has not been started yet) and has not died."""
        return self.failure is None and not self._stopping

    @property
    def idle(self) -> bool:
        """No request running or waiting."""
        return self._batch is None and not self._pending

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kubevram-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def check_admission(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise 400 when the prompt plus ``max_tokens`` passes ``max_sequence_length``."""
        if prompt_tokens + max_tokens > self.max_sequence_length:
            raise EngineError(
                400,
                f"This model's maximum context length is {self.max_sequence_length} tokens "
                f"(serving.maxSequenceLength); the request has {prompt_tokens} prompt tokens and "
                f"max_tokens {max_tokens} ({prompt_tokens + max_tokens} in all).",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None
    ) -> RequestHandle:
        """Queue a request; 400 if it is too long, 429 (with a Retry-After) if the queue is full."""
        if not prompt_ids:
            raise EngineError(400, "the prompt has no tokens", param="prompt")
        self.check_admission(len(prompt_ids), params.max_tokens)
        handle = RequestHandle(prompt_ids, params, loop or asyncio.get_running_loop())
        handle._withdraw = self._withdraw
        with self._cond:
            if self.failure is not None:
                raise self.dead_error()
            if self._stopping:
                raise EngineError(503, "the worker is shutting down", type="service_unavailable")
            if len(self._pending) >= self.max_queue:
                raise EngineError(
                    429,
                    f"the request queue is full ({self.max_queue} waiting); retry later",
                    type="rate_limit_exceeded",
                    code="queue_full",
                    retry_after=1,
                )
            self._pending.append(handle)
            self._cond.notify_all()
        return handle

    async def run_between_steps(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread while no step runs; return (or raise) its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            self._callbacks.append((fn, future))
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    async def abort_all(self, error: EngineError) -> int:
        """Fail every running and waiting request with ``error`` (between two steps); how many."""
        if self.failure is not None or self._thread is None:
            return 0
        return await self.run_between_steps(lambda: self._fail_all(error))

    def dead_error(self) -> EngineError:
        return EngineError(
            503,
            f"the engine has stopped ({self.failure}); the worker must be restarted",
            type="service_unavailable",
            code="engine_failed",
        )

    def _withdraw(self, handle: RequestHandle) -> None:
        """A cancelled request that still waits leaves the queue now (any thread)."""
        with self._cond:
            try:
                self._pending.remove(handle)
            except ValueError:
                return  # already taken by the loop, which counts it
        handle.finished = True
        self.hooks.on_finished("cancelled")

    # ---- the loop: the engine thread ----------------------------------------------------------

    def drop_cancelled(self) -> int:
        """Remove the running batch's rows whose client went away, their KV cache rows with them; how
        many. The next step drops them anyway; a memory release does it now. Engine thread only."""
        batch = self._batch
        if batch is None:
            return 0
        keep = [i for i, row in enumerate(batch.rows) if not row.handle.cancelled.is_set()]
        dropped = len(batch.rows) - len(keep)
        if not dropped:
            return 0
        for row in batch.rows:
            if row.handle.cancelled.is_set():
                row.handle.finished = True
                self.hooks.on_finished("cancelled")
        if keep:
            _select(batch, keep)
        else:
            self._batch = None
        self.running = len(keep)
        return dropped

    def _run(self) -> None:
        """The thread's body: the loop; if it dies, fail everything and refuse what comes."""
        try:
            self._loop()
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.critical("the engine loop died: %s", self.failure, exc_info=True)
            with self._cond:
                callbacks = list(self._callbacks)
                self._callbacks.clear()
                self._fail_all(self.dead_error())
            for _, future in callbacks:
                if future.set_running_or_notify_cancel():
                    future.set_exception(self.dead_error())

    def _loop(self) -> None:
        log.info("engine loop started (max batch %d, queue %d)", self.max_batch_size, self.max_queue)
        while True:
            with self._cond:
                while not (self._stopping or self._callbacks or self._pending or self._batch):
                    self._cond.wait()
                if self._stopping:
                    break
                callbacks = list(self._callbacks)
                self._callbacks.clear()
                new: list[RequestHandle] = []
                room = self.max_batch_size - (len(self._batch.rows) if self._batch else 0)
                if self._batch is None or self._joinable:
                    while self._pending and len(new) < room:
                        new.append(self._pending.popleft())
            for fn, future in callbacks:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
            self._step(new)
        with self._cond:
            self._fail_all(EngineError(503, "the worker is shutting down", type="service_unavailable"))

    def _step(self, new: list[RequestHandle]) -> None:
        """One step: prefill the requests just taken from the queue, else decode the running batch."""
        for handle in new:
            if handle.cancelled.is_set():
                handle.finished = True
                self.hooks.on_finished("cancelled")
        new = [h for h in new if not h.cancelled.is_set()]
        self._prefilling = new
        if new:
            self._guarded(self._prefill, new)
        elif self._batch is not None:
            self._guarded(self._decode, None)
        self._prefilling = []

    def _guarded(self, step: Callable[[Any], None], arg: Any) -> None:
        """Run one step; on failure fail only what it must (module docstring). The batch is dropped
        after the ``except`` block so that the traceback's frames (holding the step's tensors) are gone
        when memory is freed."""
        running = list(self._batch.rows) if self._batch else []
        # A prefill that fails before its rows join the batch fails only them; anything else fails all.
        self._merged = False
        self._sampled = False
        rows = arg if arg is not None else running
        error: EngineError | None = None
        oom = False
        try:
            with torch.inference_mode():
                step(arg)
        except torch.OutOfMemoryError as exc:
            self.oom_count += 1
            oom = True
            log.error(
                "out of memory in a step of %d requests; failing them and freeing the batch: %s",
                len(rows),
                str(exc).splitlines()[0] if str(exc) else "",
            )
            error = EngineError(
                503,
                "out of memory while generating; the request was dropped, retry later",
                type="service_unavailable",
                code="out_of_memory",
            )
        except Exception as exc:
            error = _step_error(exc, len(rows))
        if error is None:
            return
        if arg is not None and not self._merged:
            if not oom and not self._sampled and len(arg) > 1:
                # Which request failed the group? Each prefills alone: only the culprit fails again.
                for handle in arg:
                    self._guarded(self._prefill, [handle])
                return
            self._fail(rows, error, free=oom)
        else:
            self._drop_batch(rows if arg is None else running + rows, error, free=oom)

    def _drop_batch(self, rows: Sequence[Any], error: EngineError, free: bool = False) -> None:
        """Drop the batch (cache, tensors) first, then fail its requests."""
        self._batch = None
        self.running = 0
        self._fail(rows, error, free)

    def _fail(self, rows: Sequence[Any], error: EngineError, free: bool = False) -> None:
        """Fail ``rows``; with ``free`` (after an out-of-memory error) also collect garbage and return
        the cached CUDA blocks, which only then is worth the stall."""
        if free:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        for row in rows:
            handle = row.handle if isinstance(row, _Row) else row
            if handle.finished:
                continue
            handle.finished = True
            self.hooks.on_finished("error")
            handle._put(Output("", 0, len(handle.prompt_ids), error=error))

    def _fail_all(self, error: EngineError) -> int:
        """Fail the running batch and every waiting request (engine thread, or with the lock held
        once the loop has ended)."""
        rows: list[Any] = list(self._batch.rows) if self._batch else []
        rows += self._prefilling + list(self._pending)
        self._pending.clear()
        self._drop_batch(rows, error)
        return len(rows)

    def _prefill(self, handles: list[RequestHandle]) -> None:
        """Prefill new requests as one left-padded group, sample their first tokens, then let the
        group join the running batch (or become it)."""
        from transformers import DynamicCache

        width = max(len(h.prompt_ids) for h in handles)
        ids = torch.full((len(handles), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(handles), width), dtype=torch.long)
        for i, h in enumerate(handles):
            ids[i, width - len(h.prompt_ids) :] = torch.tensor(h.prompt_ids, dtype=torch.long)
            mask[i, width - len(h.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [_Row(h, _row_generator(h.params.seed, self.device)) for h in handles]
        self.hooks.on_prefill(len(rows), sum(len(h.prompt_ids) for h in handles))
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_arg: cache},
            **self._keep_last,
        )
        logits = out.logits[:, -1, :]
        del out
        group = self._advance(_Batch(rows, ids, mask, position_ids[:, -1], width, cache), logits)
        if self._joinable is None and group is not None:
            self._joinable = _plain_dynamic_cache(group.cache)
            if not self._joinable:
                log.info("the model's KV cache cannot be merged: new requests wait for the running batch")
        self._merged = True
        if group is not None:
            self._batch = group if self._batch is None else _merge(self._batch, group, self.pad_token_id)
        self.running = len(self._batch.rows) if self._batch else 0

    def _decode(self, _: None) -> None:
        batch = self._batch
        assert batch is not None
        positions = batch.positions + 1
        out = self.model(
            input_ids=batch.input_ids[:, -1:],
            attention_mask=batch.attention_mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{self._cache_arg: batch.cache},
        )
        batch.positions = positions
        self._batch = self._advance(batch, out.logits[:, -1, :])
        self.running = len(self._batch.rows) if self._batch else 0

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Sample one token per row, append it, decode text; return the batch without its finished
        and cancelled rows (``None`` when none is left)."""
        self.steps += 1
        self._sampled = True
        # Sampling happens where the inputs live (the output head may sit on another device).
        tokens, failed = self._sample_isolated(batch, logits.to(self.device).float())
        batch.input_ids = torch.cat([batch.input_ids, tokens[:, None]], dim=-1)
        ones = batch.attention_mask.new_ones((len(tokens), 1))
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=-1)
        batch.prompt_length = -1  # past every row's first step
        is_eos = torch.isin(tokens, self._eos).tolist()
        keep = []
        for i, (row, token, eos) in enumerate(zip(batch.rows, tokens.tolist(), is_eos, strict=True)):
            if row.handle.cancelled.is_set():
                row.handle.finished = True
                self.hooks.on_finished("cancelled")
                continue
            if i in failed:
                self._fail([row], failed[i])
                continue
            if self._append(row, token, eos):
                keep.append(i)
        self.hooks.on_tokens(len(batch.rows))
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            _select(batch, keep)
        return batch

    def _append(self, row: _Row, token: int, eos: bool) -> bool:
        """Add a token to a row and send its new text; False when the row is finished."""
        params = row.handle.params
        reason = None
        if eos and not params.ignore_eos:
            reason = "stop"
        else:
            row.generated.append(token)
            row.text += self._decode_increment(row)
            if params.stop:
                start = max(0, row.checked - max(len(s) for s in params.stop) + 1)
                hits = [i for i in (row.text.find(s, start) for s in params.stop) if i >= 0]
                row.checked = len(row.text)
                if hits:
                    row.text = row.text[: min(hits)]
                    reason = "stop"
            total = len(row.handle.prompt_ids) + len(row.generated)
            if reason is None and (
                len(row.generated) >= params.max_tokens or total >= self.max_sequence_length
            ):
                reason = "length"
        if reason is None:
            hold = max((len(s) for s in params.stop), default=1) - 1
            end = len(row.text) - hold
        else:
            end = len(row.text)
        if end > row.emitted or reason is not None:
            row.handle._put(
                Output(
                    row.text[row.emitted : max(end, row.emitted)],
                    len(row.generated),
                    len(row.handle.prompt_ids),
                    finish_reason=reason,
                )
            )
            row.emitted = max(end, row.emitted)
        if reason is not None:
            row.handle.finished = True
            self.hooks.on_finished(reason)
            return False
        return True

    def _decode_increment(self, row: _Row) -> str:
        """The text the last token adds, waiting while it ends in an incomplete UTF-8 sequence."""
        decode = self.tokenizer.decode
        prefix = decode(row.generated[row.prefix_offset : row.read_offset], skip_special_tokens=True)
        text = decode(row.generated[row.prefix_offset :], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            row.prefix_offset, row.read_offset = row.read_offset, len(row.generated)
            return str(text[len(prefix) :])
        return ""

    def _sample_isolated(
        self, batch: _Batch, scores: torch.Tensor
    ) -> tuple[torch.Tensor, dict[int, EngineError]]:
        """:meth:`_sample` for the batch; if it fails, row by row, so that only the rows whose sampling
        fails are failed (by index, with their error); the others get their tokens in this step."""
        view = (batch.rows, batch.input_ids, batch.attention_mask, batch.prompt_length)
        try:
            return self._sample(*view, scores), {}
        except torch.OutOfMemoryError:
            raise
        except Exception:
            if len(batch.rows) == 1:
                raise
        tokens = torch.zeros(len(batch.rows), dtype=torch.long, device=scores.device)
        failed: dict[int, EngineError] = {}
        for i, row in enumerate(batch.rows):
            one = slice(i, i + 1)
            try:
                tokens[i] = self._sample(
                    [row], batch.input_ids[one], batch.attention_mask[one], batch.prompt_length, scores[one]
                )[0]
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                failed[i] = _step_error(exc, 1)
        return tokens, failed

    def _sample(
        self,
        rows: Sequence[_Row],
        ids: torch.Tensor,
        mask: torch.Tensor,
        prompt_length: int,
        scores: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``(batch, vocab)`` -> next tokens ``(batch,)``, each row with its own parameters."""
        params = [row.handle.params for row in rows]

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=scores.device)[:, None]

        if any(p.repetition_penalty != 1.0 for p in params):
            penalty = RepetitionPenaltyLogitsProcessor(
                column([p.repetition_penalty for p in params]), mask.bool()
            )
            scores = penalty(ids, scores)
        classes = self.token_classes
        if classes is not None and any(p.chinese_alpha != 1.0 for p in params):
            boost = ChineseLogitsProcessor(classes.boosted, column([p.chinese_alpha for p in params]))
            scores = boost(ids, scores)
        if (
            classes is not None
            and ids.shape[-1] == prompt_length
            and any(p.suppress_leading_punctuation for p in params)
        ):
            lengths = [prompt_length if p.suppress_leading_punctuation else -1 for p in params]
            suppress = SuppressLeadingPunctuationLogitsProcessor(classes.punctuation, lengths)
            scores = suppress(ids, scores)
        greedy = scores.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
        if not sampled_rows:
            return greedy
        index = torch.tensor(sampled_rows, device=scores.device)
        sub = scores[index]
        sub_ids = ids[index]
        sub = TemperatureLogitsWarper(column([params[i].temperature for i in sampled_rows]))(sub_ids, sub)
        if any(params[i].top_p < 1.0 for i in sampled_rows):
            sub = TopPLogitsWarper(column([params[i].top_p for i in sampled_rows]))(sub_ids, sub)
        # Extreme but valid parameters (a tiny penalty, a large boost) can push a logit to +inf, which
        # softmax turns into NaN: the largest finite value keeps its meaning ("far the most likely").
        sub = torch.nan_to_num(sub, nan=-math.inf, posinf=torch.finfo(sub.dtype).max)
        probs = sub.softmax(dim=-1)
        picks = torch.empty(len(sampled_rows), dtype=torch.long, device=scores.device)
        unseeded = [j for j, i in enumerate(sampled_rows) if rows[i].generator is None]
        if unseeded:
            where = torch.tensor(unseeded, device=scores.device)
            picks[where] = torch.multinomial(probs[where], 1, generator=self._generator).flatten()
        for j, i in enumerate(sampled_rows):  # seeded rows: each draws from its own generator
            generator = rows[i].generator
            if generator is not None:
                picks[j] = torch.multinomial(probs[j], 1, generator=generator)[0]
        return greedy.index_copy(0, index, picks)


def _step_error(exc: Exception, requests: int) -> EngineError:
    """A failed step as the requests' 500; logged in one line (the traceback at debug level)."""
    log.error("generation failed for %d request(s): %s: %s", requests, type(exc).__name__, exc)
    log.debug("the failed step's traceback", exc_info=exc)
    return EngineError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


def _row_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _takes(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _input_device(model: Any) -> torch.device:
    """Where input ids go: the device of the input embeddings (accelerate's hooks move the rest)."""
    try:
        device = model.get_input_embeddings().weight.device
        if device.type != "meta":
            return torch.device(device)
    except AttributeError:
        pass
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _plain_dynamic_cache(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain growing ``DynamicLayer`` (no sliding window, no
    quantisation): only such caches can be padded and concatenated along the batch."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _select(batch: _Batch, keep: list[int]) -> None:
    """Keep only rows ``keep`` (cache included), then cut the columns that are padding in every row."""
    index = torch.tensor(keep, device=batch.input_ids.device)
    batch.cache.batch_select_indices(index)
    batch.rows = [batch.rows[i] for i in keep]
    batch.input_ids = batch.input_ids[index]
    batch.attention_mask = batch.attention_mask[index]
    batch.positions = batch.positions[index]
    if not _plain_dynamic_cache(batch.cache):
        return
    lead = int((batch.attention_mask.cumsum(dim=-1) == 0).sum(dim=-1).min())
    if lead > 0:
        batch.input_ids = batch.input_ids[:, lead:]
        batch.attention_mask = batch.attention_mask[:, lead:]
        for layer in batch.cache.layers:
            layer.keys = layer.keys[:, :, lead:, :]
            layer.values = layer.values[:, :, lead:, :]


def _merge(batch: _Batch, group: _Batch, pad_token_id: int) -> _Batch:
    """``group``'s rows join ``batch``: both are left-padded to one width, caches included, and
    concatenated along the batch. Invariant of both: the cache holds every column but the last."""
    width = max(batch.input_ids.shape[-1], group.input_ids.shape[-1])
    for part in (batch, group):
        missing = width - part.input_ids.shape[-1]
        if missing:
            part.input_ids = torch.nn.functional.pad(part.input_ids, (missing, 0), value=pad_token_id)
            part.attention_mask = torch.nn.functional.pad(part.attention_mask, (missing, 0), value=0)
            for layer in part.cache.layers:
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, missing, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, missing, 0))
    for mine, theirs in zip(batch.cache.layers, group.cache.layers, strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)
    batch.rows = batch.rows + group.rows
    batch.input_ids = torch.cat([batch.input_ids, group.input_ids], dim=0)
    batch.attention_mask = torch.cat([batch.attention_mask, group.attention_mask], dim=0)
    batch.positions = torch.cat([batch.positions, group.positions], dim=0)
    batch.prompt_length = -1
    return batch
