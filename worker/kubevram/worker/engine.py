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
and new ones are refused (readiness turns 503). Hook points for the states of the loop (sleep/wake, the
distributed mode): :meth:`run_between_steps` runs a function on the engine thread between two
steps (the VRAM release uses it; so do :meth:`abort_all` and a drain), :class:`EngineHooks` sees every
prefill, step and finished request, :meth:`_step` is the one place a step is chosen, and
:meth:`_transition` the one place the loop changes state.

**Sleep and wake** are states of this loop, not a second engine. :meth:`Engine.sleep` orders a sleep:
from then on new requests are *parked* (``wake_on_request``) or refused with 503 ``sleeping`` and a
``Retry-After``; the requests already admitted finish; then, between two steps with no batch left, the
loop calls its :class:`Sleeper` (what a level does to memory: :mod:`kubevram.worker.sleep`) and is
asleep at that level. A parked request (``wake_on_request``) or :meth:`Engine.wake` makes the loop call
the sleeper's ``wake`` between two steps; the parked requests then join the queue in their order, and
every wake asked until it is done (those asked while it ran included) gets its figures. A wake that
comes before the ordered sleep could happen calls the sleep off; a sleep asked while a wake is under
way or due is refused (409 ``waking_up``). No request is lost: each
ends in exactly one ``on_finished`` reason, as always.

