"""One reconciliation of an LLMDeployment: parse, read the inventory, plan, render, apply, report.

``plan_and_apply`` is the one function the kopf handlers call on create, update and resume. It is
idempotent: run twice on the same cluster it makes no second child, and a restarted operator
finds what it made by name. Outcomes:

* a spec the schema could not reject (unreadable model config, a model no node could ever hold
  without offload) -> ``Planned=False`` naming the field and value, no children,
  ``kopf.PermanentError`` (no retries until the spec changes);
* replicas that fit nowhere now -> ``Scheduled=False`` with the numbers, a ``<name>-pending``
  workload whose node affinity asks the cluster autoscaler for a big enough GPU, and
  ``kopf.TemporaryError(delay=...)``: the retry re-plans against the nodes of that moment;
* otherwise ``Planned`` and ``Scheduled`` are True and the workloads run.

Re-planning keeps what runs: when only ``spec.replicas`` changed (a scale), placed replicas stay
where they are and only the difference is planned (or removed, newest first); any other spec change
re-plans every replica and rolls the workloads out.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kubevram.api.errors import SpecError
from kubevram.api.load import parse_deployment
from kubevram.api.v1alpha1 import DEFAULT_WORKER_IMAGE, LLMDeployment
from kubevram.controller import render, status
from kubevram.controller.adapter import Cluster, ConfigNotReadable
from kubevram.controller.calibrate import with_calibration
from kubevram.controller.ledger import LEDGER, Ledger, reservations_of
from kubevram.planner.inventory import Reservation

log = logging.getLogger(__name__)

#: ``planner(deployment, nodes, pods, model_config, reservations) -> plan JSON`` for one deployment:
#: ``pods`` are other pods holding GPUs, ``reservations`` what the ledger holds for other deployments.
Planner = Callable[
    [LLMDeployment, list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None, list[Reservation]],
    dict[str, Any],
]

PLAN_INPUT = "llm.kubevram.io/plan-input"
TRANSIENT_STATUSES = {409, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Settings:
    """The operator's knobs, from its environment (the Helm chart sets them)."""

    worker_image: str | None = None
    retry_delay: float = 30.0
    # Where the operator's pods run and their labels: the only peers the workers' admin port admits.
    operator_namespace: str = ""
    operator_labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            worker_image=env.get("KUBEVRAM_WORKER_IMAGE") or None,
            retry_delay=float(env.get("KUBEVRAM_RETRY_DELAY") or 30),
            operator_namespace=env.get("KUBEVRAM_OPERATOR_NAMESPACE") or "",
            operator_labels=_labels(env.get("KUBEVRAM_OPERATOR_POD_LABELS") or ""),
        )

    def image_for(self, deployment: LLMDeployment) -> str:
        if self.worker_image and deployment.spec.worker.image == DEFAULT_WORKER_IMAGE:
            return self.worker_image
        return deployment.spec.worker.image


def _labels(text: str) -> dict[str, str]:
    """``k=v,k=v`` (a label selector of equalities) as a dict; malformed parts are left out."""
    pairs = (part.split("=", 1) for part in text.split(",") if "=" in part)
    return {k.strip(): v.strip() for k, v in pairs if k.strip()}


def default_planner() -> Planner:
    from kubevram.controller.planning import plan_deployment

    return plan_deployment


def plan_input_hash(deployment: LLMDeployment, model_config: Mapping[str, Any] | None) -> str:
    """Everything a placement depends on except the replica count: equal hashes mean 'only scaled'."""
    spec = deployment.spec.model_dump(mode="json")
    spec.pop("replicas", None)
    return render._digest({"spec": spec, "config": model_config}, 16)


