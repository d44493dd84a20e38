"""``kubevram worker``: serve HTTP at once, load the model in the background, turn ready when loaded.

``/healthz`` answers as soon as the server listens; ``/readyz`` turns 200 only once the model is loaded
and the engine runs (a failed load turns the process off with exit status 1, so the pod restarts).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.api.v1alpha1 import GenerationSpec, ServingSpec
from kubevram.api.workerplan import WorkerPlan
from kubevram.worker.service import WorkerState

log = logging.getLogger("kubevram.worker")

DEFAULT_MAX_QUEUE = 256


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
    updates = {}
    if getattr(args, "max_batch_size", None):
        updates["maxBatchSize"] = args.max_batch_size
    if getattr(args, "max_sequence_length", None):
        updates["maxSequenceLength"] = args.max_sequence_length
    if updates:
        serving = serving.model_copy(update=updates)
    names = [getattr(args, "served_model_name", None) or (plan.model.id if plan else args.model)]
    if args.model not in names:
        names.append(args.model)
    return WorkerState(model_names=names, serving=serving, generation=generation), plan


def load_into(
    state: WorkerState, model_id: str, plan: WorkerPlan | None, max_queue: int = DEFAULT_MAX_QUEUE
) -> None:
    """Load the model, start the engine and make ``state`` ready (on the calling thread)."""
    from kubevram.worker.engine import Engine
    from kubevram.worker.loader import load

    loaded = load(model_id, plan, state.generation.chinese)
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
    )
    if state.memory is not None:
        state.memory.bind(engine)
    engine.start()
    state.metrics.bind(engine)
    state.engine = engine
    log.info(
        "ready: serving %s (max batch %d, max sequence %d) after %.1f s",
        ", ".join(state.model_names),
        state.serving.maxBatchSize,
        state.serving.maxSequenceLength,
        loaded.seconds,
    )


def start_loading(
    state: WorkerState,
    model_id: str,
    plan: WorkerPlan | None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    on_failure: Callable[[], None] | None = None,
) -> threading.Thread:
    """:func:`load_into` on a background thread; a failure is logged, kept in ``state`` and reported."""

    def target() -> None:
        try:
            load_into(state, model_id, plan, max_queue)
        except Exception as exc:
            log.exception("loading %s failed", model_id)
            state.load_error = f"{type(exc).__name__}: {exc}"
            if on_failure is not None:
                on_failure()

    thread = threading.Thread(target=target, name="kubevram-loader", daemon=True)
    thread.start()
    return thread


async def serve_all(servers: Sequence[Any], background: Sequence[Coroutine[Any, Any, None]] = ()) -> None:
    """Run uvicorn ``servers`` and ``background`` tasks in one loop; when one server stops, all stop."""
    tasks = [asyncio.create_task(coro) for coro in background]
    serving = [asyncio.create_task(server.serve()) for server in servers]
    try:
        await asyncio.wait(serving, return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*serving, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_worker(args: argparse.Namespace) -> int:
    """The ``kubevram worker`` command: 0 on a clean shutdown, 1 if the model could not be loaded."""
    import uvicorn

    from kubevram.worker.admin import TOKEN_ENV, create_admin_app, install_admin, register_metrics
    from kubevram.worker.api import create_app
    from kubevram.worker.memory import MemoryMonitor
    from kubevram.worker.reporter import StatusReporter

    level = str(getattr(args, "log_level", None) or "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state, plan = build_state(args)
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
        uvicorn.Server(
            uvicorn.Config(a, host=args.host, port=p, log_level=level.lower(), timeout_graceful_shutdown=10)
        )
        for a, p in apps
    ]

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    start_loading(
        state, args.model, plan, getattr(args, "max_queue", None) or DEFAULT_MAX_QUEUE, on_failure=stop
    )
    log.info("listening on %s:%d; loading %s", args.host, args.port, args.model)
    reporter = StatusReporter.from_env(state.memory, plan)
    background = [state.memory.watch()] + ([reporter.run()] if reporter is not None else [])
    asyncio.run(serve_all(servers, background))
    if state.engine is not None:
        state.engine.stop()
    return 1 if state.load_error else 0