**Gauges** for an Inference Gateway (:mod:`kubevram.worker.metrics`): :attr:`Engine.queue_depth`
(waiting and parked), :attr:`Engine.requests_running` (in the batch or being prefilled) and
:attr:`Engine.kv_cache_usage`: the bytes the running batch's KV cache holds (every layer's keys and
values, padding included, updated after each step) over the planned KV budget
(``kv_cache_budget_bytes``, the plan's ``kvCacheBytes``); without one, ``max_batch_size x
max_sequence_length`` positions at the bytes one position takes in this model's cache, measured with a
one-token forward by :meth:`Engine.start`, before the loop's thread starts.

**A multi-node replica** (``group``: a :class:`kubevram.worker.group.Group`) is the same engine on every
rank. Rank 0 admits requests and, in :meth:`_step`, shares which ones it prefills; every other rank runs
:meth:`run_follower`, which takes each shared step and runs the very same :meth:`_step`. After sampling,
rank 0 shares the tokens it drew and the rows cancelled or failed meanwhile, and every rank keeps those
(:meth:`_agree`), so that stop strings, lengths and cache shrinking stay identical everywhere. A failed
step is fatal in a group (ranks cannot diverge), and so is a lost rank (:meth:`fail_group`): the engine
fails like a dead loop, and the leader answers 503. A pipeline stage's cache holds only its own layers
(transformers' ``DummyLayer`` for the others, :meth:`_new_cache`).
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
from typing import Any, Protocol, TypeVar

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
        self, prompt_ids: Sequence[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None
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
        if self.loop is None:  # a rank other than 0 of a group steps the request; nobody reads it here
            return
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


class Sleeper(Protocol):
    """What sleeping and waking do to memory (:class:`kubevram.worker.sleep.Sleeper`): called on the
    engine thread, between two steps, with no request in the batch. A failed ``sleep`` must leave the
    model as it was."""

    def sleep(self, level: int, reason: str) -> dict[str, Any]: ...

    def wake(self, reason: str) -> dict[str, Any]: ...


#: Seconds a refused request is told to wait (``Retry-After``) while the worker sleeps, before a wake
#: has been measured; after one, the seconds it took (rounded up).
SLEEP_RETRY_AFTER = 5


@dataclass
class _SleepOrder:
    level: int
    reason: str
    ordered: float
    futures: list[concurrent.futures.Future[dict[str, Any]]]
    started: bool = False  # the loop is carrying it out: a wake now waits for it, then wakes


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
        kv_cache_budget_bytes: int | None = None,
        group: Any = None,
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
        self.vocab_size = _vocab_size(model)
        # The gauges (module docstring): the running batch's KV bytes and the budget they are a share of.
        self.kv_cache_bytes = 0
        self.kv_cache_budget_bytes = kv_cache_budget_bytes
        self.kv_bytes_per_position: int | None = None  # measured when the loop starts
        self.kv_cache_dtype: str | None = None
        # Sleep and wake (module docstring): the level (0 awake), who does the memory work, what to do
        # with requests that arrive while asleep, and the orders the loop has yet to carry out.
        self.sleeper: Sleeper | None = None
        self.wake_on_request = True
        self.sleep_level = 0
        self.last_wake_seconds: float | None = None
        self._sleep_order: _SleepOrder | None = None
        self._wake_orders: list[tuple[str, concurrent.futures.Future[dict[str, Any]]]] = []
        self._waking = False  # the loop is carrying out a wake
        self._parked: collections.deque[RequestHandle] = collections.deque()
        # A multi-node replica: this rank's group (None: the replica is this process alone).
        self.group = group
        self.kv_peak_bytes = 0  # the largest KV cache this rank held (groups report it per rank)
        if group is not None:
            group.watch(self.fail_group)

    # ---- the outside: any thread --------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting: in the queue, or parked while the loop sleeps."""
        return len(self._pending) + len(self._parked)

    @property
    def requests_running(self) -> int:
        """Requests in the running batch or being prefilled."""
        return self.running + len(self._prefilling)

    @property
    def kv_cache_usage(self) -> float:
        """The share (0-1) of the KV budget the running batch holds; 0 while the budget is unknown."""
        budget = self.kv_cache_budget_bytes
        if not budget:
            return 0.0
        return min(1.0, self.kv_cache_bytes / budget)

    @property
    def sleeping(self) -> bool:
        """Asleep (at ``sleep_level``), or ordered to sleep once the admitted requests finish."""
        return self.sleep_level > 0 or self._sleep_order is not None

    @property
    def alive(self) -> bool:
        """Whether the loop runs (or has not been started yet) and has not died."""
        return self.failure is None and not self._stopping

    @property
    def idle(self) -> bool:
        """No request running, taken from the queue (about to be prefilled) or waiting."""
        return self._batch is None and not self._prefilling and not self._pending and not self._parked

    def start(self) -> None:
        """Measure the KV cache (the gauges' budget, module docstring), then start the loop's thread."""
        if self._thread is None:
            if self.group is None:  # a group's ranks forward only together: the plan gives the budget
                self._measure_kv_position()
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
        if self.group is not None and self.group.rank != 0:
            raise EngineError(
                503,
                f"this pod is {self.group.member.describe()} of a multi-node replica; its leader "
                "(LWS_WORKER_INDEX 0) serves the requests",
                type="service_unavailable",
                code="not_leader",
            )
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
            queue = self._pending
            if self.sleeping:
                if not self.wake_on_request:
                    raise self.asleep_error()
                queue = self._parked
            if self.queue_depth >= self.max_queue:
                raise EngineError(
                    429,
                    f"the request queue is full ({self.max_queue} waiting); retry later",
                    type="rate_limit_exceeded",
                    code="queue_full",
                    retry_after=1,
                )
            queue.append(handle)
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
        """Fail every running and waiting request with ``error``; how many. The waiting ones (queued,
        or parked while the loop sleeps or wakes) at once, from any thread: a wake from level 2 can
        reload for minutes, and a drain must not wait for it; those in the loop's hands (the running
        batch, a step's prefill) between two steps."""
        if self.failure is not None or self._thread is None:
            return 0
        with self._cond:
            waiting = list(self._pending) + list(self._parked)
            self._pending.clear()
            self._parked.clear()
            # Every request the loop holds is in the batch or being prefilled (engine thread).
            held = self._batch is not None or bool(self._prefilling)
        self._fail(waiting, error)
        if not held:
            return len(waiting)

        def abort() -> int:
            if self.group is not None:
                self.group.share(("reset",))  # every rank drops the batch too
            return self._fail_all(error)

        return len(waiting) + await self.run_between_steps(abort)

    def fail_group(self, why: str) -> None:
        """A rank of the group is gone (any thread): fail like a dead loop, at once; the loop ends."""
        with self._cond:
            if self.failure is not None:
                return
            self.failure = why
            self._stopping = True
            self._fail_all(self.dead_error())
            self._cond.notify_all()

    async def group_stats(self) -> list[dict[str, int]]:
        """Every rank's weights and KV cache peak (rank 0 of a group, between two steps)."""
        if self.group is None:
            return [self.rank_stats()]

        def gather() -> list[dict[str, int]]:
            self.group.share(("stats",))
            return list(self.group.gather(self.rank_stats()) or [])

        return await self.run_between_steps(gather)

    def rank_stats(self) -> dict[str, int]:
        """This process's share of the model: bytes of its parameters and buffers (tensor-parallel
        shards as held here), and the largest KV cache it held."""
        seen: set[int] = set()
        weights = 0
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            if id(tensor) not in seen:  # a tied weight is one tensor
                seen.add(id(tensor))
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                weights += local.numel() * local.element_size()
        return {"rank": self.group.rank if self.group is not None else 0, "weightsBytes": weights,
                "kvCachePeakBytes": self.kv_peak_bytes}

    async def sleep(self, level: int, reason: str = "request") -> dict[str, Any]:
        """Order a sleep at ``level`` and wait for it: the admitted requests finish first, new ones are
        parked or refused (module docstring). The sleeper's figures, with ``waitedSeconds`` (the wait
        for the admitted requests). Asleep already at this level or deeper: ``{"alreadyAsleep": true}``;
        409 for a deeper level than the current (wake it first) or than a sleep already ordered, and
        409 ``waking_up`` while a wake is under way or due (a parked request or a wake_up waits for it)."""
        if self.sleeper is None:
            raise EngineError(409, "this worker cannot sleep (no sleeper is bound to its engine)")
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        with self._cond:
            if self.failure is not None:
                raise self.dead_error()
            if self._stopping:
                raise EngineError(503, "the worker is shutting down", type="service_unavailable")
            if self.sleep_level and (self._waking or self._transition_due() == "wake"):
                raise EngineError(
                    409,
                    f"the worker is waking up from level {self.sleep_level} (a request or a wake_up "
                    "waits for it); sleep once it is awake",
                    code="waking_up",
                    retry_after=max(1, math.ceil(self.last_wake_seconds or SLEEP_RETRY_AFTER)),
                )
            current = self.sleep_level or (self._sleep_order.level if self._sleep_order else 0)
            if current and level > current:
                raise EngineError(
                    409,
                    f"level: the worker is asleep (or going to sleep) at level {current}; "
                    f"POST wake_up before sleeping at level {level}",
                    param="level",
                    code="already_asleep",
                )
            if self.sleep_level:
                return {"level": self.sleep_level, "alreadyAsleep": True}
            if self._sleep_order is None:
                self._sleep_order = _SleepOrder(level, reason, time.monotonic(), [])
            self._sleep_order.futures.append(future)
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    async def wake(self, reason: str = "request") -> dict[str, Any]:
        """Wake the loop between two steps and wait for it; the sleeper's figures. Not asleep: a sleep
        still waiting for the admitted requests is called off (its callers get 409 ``sleep_cancelled``),
        and the answer is ``{"level": 0, "wasAsleep": false}``."""
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        with self._cond:
            if self.failure is not None:
                raise self.dead_error()
            if not self.sleep_level and not (self._sleep_order and self._sleep_order.started):
                order, self._sleep_order = self._sleep_order, None
                self._pending.extend(self._parked)
                self._parked.clear()
                self._cond.notify_all()
                if order is not None:
                    cancelled = EngineError(
                        409, "a wake_up came before the worker could sleep", code="sleep_cancelled"
                    )
                    for waiting in order.futures:
                        if waiting.set_running_or_notify_cancel():
                            waiting.set_exception(cancelled)
                return {"level": 0, "wasAsleep": False}
            self._wake_orders.append((reason, future))
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    def asleep_error(self) -> EngineError:
        """503 for a request that arrives while the worker sleeps and may not wake it."""
        retry = SLEEP_RETRY_AFTER if self.last_wake_seconds is None else math.ceil(self.last_wake_seconds)
        state = f"asleep (level {self.sleep_level})" if self.sleep_level else "going to sleep"
        return EngineError(
            503,
            f"the worker is {state} and memoryRelease.wakeOnRequest is false; "
            "POST /v1/admin/wake_up wakes it, or retry on another replica",
            type="service_unavailable",
            code="sleeping",
            retry_after=max(1, retry),
        )

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
            for queue in (self._pending, self._parked):
                if handle in queue:
                    queue.remove(handle)
                    break
            else:
                return  # already taken by the loop, which counts it
        handle.finished = True
        self.hooks.on_finished("cancelled")

    # ---- the loop: the engine thread ----------------------------------------------------------

    def drop_cancelled(self) -> int:
        """Remove the running batch's rows whose client went away, their KV cache rows with them; how
        many. The next step drops them anyway; a memory release does it now. Engine thread only. In a
        group the ranks drop them together, at the next step."""
        batch = self._batch
        if batch is None or self.group is not None:
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
        self._update_kv_bytes()
        return dropped

    def _run(self) -> None:
        """The thread's body: the loop; if it dies, fail everything and refuse what comes."""
        try:
            if self.group is not None and self.group.rank != 0:
                self._follow()
            else:
                self._loop()
        except BaseException as exc:
            if self.failure is not None:  # the group was lost: its collectives fail, as they must
                return
            self.failure = f"{type(exc).__name__}: {exc}"
            log.critical("the engine loop died: %s", self.failure, exc_info=True)
            with self._cond:
                callbacks = [future for _, future in self._callbacks] + self._take_orders()
                self._callbacks.clear()
                self._fail_all(self.dead_error())
            for future in callbacks:
                if future.set_running_or_notify_cancel():
                    future.set_exception(self.dead_error())

    def _loop(self) -> None:
        log.info("engine loop started (max batch %d, queue %d)", self.max_batch_size, self.max_queue)
        while True:
            with self._cond:
                while not (
                    self._stopping
                    or self._callbacks
                    or self._batch
                    or (self._pending and not self.sleep_level)
                    or self._transition_due()
                ):
                    self._cond.wait()
                if self._stopping:
                    break
                callbacks = list(self._callbacks)
                self._callbacks.clear()
                transition = self._transition_due()
                if transition == "sleep":
                    assert self._sleep_order is not None
                    self._sleep_order.started = True
                self._waking = transition == "wake"
                new: list[RequestHandle] = []
                room = self.max_batch_size - (len(self._batch.rows) if self._batch else 0)
                if not transition and not self.sleep_level and (self._batch is None or self._joinable):
                    while self._pending and len(new) < room:
                        new.append(self._pending.popleft())
                # Taken: counted as running (and failed by an abort) while the callbacks run.
                self._prefilling = new
            _run_callbacks(callbacks)
            if transition:
                self._transition(transition)
                continue
            self._step(new)
        if self.group is not None and self.failure is None:
            self.group.share(("stop",))
        stopped = EngineError(503, "the worker is shutting down", type="service_unavailable")
        with self._cond:
            self._fail_all(stopped)
            orders = self._take_orders()
        for future in orders:
            if future.set_running_or_notify_cancel():
                future.set_exception(stopped)

    # ---- states of the loop: sleep and wake (engine thread, or with the lock held) -------------

    def _transition_due(self) -> str | None:
        """``"sleep"`` once an ordered sleep has nothing left to wait for; ``"wake"`` when asked, or
        when a request is parked and may wake the loop. With the lock held."""
        order = self._sleep_order
        if order is not None and not order.started and self._batch is None and not self._pending:
            return "sleep"
        if self.sleep_level and (self._wake_orders or (self.wake_on_request and self._parked)):
            return "wake"
        return None

    def _transition(self, kind: str) -> None:
        """Carry out a sleep or a wake through the sleeper, between two steps; its figures (or its
        failure) go to the callers who asked. A failed sleep leaves the loop awake, the parked requests
        queued; a failed wake leaves it asleep and fails the parked requests with 503."""
        assert self.sleeper is not None
        started = time.monotonic()
        if kind == "sleep":
            order = self._sleep_order
            assert order is not None and order.started  # only the loop ends a started order
            try:
                result = dict(self.sleeper.sleep(order.level, order.reason))
            except BaseException as exc:
                log.error("sleeping at level %d failed: %s: %s", order.level, type(exc).__name__, exc)
                with self._cond:
                    self._sleep_order = None
                    self._pending.extend(self._parked)
                    self._parked.clear()
                    woken, self._wake_orders = self._wake_orders, []
                _settle(order.futures, exc)
                _settle([future for _, future in woken], {"level": 0, "wasAsleep": False})
                return
            result["waitedSeconds"] = round(started - order.ordered, 6)
            with self._cond:
                self.sleep_level, self._sleep_order = order.level, None
            _settle(order.futures, result)
            return
        with self._cond:
            reason = self._wake_orders[0][0] if self._wake_orders else "arrival"
        try:
            result = dict(self.sleeper.wake(reason))
        except BaseException as exc:
            log.error("waking up failed: %s: %s", type(exc).__name__, exc)
            error = EngineError(
                503,
                f"the worker could not wake up ({type(exc).__name__}: {exc}); retry later",
                type="service_unavailable",
                code="wake_failed",
                retry_after=SLEEP_RETRY_AFTER,
            )
            with self._cond:
                parked = list(self._parked)
                self._parked.clear()
                futures, self._waking = self._take_wake_orders(), False
            self._fail(parked, error)
            _settle(futures, error)
            return
        self.last_wake_seconds = float(result.get("seconds", time.monotonic() - started))
        with self._cond:
            self.sleep_level = 0
            self._pending.extend(self._parked)
            self._parked.clear()
            # Every wake_up asked until now, those that came while it woke included, is answered.
            futures, self._waking = self._take_wake_orders(), False
        _settle(futures, result)

    def _take_wake_orders(self) -> list[concurrent.futures.Future[dict[str, Any]]]:
        """The callers waiting for a wake (with the lock held); the orders are gone."""
        futures = [future for _, future in self._wake_orders]
        self._wake_orders = []
        return futures

    def _take_orders(self) -> list[concurrent.futures.Future[dict[str, Any]]]:
        """Every caller still waiting for a sleep or a wake (with the lock held); the orders are gone."""
        futures = self._take_wake_orders()
        if self._sleep_order is not None:
            futures += self._sleep_order.futures
        self._sleep_order = None
        return futures

    # ---- the KV gauges (engine thread; the measurement before it starts) ------------------------------

    def _measure_kv_position(self) -> None:
        """The bytes one position takes in this model's KV cache (a one-token forward), hence the
        budget when none was given: ``max_batch_size x max_sequence_length`` positions."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
            ids = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=self.device)
            with torch.inference_mode():
                out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache}, **self._keep_last)
            del out
            self.kv_bytes_per_position = cache_bytes(cache)
            dtypes = {t.dtype for t in _cache_tensors(cache)}
            self.kv_cache_dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None
        except Exception as exc:  # a model whose cache cannot be measured still serves
            log.info("cannot measure the KV cache's bytes per position: %s: %s", type(exc).__name__, exc)
            return
        if self.kv_cache_budget_bytes is None and self.kv_bytes_per_position:
            self.kv_cache_budget_bytes = (
                self.kv_bytes_per_position * self.max_batch_size * self.max_sequence_length
            )

    def _update_kv_bytes(self) -> None:
        self.kv_cache_bytes = cache_bytes(self._batch.cache) if self._batch is not None else 0

    def run_follower(self) -> None:
        """A rank other than 0: step as rank 0 shares, on the calling thread, until it stops or the group
        is lost (then :attr:`failure` says why)."""
        self._run()

    def _follow(self) -> None:
        """The loop of a rank other than 0: each step is the one rank 0 shared (its requests in order);
        functions asked for run between two of them."""
        assert self.group is not None
        log.info("%s: following the leader's steps", self.group.member.describe())
        while not self._stopping:
            message = self.group.share()
            with self._cond:
                callbacks = list(self._callbacks)
                self._callbacks.clear()
            _run_callbacks(callbacks)
            kind = message[0]
            if kind == "stop":
                break
            if kind == "reset":
                self._batch = None
                self.running = 0
            elif kind == "stats":
                self.group.gather(self.rank_stats())
            else:
                self._step([RequestHandle(ids, params, None) for ids, params in message[1]])
        self._stopping = True  # the leader stopped the group: this rank is done

    def _step(self, new: list[RequestHandle]) -> None:
        """One step: prefill the requests just taken from the queue, else decode the running batch."""
        new = [h for h in new if not h.finished]  # a callback (an abort) may have ended them
        for handle in new:
            if handle.cancelled.is_set():
                handle.finished = True
                self.hooks.on_finished("cancelled")
        new = [h for h in new if not h.cancelled.is_set()]
        if self.group is not None and self.group.rank == 0 and (new or self._batch is not None):
            self.group.share(("step", [(h.prompt_ids, h.params) for h in new]))
        self._prefilling = new
        if new:
            self._guarded(self._prefill, new)
        elif self._batch is not None:
            self._guarded(self._decode, None)
        self._prefilling = []
        self._update_kv_bytes()

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
            if self.group is not None:
                raise
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
            if self.group is not None:
                raise  # the ranks would diverge: the group fails
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
        self.kv_cache_bytes = 0
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
        rows += self._prefilling + list(self._pending) + list(self._parked)
        self._prefilling = []
        self._pending.clear()
        self._parked.clear()
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
        cache = self._new_cache(DynamicCache)
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
        cancelled = {i for i, row in enumerate(batch.rows) if row.handle.cancelled.is_set()}
        if self.group is not None:
            tokens, cancelled, failed = self._agree(batch, tokens, cancelled, failed)
        batch.input_ids = torch.cat([batch.input_ids, tokens[:, None]], dim=-1)
        ones = batch.attention_mask.new_ones((len(tokens), 1))
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=-1)
        batch.prompt_length = -1  # past every row's first step
        is_eos = torch.isin(tokens, self._eos).tolist()
        keep = []
        for i, (row, token, eos) in enumerate(zip(batch.rows, tokens.tolist(), is_eos, strict=True)):
            if i in cancelled:
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

    def _agree(
        self, batch: _Batch, tokens: torch.Tensor, cancelled: set[int], failed: dict[int, EngineError]
    ) -> tuple[torch.Tensor, set[int], dict[int, EngineError]]:
        """Rank 0's draw, cancellations and failed rows, on every rank (which also notes its KV cache)."""
        assert self.group is not None
        self.kv_peak_bytes = max(self.kv_peak_bytes, cache_bytes(batch.cache))
        mine = (tokens.tolist(), sorted(cancelled), {i: (e.status, e.message) for i, e in failed.items()})
        drawn, gone, bad = self.group.share(mine if self.group.rank == 0 else None)
        for i in gone:
            batch.rows[i].handle.cancelled.set()
        errors = {i: EngineError(code, text, type="server_error") for i, (code, text) in bad.items()}
        return torch.tensor(drawn, dtype=torch.long, device=tokens.device), set(gone), errors

    def _new_cache(self, cache_class: Any) -> Any:
        """A KV cache for the model; a pipeline stage's holds only the layers it owns (transformers'
        ``DummyLayer`` for the others, which its masks then skip)."""
        cache = cache_class(config=self.model.config)
        stage = getattr(self.model, "_pp_stage", None)
        if stage is not None:
            from transformers.cache_utils import DummyLayer

            first, end = stage.layer_range_for_rank(stage.pp_rank, len(cache.layers))
            for i in range(len(cache.layers)):
                if not first <= i < end:
                    cache.layers[i] = DummyLayer()
        return cache

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


def _settle(futures: Sequence[concurrent.futures.Future[Any]], outcome: Any) -> None:
    """Give each waiting caller ``outcome``: a result, or the exception it is."""
    for future in futures:
        if future.set_running_or_notify_cancel():
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor a transformers cache holds: each layer's keys and values (and any other tensor
    attribute a layer kind keeps, such as a quantised cache's)."""
    tensors = []
    for layer in getattr(cache, "layers", None) or []:
        tensors += [value for value in vars(layer).values() if isinstance(value, torch.Tensor)]
    return tensors


def cache_bytes(cache: Any) -> int:
    """Bytes ``cache`` holds, on every device."""
    return sum(t.numel() * t.element_size() for t in _cache_tensors(cache))


def _vocab_size(model: Any) -> int:
    """Rows of the output head (the ids a prompt may use), else the config's ``vocab_size``."""
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except AttributeError:
        return int(getattr(model.config, "vocab_size", 0) or 0)


def _run_callbacks(callbacks: Sequence[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]) -> None:
    """Run the functions :meth:`Engine.run_between_steps` queued, each answering its future."""
    for fn, future in callbacks:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


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
    except AttributeError:  # a later pipeline stage holds no embeddings: its own parameters' device
        for param in model.parameters():
            if param.device.type != "meta":
                return torch.device(param.device)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _plain_dynamic_cache(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain growing ``DynamicLayer`` (no sliding window, no
    quantisation): only such caches can be padded and concatenated along the batch."""
    from transformers.cache_utils import DummyLayer, DynamicLayer

    layers = [layer for layer in getattr(cache, "layers", None) or [] if type(layer) is not DummyLayer]
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _held(cache: Any) -> list[Any]:
    """The layers of ``cache`` that hold keys and values (not a pipeline stage's ``DummyLayer``)."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


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
        for layer in _held(batch.cache):
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
            for layer in _held(part.cache):
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, missing, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, missing, 0))
    for mine, theirs in zip(_held(batch.cache), _held(group.cache), strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)
    batch.rows = batch.rows + group.rows
    batch.input_ids = torch.cat([batch.input_ids, group.input_ids], dim=0)
    batch.attention_mask = torch.cat([batch.attention_mask, group.attention_mask], dim=0)
    batch.positions = torch.cat([batch.positions, group.positions], dim=0)
    batch.prompt_length = -1
    return batch