class Reconciler:
    """Holds the cluster adapter, the planner and the settings for one reconciliation."""

    def __init__(
        self,
        cluster: Cluster,
        settings: Settings,
        planner: Planner | None = None,
        report: Callable[[str, str, bool], None] | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self.ledger = ledger or LEDGER
        self.planner = planner or default_planner()
        self.report = report or (lambda reason, message, warning: None)
        self._existing_plan_cm: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------ the steps

    def _fail(self, body: Mapping[str, Any], patch: Any, type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        patch.status.update(
            status.failed_status(
                meta["name"],
                type_,
                reason,
                message,
                generation=meta.get("generation"),
                old_conditions=(body.get("status") or {}).get("conditions"),
                now=status.now_rfc3339(),
            )
        )
        self.report(reason, message, True)

    def _model_config(self, deployment: LLMDeployment) -> dict[str, Any] | None:
        model = deployment.spec.model
        if model.config is not None:
            return dict(model.config)
        if model.configMapRef is not None:
            ref = model.configMapRef
            try:
                return self.cluster.read_config_json(deployment.namespace, ref.name, ref.key)
            except ConfigNotReadable as exc:
                raise SpecError(
                    "spec.model.configMapRef", f"{{name: {ref.name!r}, key: {ref.key!r}}}: {exc}"
                ) from None
        return None

    def _previous_plan(self, namespace: str, name: str) -> tuple[dict[str, Any] | None, str | None]:
        cm = self.cluster._get(f"/api/v1/namespaces/{namespace}/configmaps/{render.config_map_name(name)}")
        self._existing_plan_cm = cm
        if cm is None:
            return None, None
        try:
            plan = json.loads((cm.get("data") or {}).get("plan.json") or "null")
        except json.JSONDecodeError:
            return None, None
        return plan, ((cm.get("metadata") or {}).get("annotations") or {}).get(PLAN_INPUT)

    def _plan(
        self,
        deployment: LLMDeployment,
        model_config: dict[str, Any] | None,
        nodes: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        book: list[Reservation],
        previous: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], str]:
        """The new plan and how it was made (``full``, ``kept``, ``scaled-down``, ``scaled-up``).

        ``book``: what the ledger holds for every other deployment; ``previous``: the deployment's last
        plan when only ``spec.replicas`` changed since (else None: every replica is planned anew).
        """
        name, namespace = deployment.name, deployment.namespace
        desired = deployment.spec.replicas
        if previous is None:
            return self.planner(deployment, nodes, pods, model_config, book), "full"
        kept = list(previous.get("replicas") or [])
        if desired <= len(kept):
            plan = {**previous, "replicas": kept[:desired], "unscheduled": {"count": 0, "reason": ""}}
            return plan, "kept" if desired == len(kept) and not _pending(previous) else "scaled-down"
        # Plan only the difference; the kept replicas are reservations under another owner (the planner
        # leaves out the reservations of the deployment it is planning).
        sharing = str(deployment.spec.placement.sharing)
        held = reservations_of((namespace, f"{name}.kept"), {"replicas": kept}, sharing)
        delta = deployment.model_copy(
            update={"spec": deployment.spec.model_copy(update={"replicas": desired - len(kept)})}
        )
        extra = self.planner(delta, nodes, pods, model_config, book + held)
        plan = {**extra, "replicas": kept + list(extra.get("replicas") or [])}
        return plan, "scaled-up" if desired > len(kept) + _pending(previous) or extra.get(
            "replicas"
        ) else "kept"

    def _fits_empty_cluster(
        self, deployment: LLMDeployment, model_config: dict[str, Any] | None, nodes: list[dict[str, Any]]
    ) -> bool:
        one = deployment.model_copy(update={"spec": deployment.spec.model_copy(update={"replicas": 1})})
        return bool(self.planner(one, nodes, [], model_config, []).get("replicas"))

    def _check_fits(
        self,
        deployment: LLMDeployment,
        model_config: dict[str, Any] | None,
        nodes: list[dict[str, Any]],
        plan: Mapping[str, Any],
    ) -> None:
        """``SpecError`` when nothing was placed and no node could hold a replica even empty."""
        nothing_placed = not plan.get("replicas") and _pending(plan)
        if (
            nothing_placed
            and deployment.spec.placement.offload == "none"
            and not self._fits_empty_cluster(deployment, model_config, nodes)
        ):
            total = (plan.get("estimate") or {}).get("totalBytes")
            need = status.gib(total) if total else "more"
            raise SpecError(
                "spec.placement.offload",
                f"'none', but one replica needs {need} of GPU memory and no node could hold it even "
                f"empty (largest node: {_largest_node_mib(nodes)} MiB of GPU memory); allow offload: "
                "cpu, lower spec.precision.weights or add bigger GPU nodes",
            )

    # ------------------------------------------------------------------------------- the whole

    def plan_and_apply(self, body: Mapping[str, Any], patch: Any) -> None:
        """One reconciliation; never two at once for the same deployment (kopf's handlers, its timer and
        the node-change re-plans all go through the ledger's per-deployment lock)."""
        meta = body["metadata"]
        with self.ledger.deployment((meta.get("namespace") or "default", meta["name"])):
            self._plan_and_apply(body, patch)

    def replan_pending(self, namespace: str, name: str) -> bool:
        """Re-plan a deployment whose replicas wait for a node (a GPU node appeared or changed).

        Runs outside kopf's handler for the resource: the status goes out as a merge patch of the
        status subresource. Returns True when nothing is pending any more. The handler's own retry,
        when it comes, finds the replicas placed and succeeds.
        """
        body = self.cluster.get_llmd(namespace, name)
        if body is None:
            return True
        patch = _StatusPatch()
        done = True
        try:
            self.plan_and_apply(body, patch)
        except kopf.TemporaryError:
            done = False
        except kopf.PermanentError:
            pass
        if patch.status:
            self.cluster.patch_llmd_status(namespace, name, patch.status)
        return done

    def _plan_and_apply(self, body: Mapping[str, Any], patch: Any) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta.get("namespace") or "default"
        key = (namespace, name)
        source = f"{namespace}/{name}"
        try:
            deployment = parse_deployment(
                {
                    "apiVersion": body.get("apiVersion"),
                    "kind": body.get("kind"),
                    "metadata": dict(meta),
                    "spec": dict(body.get("spec") or {}),
                },
            )
            deployment = with_calibration(deployment, body.get("status"))  # spec.estimation.useCalibration
            model_config = self._model_config(deployment)
            # Read the API outside the ledger's lock; the ledger's own entries win over older reads.
            read_started = self.ledger.clock()
            nodes = self.cluster.list_nodes()
            workloads = self.cluster.list_workloads()
            pods = self.cluster.foreign_gpu_pods()
            previous, previous_hash = self._previous_plan(namespace, name)
            owned = [
                w
                for w in workloads
                if w["metadata"].get("namespace") == namespace
                and (w["metadata"].get("labels") or {}).get(render.LABEL_DEPLOYMENT) == name
            ]
            input_hash = plan_input_hash(deployment, model_config)
            with self.ledger.deciding():
                self.ledger.observe(self.cluster.reservations(workloads), read_started)
                book = self.ledger.snapshot(exclude=[key])
                kept = previous if previous_hash == input_hash else None
                plan, how = self._plan(deployment, model_config, nodes, pods, book, kept)
                self._check_fits(deployment, model_config, nodes, plan)
                self.ledger.reserve(key, reservations_of(key, plan, str(deployment.spec.placement.sharing)))
        except SpecError as exc:
            field = exc.field or "spec"
            self._fail(body, patch, status.PLANNED, "InvalidSpec", f"{field}: {exc.message}")
            raise kopf.PermanentError(f"{source}: {exc}") from None
        except ApiException as exc:
            raise _transient(exc, self.settings) from None

        try:
            self._apply(body, deployment, plan, input_hash, owned)
        except BaseException as exc:
            self.ledger.abort(key)
            if isinstance(exc, ApiException):
                raise _transient(exc, self.settings) from None
            raise
        self.ledger.confirm(key)

        ready = sum(int((w.get("status") or {}).get("readyReplicas") or 0) for w in owned)
        new_status = status.planned_status(
            name,
            plan,
            desired=deployment.spec.replicas,
            ready=ready,
            generation=meta.get("generation"),
            old_conditions=(body.get("status") or {}).get("conditions"),
            now=status.now_rfc3339(),
        )
        patch.status.update(new_status)
        _mark_waiting((namespace, name), bool(_pending(plan)))
        placed = len(plan.get("replicas") or [])
        nodes_used = sorted({r["node"] for r in plan.get("replicas") or []})
        self.report(
            "Planned",
            f"{how}: {placed} replica(s) placed on {', '.join(nodes_used) or 'no node'}, "
            f"{_pending(plan)} pending; {new_status['vramPerReplica'] or '?'} GPU memory per replica",
            False,
        )
        if _pending(plan):
            reason = (plan.get("unscheduled") or {}).get("reason") or "no node has room"
            self.report("Unschedulable", f"{_pending(plan)} replica(s) pending: {reason}", True)
            raise kopf.TemporaryError(
                f"{source}: {_pending(plan)} replica(s) pending: {reason}", delay=self.settings.retry_delay
            )

    def _apply(
        self,
        body: Mapping[str, Any],
        deployment: LLMDeployment,
        plan: dict[str, Any],
        input_hash: str,
        owned: list[dict[str, Any]],
    ) -> None:
        """Apply every child; delete the workloads (of ``owned``, read before) the plan no longer names."""
        current = {w["metadata"]["name"]: w for w in owned}
        self.cluster.create_if_absent(render.render_secret(body, secrets.token_urlsafe(32)))
        children = render.render_children(
            body,
            deployment.spec,
            plan,
            image=self.settings.image_for(deployment),
            operator_namespace=self.settings.operator_namespace,
            operator_labels=self.settings.operator_labels,
        )
        for child in children:
            if child["kind"] == "ConfigMap":
                child["metadata"]["annotations"] = {PLAN_INPUT: input_hash}
                self.cluster.apply(child, self._existing_plan_cm)
            elif child["kind"] == "Deployment":
                self.cluster.apply(child, current.get(child["metadata"]["name"]))
            elif self._existing_plan_cm is None:
                # First reconciliation (no plan yet): create first; a 409 falls back to a patch.
                self.cluster.apply(child, None)
            else:
                self.cluster.apply(child)
        wanted = {c["metadata"]["name"] for c in children if c["kind"] == "Deployment"}
        self.cluster.delete_workloads([w for n, w in current.items() if n not in wanted])

    def release(self, body: Mapping[str, Any]) -> int:
        """On deletion: remove the workloads now and drop the ledger's entry, so the GPUs are free for
        the next plan."""
        meta = body["metadata"]
        key = (meta.get("namespace") or "default", meta["name"])
        _mark_waiting(key, False)
        with self.ledger.deployment(key):
            owned = self.cluster.list_owned_workloads(*key)
            self.cluster.delete_workloads(owned)
            self.ledger.forget(key)
        return len(owned)

    def refresh_readiness(self, body: Mapping[str, Any], patch: Any) -> None:
        """Ready replicas from the workloads' status, with the Ready condition and phase."""
        meta = body["metadata"]
        old = body.get("status") or {}
        if old.get("phase") in (None, "Failed"):
            return
        owned = self.cluster.list_owned_workloads(meta.get("namespace") or "default", meta["name"])
        ready = sum(int((w.get("status") or {}).get("readyReplicas") or 0) for w in owned)
        desired = int((body.get("spec") or {}).get("replicas") or 0)
        if ready == old.get("readyReplicas") and old.get("conditions"):
            return
        pending = int((old.get("autoscaling") or {}).get("pendingReplicas") or 0)
        ok = ready >= desired
        patch.status["readyReplicas"] = ready
        patch.status["conditions"] = status.merge_conditions(
            old.get("conditions"),
            [
                status.condition(
                    status.READY,
                    ok,
                    "AllReplicasReady" if ok else "ReplicasNotReady",
                    f"{ready} of {desired} replica(s) ready",
                    meta.get("generation"),
                )
            ],
            status.now_rfc3339(),
        )
        patch.status["phase"] = (
            "Scheduling" if pending else "Running" if ok and desired else "Degraded" if ready else "Planned"
        )


class _StatusPatch:
    """What kopf's ``patch`` offers a handler, for reconciliations outside kopf's handlers."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}


_locks_guard = threading.Lock()


# Deployments this process last left with pending replicas. kopf's ``waiting`` index learns of them only
# when the status patch comes back on the watch stream; a GPU node that appears in between must still
# re-plan them, so the node handler takes the union of both.
_waiting_here: set[tuple[str, str]] = set()


def _mark_waiting(key: tuple[str, str], pending: bool) -> None:
    with _locks_guard:
        (_waiting_here.add if pending else _waiting_here.discard)(key)


def waiting_here() -> set[tuple[str, str]]:
    """(namespace, name) of the deployments this process left with pending replicas."""
    with _locks_guard:
        return set(_waiting_here)


def gpu_node_changed(event_type: str | None, node: Mapping[str, Any], seen: dict[str, str]) -> bool:
    """Whether a node event may give pending replicas a place: a GPU node appeared, or its GPU labels,
    allocatable GPUs, taints or schedulability changed (not its heartbeats). ``seen`` holds the
    fingerprints of the nodes seen so far (one dict per operator run)."""
    meta = node.get("metadata") or {}
    name = str(meta.get("name") or "")
    if event_type == "DELETED":
        seen.pop(name, None)
        return False
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k.startswith("nvidia.com/")}
    node_status = node.get("status") or {}
    allocatable = {
        k: v for k, v in (node_status.get("allocatable") or {}).items() if k.startswith("nvidia.com/")
    }
    if not labels and not allocatable:
        return False
    spec = node.get("spec") or {}
    ready = [c.get("status") for c in node_status.get("conditions") or [] if c.get("type") == "Ready"]
    fingerprint = render._digest(
        [labels, allocatable, spec.get("taints"), spec.get("unschedulable"), ready], 16
    )
    changed = seen.get(name) != fingerprint
    seen[name] = fingerprint
    return changed


def waiting_key(body: Mapping[str, Any]) -> dict[tuple[str, str], int] | None:
    """``{(namespace, name): pending replicas}`` for a deployment with replicas waiting, else None."""
    meta = body.get("metadata") or {}
    pending = int(((body.get("status") or {}).get("autoscaling") or {}).get("pendingReplicas") or 0)
    return {(str(meta.get("namespace") or "default"), str(meta.get("name"))): pending} if pending else None


def replan_waiting(cluster: Cluster, settings: Settings, waiting: Iterable[tuple[str, str]]) -> int:
    """Re-plan every (namespace, name) with pending replicas; how many have none pending now."""
    placed = 0
    for namespace, name in sorted(set(waiting)):
        if Reconciler(cluster, settings).replan_pending(namespace, name):
            placed += 1
    return placed


def _pending(plan: Mapping[str, Any]) -> int:
    return int((plan.get("unscheduled") or {}).get("count") or 0)


def _largest_node_mib(nodes: list[dict[str, Any]]) -> int:
    best = 0
    for node in nodes:
        labels = (node.get("metadata") or {}).get("labels") or {}
        try:
            best = max(
                best, int(labels.get("nvidia.com/gpu.memory", 0)) * int(labels.get("nvidia.com/gpu.count", 0))
            )
        except ValueError:
            continue
    return best


def _transient(exc: ApiException, settings: Settings) -> Exception:
    """API errors worth a retry (conflicts, throttling, server errors) become ``TemporaryError``."""
    if exc.status in TRANSIENT_STATUSES:
        return kopf.TemporaryError(
            f"API {exc.status} {exc.reason}: retrying", delay=min(settings.retry_delay, 5)
        )
    return exc
