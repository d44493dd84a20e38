"""Leader election on a ``coordination.k8s.io/v1`` Lease: with several operator replicas, one plans.

The placement ledger is one authority per process; two processes planning at once would each
believe its own ledger and book the same GPUs. So ``kubevram operator --leader-elect`` runs kopf
only in the replica that holds the Lease, as client-go's ``leaderelection`` package does for
Kubernetes' own controllers:

* a candidate reads the Lease; it takes it when there is none, when it is released (no holder), or
  when its record has not changed for ``leaseDurationSeconds`` of the candidate's own clock (no
  comparison of timestamps written by another machine, so clock skew does not matter);
* the leader renews it every ``retry`` seconds; every write carries the ``resourceVersion`` it read,
  so of two candidates racing only one succeeds (409 for the other);
* a leader that cannot renew within ``renew_deadline`` seconds (a request that hangs counts as failed
  when the deadline passes) has lost it and must stop planning at once (the process exits and its
  pod restarts as a candidate); one that stops cleanly releases it.

The operator needs ``get``, ``create`` and ``patch`` on ``leases`` in its namespace (the chart's Role).
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
MERGE_PATCH = "application/merge-patch+json"


def _micro_time(now: datetime.datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseLock:
    """One candidate's view of the Lease ``namespace/name``."""

    def __init__(
        self,
        cluster: Any,
        namespace: str,
        name: str,
        identity: str,
        *,
        duration: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.clock = clock
        self._observed: tuple[Any, ...] | None = None  # the holder's record as last read ...
        self._observed_at = 0.0  # ... and when (our clock) it last changed

    @property
    def path(self) -> str:
        return f"{LEASES.format(namespace=self.namespace)}/{self.name}"

    def _spec(self, transitions: int, acquired: str | None) -> dict[str, Any]:
        now = _micro_time(datetime.datetime.now(tz=datetime.UTC))
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration)),
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this candidate holds the Lease afterwards."""
        lease = self.cluster._get(self.path)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(0, None),
            }
            return self._write("POST", LEASES.format(namespace=self.namespace), body)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        now = self.clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.duration)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # another candidate holds it and renewed it recently
        mine = holder == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        patch = {
            "metadata": {"resourceVersion": (lease.get("metadata") or {}).get("resourceVersion")},
            "spec": self._spec(transitions, spec.get("acquireTime") if mine else None),
        }
        return self._write("PATCH", self.path, patch)

    def release(self) -> None:
        """Give the Lease up (a clean stop): the next candidate takes it without waiting it out."""
        lease = self.cluster._get(self.path)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        patch = {
            "metadata": {"resourceVersion": (lease.get("metadata") or {}).get("resourceVersion")},
            "spec": {"holderIdentity": None, "leaseDurationSeconds": 1},
        }
        self._write("PATCH", self.path, patch)

    def _write(self, method: str, path: str, body: dict[str, Any]) -> bool:
        try:
            self.cluster._raw(method, path, body, MERGE_PATCH if method == "PATCH" else "application/json",
                              expected=(404, 409))
        except ApiException as exc:
            if exc.status in (404, 409):  # someone else wrote it first
                return False
            raise
        return True


class LeaderElector:
    """Acquire the Lease, then keep renewing it in a thread; ``on_lost`` when renewing fails."""

    def __init__(self, lock: LeaseLock, *, retry: float = 2.0, renew_deadline: float = 10.0) -> None:
        self.lock = lock
        self.retry = retry
        self.renew_deadline = renew_deadline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _attempt(self) -> bool:
        try:
            return self.lock.try_acquire_or_renew()
        except Exception as exc:  # the API server is away: try again (a leader counts it as a failed renewal)
            log.warning("lease %s/%s: %s", self.lock.namespace, self.lock.name, exc)
            return False

    def acquire(self, stop: threading.Event) -> bool:
        """Block until this candidate leads (True) or ``stop`` is set (False)."""
        waiting_logged = False
        while not stop.is_set():
            # An attempt with no answer (a partition) counts as failed after the renew deadline.
            if _within(self._attempt, self.renew_deadline):
                log.info("leading: lease %s/%s held by %s", self.lock.namespace, self.lock.name,
                         self.lock.identity)
                return True
            if not waiting_logged:
                log.info("standing by: lease %s/%s is held by another replica", self.lock.namespace,
                         self.lock.name)
                waiting_logged = True
            stop.wait(self.retry)
        return False

    def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew every ``retry`` seconds in a daemon thread; call ``on_lost`` once when it is lost."""

        def renew() -> None:
            last = time.monotonic()
            while not self._stop.wait(self.retry):
                if _within(self._attempt, last + self.renew_deadline - time.monotonic()):
                    last = time.monotonic()
                elif time.monotonic() - last >= self.renew_deadline or _within(
                    self._held_by_another, last + self.renew_deadline - time.monotonic()
                ):
                    log.error("lost lease %s/%s: stopping", self.lock.namespace, self.lock.name)
                    on_lost()
                    return

        self._thread = threading.Thread(target=renew, name="kubevram-lease", daemon=True)
        self._thread.start()

    def _held_by_another(self) -> bool:
        try:
            lease = self.lock.cluster._get(self.lock.path) or {}
        except Exception:
            return False
        holder = (lease.get("spec") or {}).get("holderIdentity")
        return bool(holder) and holder != self.lock.identity

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.retry + 5)
        if release:
            try:
                self.lock.release()
            except Exception as exc:
                log.warning("could not release lease %s/%s: %s", self.lock.namespace, self.lock.name, exc)


def _within(call: Callable[[], bool], seconds: float) -> bool:
    """``call()``, or False when it has not returned within ``seconds``: a partitioned API server may
    never answer a request (no error, no timeout), and the renew deadline must hold all the same."""
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(call()), name="kubevram-lease-call", daemon=True)
    thread.start()
    thread.join(max(0.0, seconds))
    return bool(result and result[0])


__all__ = ["LeaderElector", "LeaseLock"]
