"""The placement ledger: the one authority, per operator process, on the GPU memory kubevram has given out.

Modelled on kube-scheduler's scheduling cache (``pkg/scheduler/backend/cache``: ``AssumePod``,
``FinishBinding``, ``ForgetPod``). A decision is recorded the moment it is made, *before* the API
shows it, so the next decision, even one made a millisecond later in another thread, already counts
it; it is confirmed (or corrected) later by what the API shows.

One entry per LLMDeployment (``(namespace, name)``): the reservations its replicas hold (node, GPU
index, bytes, sharing: ``kubevram.planner.inventory.Reservation``), in one of three states:

* ``assumed``: decided by :meth:`Ledger.reserve`; the children are being written. No API read
  replaces it, and until :meth:`Ledger.confirm` it holds what it held before *and* what was decided:
  the old workloads run until their deletes are written, so a scale-down's GPUs are not given to a
  deployment whose write could land first.
* ``applied``: :meth:`Ledger.confirm` (the writes are done), :meth:`Ledger.abort` (they failed
  part-way: it holds what it held before *and* what was decided until the API is read again) or
  :meth:`Ledger.forget` (the deployment is gone: it holds nothing). Only an API read *started after*
  that moment replaces it: reads are consistent, so such a read shows the writes.
* ``observed``: what the API showed (:meth:`Ledger.observe`, from the workloads' reservation
  annotations); every newer read replaces it. The first read of a process rebuilds the ledger
  from the children.

One writer: every decision that consumes GPU memory (create, update, scale, the re-plan of waiting
deployments, node events, deletion) runs the planner inside :meth:`Ledger.deciding`, which holds
the process-wide lock, reads the book (:meth:`Ledger.snapshot`) and records the result
(:meth:`Ledger.reserve`). Reading the API and writing the children happen outside that lock, so
the serialised part is the planning alone (milliseconds). :meth:`Ledger.deployment` keeps one
reconciliation per LLMDeployment at a time (kopf's handlers, its timer, node events).

Pure bookkeeping: no API calls, no kopf; the clock is injectable.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubevram.controller.render import reservations
from kubevram.planner.inventory import Reservation

Key = tuple[str, str]  # (namespace, LLMDeployment name)

ASSUMED, APPLIED, OBSERVED = "assumed", "applied", "observed"


@dataclass(frozen=True)
class Entry:
    reservations: tuple[Reservation, ...]
    state: str
    since: float  # the clock when it entered this state
    previous: tuple[Reservation, ...] = ()  # what it held before an assumed decision

    @property
    def held(self) -> tuple[Reservation, ...]:
        """What it keeps from other decisions: while assumed, the old and the new together."""
        return _both(self.previous, self.reservations) if self.state == ASSUMED else self.reservations


class NotDeciding(RuntimeError):
    """``reserve`` was called outside ``deciding()``: a decision that bypasses the one writer."""


class Ledger:
    """Reservations per LLMDeployment: assumed, applied or observed (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._decide = threading.Lock()
        self._writer: int | None = None
        self._guard = threading.Lock()
        self._entries: dict[Key, Entry] = {}
        self._deployments: dict[Key, threading.RLock] = {}

    # ------------------------------------------------------------------------------------- locks

    @contextlib.contextmanager
    def deciding(self) -> Iterator[Ledger]:
        """The one writer: observe, snapshot, plan and reserve inside this block."""
        with self._decide:
            self._writer = threading.get_ident()
            try:
                yield self
            finally:
                self._writer = None

    @contextlib.contextmanager
    def deployment(self, key: Key) -> Iterator[None]:
        """One reconciliation of ``key`` at a time (taken before ``deciding``, never inside it; reentrant: a
        re-plan holds it while it reads the deployment and plans it)."""
        with self._guard:
            lock = self._deployments.setdefault(key, threading.RLock())
        with lock:
            yield

    # ---------------------------------------------------------------------------------- writing

    def observe(self, view: Mapping[Key, Sequence[Reservation]], read_started: float) -> None:
        """What the API showed in a read that started at ``read_started`` (every LLMDeployment's
        workloads: a key absent from ``view`` holds nothing). Replaces the entries that read is newer
        than; leaves assumed ones and those the ledger changed after the read started."""
        with self._guard:
            for key in set(self._entries) | set(view):
                entry = self._entries.get(key)
                if entry is not None and (entry.state == ASSUMED or entry.since > read_started):
                    continue
                shown = tuple(view.get(key) or ())
                if shown:
                    self._entries[key] = Entry(shown, OBSERVED, read_started)
                else:
                    self._entries.pop(key, None)

    def reserve(self, key: Key, reservations: Iterable[Reservation]) -> None:
        """Record a decision (assumed): ``key`` holds exactly ``reservations`` from now on."""
        if self._writer != threading.get_ident():
            raise NotDeciding(f"{key[0]}/{key[1]}: reserve() outside Ledger.deciding()")
        with self._guard:
            before = self._entries.get(key)
            previous = before.reservations if before is not None else ()
            if before is not None and before.state == ASSUMED:
                previous = _both(before.previous, before.reservations)
            self._entries[key] = Entry(tuple(reservations), ASSUMED, self.clock(), previous)

    def confirm(self, key: Key) -> None:
        """The decision's children are written: the next API read (started from now) confirms it."""
        with self._guard:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries[key] = Entry(entry.reservations, APPLIED, self.clock())

    def abort(self, key: Key) -> None:
        """Writing the decision failed part-way: hold what was held before and what was decided until
        an API read started from now says what is there."""
        with self._guard:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries[key] = Entry(_both(entry.previous, entry.reservations), APPLIED, self.clock())

    def forget(self, key: Key) -> None:
        """The deployment and its workloads are gone: it holds nothing (older API reads are ignored)."""
        with self._guard:
            self._entries[key] = Entry((), APPLIED, self.clock())

    def reset(self) -> None:
        """Forget everything (operator start: the first read rebuilds the ledger from the children)."""
        with self._guard:
            self._entries.clear()

    # ---------------------------------------------------------------------------------- reading

    def snapshot(self, exclude: Iterable[Key] = ()) -> list[Reservation]:
        """Every reservation held now, but those of ``exclude``: what the planner subtracts."""
        skip = set(exclude)
        with self._guard:
            return [r for key, e in sorted(self._entries.items()) if key not in skip for r in e.held]

    def holding(self, key: Key) -> tuple[Reservation, ...]:
        with self._guard:
            entry = self._entries.get(key)
            return entry.reservations if entry is not None else ()

    def holders(self, node: str) -> set[Key]:
        """The deployments with a reservation on ``node``."""
        with self._guard:
            return {k for k, e in self._entries.items() if any(r.node == node for r in e.held)}

    def stats(self) -> dict[str, Any]:
        """Deployments and reservations per state (for logs and metrics)."""
        with self._guard:
            out: dict[str, Any] = {
                state: {"deployments": 0, "reservations": 0} for state in (ASSUMED, APPLIED, OBSERVED)
            }
            for entry in self._entries.values():
                out[entry.state]["deployments"] += 1
                out[entry.state]["reservations"] += len(entry.reservations)
            return out


def _both(a: Sequence[Reservation], b: Sequence[Reservation]) -> tuple[Reservation, ...]:
    """What holds ``a`` and ``b`` at once: each reservation as many times as the larger of the two counts
    (two equal slices of one GPU are two reservations)."""
    return tuple((Counter(a) | Counter(b)).elements())


#: The operator process's ledger (kopf runs every handler of the process in one thread pool).
LEDGER = Ledger()


def reservations_of(key: Key, plan: Mapping[str, Any], sharing: str) -> list[Reservation]:
    """The reservations of a plan's placed replicas (what their workloads' annotations will say): one per
    pod, so a multi-node replica holds GPUs on each node of its group."""
    out = []
    for replica in plan.get("replicas") or []:
        for held in reservations(replica, sharing):
            if held["node"] and held["gpus"]:
                out.append(Reservation.of(key[0], key[1], held["node"], held["gpus"], held["sharing"]))
    return out


__all__ = [
    "APPLIED", "ASSUMED", "LEDGER", "OBSERVED", "Entry", "Key", "Ledger", "NotDeciding", "reservations_of"
]
