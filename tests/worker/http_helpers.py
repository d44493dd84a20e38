"""Helpers the worker's tests share: the admin token, a hand-moved clock, waiting for a condition, reading
SSE events and metrics, holding the engine between two steps, running ``kubevram worker`` in a process of
its own. (Imported by name: ``from conftest import`` would find whichever conftest.py pytest loaded last.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Clock:
    """A clock the test moves by hand (the idle policy is about elapsed time, not about waiting)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Samples = dict[str, list[tuple[dict[str, str], float]]]
_scraper = httpx.Client(timeout=30)  # one client: each new one builds an SSL context (~0.1 s)


def scrape(url: str) -> Samples:
    """``GET url/metrics``, parsed: sample name -> [(labels, value), ...]."""
    samples: Samples = {}
    for family in text_string_to_metric_families(_scraper.get(f"{url}/metrics").text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def metric(source: str | Samples, name: str, **labels: str) -> float | None:
    """One sample (of ``source``: a worker's URL or what :func:`scrape` read) whose labels include
    ``labels``; None if there is none."""
    samples = scrape(source) if isinstance(source, str) else source
    for have, value in samples.get(name, []):
        if labels.items() <= have.items():
            return value
    return None


class Pause:
    """Hold ``engine`` between two steps, from the next turn of its loop on (a function on its thread
    waits): a test looks at a state that would pass in milliseconds. A pause asked while another holds
    takes effect one turn later, after the step the first one held back."""

    def __init__(self, engine: Any) -> None:
        self.entered, self.gate = threading.Event(), threading.Event()

        def hold() -> None:
            self.entered.set()
            self.gate.wait(120)

        self.thread = threading.Thread(
            target=lambda: asyncio.run(engine.run_between_steps(hold)), daemon=True
        )
        self.thread.start()
        # Asked once the engine holds it (not when the thread gets round to it): the order is the test's.
        wait_for(
            lambda: self.entered.is_set() or any(fn is hold for fn, _ in list(engine._callbacks)),
            "the pause to be asked",
        )

    def wait(self) -> Pause:
        assert self.entered.wait(60), "the engine did not reach the end of a step"
        return self

    def resume(self) -> None:
        self.gate.set()
        self.thread.join(60)


@contextlib.contextmanager
def engine_paused(engine: Any) -> Iterator[None]:
    """:class:`Pause` ``engine`` for the block."""
    pause = Pause(engine).wait()
    try:
        yield
    finally:
        pause.resume()


def spawn(command: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    """``command`` in a process of its own, its stdout and stderr going to a file (read with
    :func:`output`): a pipe that nobody reads until the end fills after 64 KiB of log (a thousand access
    log lines of a test that polls ``/metrics``), and the worker then blocks on its next line."""
    with tempfile.NamedTemporaryFile("w", prefix="kubevram-worker-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, **kwargs)
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen[str], timeout: float | None = None) -> str:
    """What a process started by :func:`spawn` wrote; with ``timeout``, once it has exited."""
    if timeout is not None:
        proc.wait(timeout)
    return Path(proc.log_path).read_text(encoding="utf-8", errors="replace")  # type: ignore[attr-defined]


@contextlib.contextmanager
def stopping(proc: subprocess.Popen[str]) -> Iterator[dict[str, str]]:
    """Wait for ``proc`` at the end (its output under ``"out"``); kill it if the block fails."""
    done: dict[str, str] = {}
    try:
        yield done
    except BaseException:
        proc.kill()
        raise
    finally:
        done["out"] = output(proc, timeout=60)


def start_worker(
    model_dir: Path, *flags: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str, int]:
    """``kubevram worker --model model_dir *flags`` in a process of its own on a free port, once
    ``/readyz`` answers 200 (``/readyz`` answers nothing else before): (process, url, port)."""
    port = free_port()
    command = [sys.executable, "-m", "kubevram.cli", "worker", "--model", str(model_dir)]
    proc = spawn([*command, "--host", "127.0.0.1", "--port", str(port), *flags],
                 env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    seen = set()
    while True:
        if proc.poll() is not None:
            raise AssertionError(output(proc))
        assert time.monotonic() < deadline, "the worker did not turn ready"
        try:
            status: int | None = httpx.get(f"{url}/readyz", timeout=5).status_code
        except httpx.TransportError:
            status = None
        seen.add(status)
        if status == 200:
            break
        time.sleep(0.1)
    assert seen <= {None, 503, 200}
    return proc, url, port
