"""``kubevram worker``: serve HTTP at once, load the model in the background, turn ready when loaded.

``/healthz`` answers as soon as the server listens; ``/readyz`` turns 200 only once the model is loaded
and the engine runs (a failed load turns the process off with exit status 1, so the pod restarts; the
reason is one line of log). Bad flags and a ``--model`` path that does not exist end at once with one
line on stderr and exit status 2.

**Shutdown.** On SIGTERM (or SIGINT) the worker drains: ``/readyz`` answers 503 and new requests are
refused (503 ``shutting_down``, so that a gateway retries them elsewhere), the running and waiting
requests go on for up to ``--drain-seconds`` (20: the pod's ``terminationGracePeriodSeconds``, 30, less
its 5 s ``preStop`` pause and a 5 s margin); what has not finished then is ended with a 503, as a
final SSE error event and ``data: [DONE]`` for streams. Then the servers stop, the status reporter
removes this pod's ``status.workers`` entry, and the process exits 0. A second signal ends the drain
at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from kubevram.api.errors import SpecError, from_validation_error
from kubevram.api.v1alpha1 import GenerationSpec, ServingSpec
from kubevram.api.workerplan import WorkerPlan
from kubevram.worker.engine import EngineError
from kubevram.worker.service import WorkerState

log = logging.getLogger("kubevram.worker")

DEFAULT_MAX_QUEUE = 256
#: The rendered pod's terminationGracePeriodSeconds (30) less its preStop pause (5) and a margin (5).
DEFAULT_DRAIN_SECONDS = 20.0
_FLAGS = {"maxBatchSize": "--max-batch-size", "maxSequenceLength": "--max-sequence-length"}


def build_state(args: argparse.Namespace) -> tuple[WorkerState, WorkerPlan | None]:
    """Settings from ``--plan`` (else ``--deployment``, else defaults), then the flags over them."""
    plan = WorkerPlan.from_file(args.plan) if getattr(args, "plan", None) else None
    serving, generation = ServingSpec(), GenerationSpec()
    if plan is not None:
        serving, generation = plan.serving, plan.generation
    elif getattr(args, "deployment", None):
        from kubevram.api.load import load_deployments

        path = Path(args.deployment)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(
                "", f"cannot read the deployment: {exc.strerror or exc}", source=str(path)
            ) from None
        spec = load_deployments(text, str(path))[0].spec
        serving, generation = spec.serving, spec.generation
    updates = {
        field: getattr(args, flag[2:].replace("-", "_"), None)
        for field, flag in _FLAGS.items()
        if getattr(args, flag[2:].replace("-", "_"), None) is not None
    }
    if updates:
        try:
            serving = ServingSpec.model_validate({**serving.model_dump(), **updates})
        except ValidationError as exc:
            error = from_validation_error(exc)
            raise SpecError(_FLAGS.get(error.field, error.field), error.message) from None
    for flag, least in (("max_queue", 1), ("max_body_bytes", 1), ("drain_seconds", 0)):
        value = getattr(args, flag, None)
        if value is not None and value < least:
            raise SpecError(f"--{flag.replace('_', '-')}", f"{value!r} must be >= {least}")
    names = [getattr(args, "served_model_name", None) or (plan.model.id if plan else args.model)]
    if args.model not in names:
        names.append(args.model)
    state = WorkerState(model_names=names, serving=serving, generation=generation)
    state.max_body_bytes = getattr(args, "max_body_bytes", None)
    return state, plan


def check_model_path(model: str) -> None:
    """A ``--model`` written as a path (``/``, ``./``, ``~``, or more than one ``/``: a hub id has at
    most one) must exist; hub ids are left to transformers."""
    path = Path(model).expanduser()
    if path.exists():
        return
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise SpecError("--model", f"{model!r}: no such directory")


def join_group(plan: WorkerPlan | None, model_id: str, plan_path: str | None) -> Any:
    """A pod of a multi-node replica: start this pod's other local ranks and join the group (None for a
    single-pod replica)."""
    if plan is None or plan.group is None:
        return None
    from kubevram.worker.group import Group, member_from_env, start_local_ranks

    group = Group(member_from_env(plan.group))
    if plan.group.gpusPerPod > 1:
        assert plan_path is not None
        start_local_ranks(model_id, plan_path, plan.group.gpusPerPod, group.fail)
    group.join()
    return group


def load_into(
    state: WorkerState,
    model_id: str,
    plan: WorkerPlan | None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    plan_path: str | None = None,
) -> None:
    """Load the model, start the engine and make ``state`` ready (on the calling thread). A pod of a
    multi-node replica joins its group first, and is ready once every rank has loaded."""
    from kubevram.worker.engine import Engine
    from kubevram.worker.loader import load, load_weights

    group = join_group(plan, model_id, plan_path)
    loaded = load(model_id, plan, state.generation.chinese, group=group)
    if group is not None:
        group.barrier()  # every rank has its share
    limit = state.serving.maxSequenceLength
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions < limit:
        log.warning(
            "maxSequenceLength %d is past the model's %d positions; serving %d", limit, positions, positions
        )
        state.serving = state.serving.model_copy(update={"maxSequenceLength": positions})
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        max_batch_size=state.serving.maxBatchSize,
        max_queue=max_queue,
        max_sequence_length=state.serving.maxSequenceLength,
        token_classes=loaded.token_classes,
        eos_token_ids=loaded.eos_token_ids,
        hooks=state.memory if state.memory is not None else state.metrics,
        kv_cache_budget_bytes=kv_budget(plan, group),
        group=group,
    )
    if state.memory is not None:
        # Sleep level 2 drops the model; the wake loads it from the files again, as here.
        state.memory.bind(engine, reload=lambda: load_weights(model_id, plan))
    engine.start()
    state.metrics.bind(engine, state.model_names[0])
    state.engine = engine
    log.info(
        "ready: serving %s (max batch %d, max sequence %d) after %.1f s",
        ", ".join(state.model_names),
        state.serving.maxBatchSize,
        state.serving.maxSequenceLength,
        loaded.seconds,
    )


def kv_budget(plan: WorkerPlan | None, group: Any) -> int | None:
    """The KV cache this process may hold (the gauges' budget): the plan's, or this rank's in a group."""
    if plan is None:
        return None
    if group is not None and plan.group is not None:
        return plan.group.ranks[group.rank].kvCache
    return plan.kvCacheBytes


def start_loading(
    state: WorkerState,
    model_id: str,
    plan: WorkerPlan | None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    on_failure: Callable[[], None] | None = None,
    plan_path: str | None = None,
) -> threading.Thread:
    """:func:`load_into` on a background thread; a failure is logged, kept in ``state`` and reported."""

    def target() -> None:
        try:
            load_into(state, model_id, plan, max_queue, plan_path)
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading %s failed: %s", model_id, " ".join(state.load_error.split()))
            log.debug("the failed load's traceback", exc_info=exc)
            if on_failure is not None:
                on_failure()

    thread = threading.Thread(target=target, name="kubevram-loader", daemon=True)
    thread.start()
    return thread


class Server(uvicorn.Server):
    """A uvicorn server that leaves signals to :func:`serve_all` (uvicorn's own handling re-raises
    SIGTERM once it has stopped, so that the process ended with status 143 before it cleaned up)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def drain(state: WorkerState, seconds: float, force: asyncio.Event | None = None) -> int:
    """Stop admission, let the requests in flight finish for up to ``seconds``, then end the rest with
    a 503 (streams get an error event and ``[DONE]``); how many were ended."""
    state.draining = True
    engine = state.engine
    if engine is None or not engine.alive:
        return 0
    log.info("draining: readiness is off; %.0f s for the requests in flight to finish", seconds)
    deadline = time.monotonic() + seconds
    while not engine.idle and time.monotonic() < deadline and not (force and force.is_set()):
        await asyncio.sleep(0.05)
    if engine.idle:
        log.info("drained: every request finished")
        return 0
    ended = await engine.abort_all(
        EngineError(
            503,
            f"the worker shut down before the request finished (it had {seconds:.0f} s); retry it",
            type="service_unavailable",
            code="shutting_down",
            retry_after=1,
        )
    )
    log.warning("drain time is up: %d request(s) ended with an error", ended)
    return ended


async def serve_all(
    servers: Sequence[Any],
    background: Sequence[Coroutine[Any, Any, None]] = (),
    state: WorkerState | None = None,
    drain_seconds: float = DEFAULT_DRAIN_SECONDS,
) -> None:
    """Run uvicorn ``servers`` and ``background`` tasks in one loop; when one server stops, all stop.
    SIGTERM and SIGINT drain ``state`` first (module docstring); the background tasks are cancelled
    last (the reporter then removes this pod's status entry)."""
    loop = asyncio.get_running_loop()
    signalled, force = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        log.info("received %s", signal.Signals(signum).name)
        (force if signalled.is_set() else signalled).set()

    handled = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
            handled.append(signum)
    tasks = [asyncio.create_task(coro) for coro in background]
    serving = [asyncio.create_task(server.serve()) for server in servers]
    waiting = asyncio.create_task(signalled.wait())
    try:
        done, _ = await asyncio.wait([*serving, waiting], return_when=asyncio.FIRST_COMPLETED)
        if waiting in done and state is not None:
            await drain(state, drain_seconds, force)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*serving, return_exceptions=True)
    finally:
        waiting.cancel()
        for signum in handled:
            loop.remove_signal_handler(signum)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_worker(args: argparse.Namespace) -> int:
    """The ``kubevram worker`` command: 0 on a clean shutdown, 1 if the model could not be loaded."""
    from kubevram.worker.admin import TOKEN_ENV, create_admin_app, install_admin, register_metrics
    from kubevram.worker.api import create_app
    from kubevram.worker.memory import MemoryMonitor
    from kubevram.worker.reporter import StatusReporter

    level = str(getattr(args, "log_level", None) or "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state, plan = build_state(args)
    check_model_path(args.model)
    if plan is not None and plan.model.id != args.model:
        log.info(
            "plan for %s/%s: model %s is loaded from %s",
            plan.deployment.namespace,
            plan.deployment.name,
            plan.model.id,
            args.model,
        )
    state.memory = MemoryMonitor.for_plan(state.metrics, plan)
    register_metrics(state.metrics.registry, state.memory)
    token = os.environ.get(TOKEN_ENV) or None
    app = create_app(state)
    apps = [(app, args.port)]
    admin_port = getattr(args, "admin_port", None)
    if admin_port:  # the admin routes only on their own port, which the Service leaves out
        apps.append((create_admin_app(state.memory, token), admin_port))
    else:
        install_admin(app, state.memory, token)
    servers = [
        Server(
            uvicorn.Config(a, host=args.host, port=p, log_level=level.lower(), timeout_graceful_shutdown=10)
        )
        for a, p in apps
    ]

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    start_loading(
        state, args.model, plan, getattr(args, "max_queue", None) or DEFAULT_MAX_QUEUE, on_failure=stop,
        plan_path=getattr(args, "plan", None),
    )
    log.info("listening on %s:%d; loading %s", args.host, args.port, args.model)
    reporter = StatusReporter.from_env(state.memory, plan)
    background = [state.memory.watch()] + ([reporter.run()] if reporter is not None else [])
    if plan is not None and plan.group is not None:
        background.append(follow_group(state, stop))
    drain_seconds = getattr(args, "drain_seconds", None)
    asyncio.run(
        serve_all(
            servers, background, state, DEFAULT_DRAIN_SECONDS if drain_seconds is None else drain_seconds
        )
    )
    if state.engine is not None:
        state.engine.stop()
    state.close()
    log.info("stopped")
    lost = state.engine is not None and state.engine.group is not None and state.engine.failure
    return 1 if state.load_error or lost else 0


async def follow_group(state: WorkerState, stop: Callable[[], None], interval: float = 0.2) -> None:
    """A pod of a multi-node replica other than the leader's ends when its ranks stop stepping (the leader
    stopped them, or the group was lost: then with status 1, so that the pod restarts and LeaderWorkerSet
    recreates the group). The leader stays up, answering 503 and not ready, when the group is lost."""
    while True:
        await asyncio.sleep(interval)
        engine = state.engine
        if engine is None or engine.group is None or engine.group.rank == 0:
            continue
        if not engine.alive:
            log.info("the group's steps have ended here (%s); stopping", engine.failure or "stopped")
            stop()
            return
