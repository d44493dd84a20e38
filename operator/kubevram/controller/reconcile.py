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

import datetime
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kubevram.api.errors import SpecError
from kubevram.api.load import parse_deployment
from kubevram.api.v1alpha1 import DEFAULT_WORKER_IMAGE, LLMDeployment
from kubevram.controller import metrics, render, status
from kubevram.controller.adapter import Cluster, ConfigNotReadable
from kubevram.controller.calibrate import with_calibration
from kubevram.controller.ledger import LEDGER, Ledger, reservations_of
from kubevram.controller.nodes import (
    NODES,
    StuckPod,
    advertises_gpus,
    failed_creates,
    node_problem,
    placement_problem,
    stuck_pods,
)
from kubevram.controller.planning import node_classes
from kubevram.planner.dra import DRIVER, GPU_CLASS, has_gpu_slices
from kubevram.planner.inventory import NodeInventory, Reservation, apply_reservations, node_inventory
from kubevram.planner.placement import KNOWN_PRODUCTS, DraInput, parse_node_classes

log = logging.getLogger(__name__)

#: ``planner(deployment, nodes, pods, model_config, reservations) -> plan JSON`` for one deployment:
#: ``pods`` are other pods holding GPUs, ``reservations`` what the ledger holds for other deployments.
Planner = Callable[
    [LLMDeployment, list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None, list[Reservation]],
    dict[str, Any],
]

PLAN_INPUT = "llm.kubevram.io/plan-input"
TRANSIENT_STATUSES = {409, 429, 500, 502, 503, 504}


class Unschedulable(kopf.TemporaryError):
    """Replicas fit nowhere now: the retry re-plans against the nodes of that moment."""


def reconcile_outcome(exc: BaseException | None) -> str:
    """How a reconciliation ended, for ``kubevram_reconciles_total`` (``metrics.OUTCOMES``)."""
    if exc is None:
        return "planned"
    if isinstance(exc, Unschedulable):
        return "pending"
    if isinstance(exc, kopf.PermanentError):
        return "invalid"
    if isinstance(exc, kopf.TemporaryError):
        return "retry"
    return "error"


@dataclass(frozen=True)
class Settings:
    """The operator's knobs, from its environment (the Helm chart sets them)."""

    worker_image: str | None = None
    retry_delay: float = 30.0
    # Where the operator's pods run and their labels: the only peers the workers' admin port admits.
    operator_namespace: str = ""
    operator_labels: Mapping[str, str] = field(default_factory=dict)
    #: Seconds a node may be NotReady before its replicas are re-planned elsewhere.
    node_grace: float = 300.0
    #: Seconds a worker pod may stay ``PodScheduled=False`` before its replica is re-planned elsewhere.
    unschedulable_grace: float = 120.0
    #: What the placeholders of pending replicas run, and their (negative) PriorityClass.
    placeholder_image: str = render.PAUSE_IMAGE
    placeholder_priority_class: str = render.PLACEHOLDER_PRIORITY_CLASS
    #: What ``spec.placement.resourceAPI: auto`` means here: auto (DRA where the GPU driver publishes
    #: ResourceSlices), devicePlugin or dra; and the DRA driver whose devices are GPUs.
    resource_api: str = "auto"
    dra_driver: str = DRIVER
    #: Whether deployments that leave ``spec.serving.inferencePool.enabled`` unset get an InferencePool.
    inference_pool: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            worker_image=env.get("KUBEVRAM_WORKER_IMAGE") or None,
            retry_delay=float(env.get("KUBEVRAM_RETRY_DELAY") or 30),
            operator_namespace=env.get("KUBEVRAM_OPERATOR_NAMESPACE") or "",
            operator_labels=_labels(env.get("KUBEVRAM_OPERATOR_POD_LABELS") or ""),
            node_grace=float(env.get("KUBEVRAM_NODE_GRACE") or 300),
            unschedulable_grace=float(env.get("KUBEVRAM_UNSCHEDULABLE_GRACE") or 120),
            placeholder_image=env.get("KUBEVRAM_PLACEHOLDER_IMAGE") or render.PAUSE_IMAGE,
            placeholder_priority_class=env.get("KUBEVRAM_PLACEHOLDER_PRIORITY_CLASS")
            or render.PLACEHOLDER_PRIORITY_CLASS,
            resource_api=env.get("KUBEVRAM_RESOURCE_API") or "auto",
            dra_driver=env.get("KUBEVRAM_DRA_DRIVER") or DRIVER,
            inference_pool=(env.get("KUBEVRAM_INFERENCE_POOL") or "").lower() in ("1", "true", "yes"),
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


def plan_input_hash(
    deployment: LLMDeployment, model_config: Mapping[str, Any] | None, resource_api: str = "devicePlugin"
) -> str:
    """Everything a placement depends on except the replica count: equal hashes mean 'only scaled'. The
    resource API is part of it (a plan of device-plugin GPUs is no plan of DRA devices); the InferencePool
    is not (it moves no replica)."""
    spec = deployment.spec.model_dump(mode="json")
    spec.pop("replicas", None)
    spec["serving"].pop("inferencePool", None)
    spec["placement"].pop("resourceAPI", None)  # the mode it resolved to counts, below
    extra = {"resourceAPI": resource_api} if resource_api != "devicePlugin" else {}
    return render._digest({"spec": spec, "config": model_config, **extra}, 16)


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
        #: The DRA objects this reconciliation plans with (None: device-plugin mode).
        self._dra: DraInput | None = None
        self._dra_before = False  # whether the last plan was made in DRA mode (its templates may linger)

    # ------------------------------------------------------------------------------ the steps

    def _fail(self, body: Mapping[str, Any], patch: Any, type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        key = (meta.get("namespace") or "default", meta["name"])
        owned = self.cluster.list_owned_workloads(*key)
        placeholders = [w for w in owned if ((w.get("metadata") or {}).get("labels") or {}).get(
            render.LABEL_SHAPE) == render.PLACEHOLDER]
        workers = [w for w in owned if w not in placeholders]
        # The workers of an earlier plan, if any, keep serving; the status says so.
        serving = (sum(int((w.get("spec") or {}).get("replicas") or 0) for w in workers), _ready(workers))
        failed = status.failed_status(
            meta["name"],
            type_,
            reason,
            message,
            generation=meta.get("generation"),
            old_conditions=(body.get("status") or {}).get("conditions"),
            now=status.now_rfc3339(),
            serving=serving,
        )
        patch.status.update(failed)
        # Nothing is pending any more: the placeholders that ask the autoscaler for nodes go.
        self.cluster.delete_workloads(placeholders)
        _mark_waiting(key, False)
        metrics.STATE.observe_deployment(key, _desired(body), {**(body.get("status") or {}), **failed})
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
        self._dra_before = isinstance(plan, dict) and render.is_dra(plan)
        return plan, ((cm.get("metadata") or {}).get("annotations") or {}).get(PLAN_INPUT)

    def _plan(
        self,
        deployment: LLMDeployment,
        model_config: dict[str, Any] | None,
        nodes: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        book: list[Reservation],
        previous: dict[str, Any] | None,
        *,
        now: datetime.datetime | None = None,
        avoid: Iterable[str] = (),
    ) -> tuple[dict[str, Any], str, list[str]]:
        """The new plan, how it was made (``full``, ``kept``, ``scaled-down``, ``scaled-up``,
        ``re-planned``) and, per placed replica that had to move, why.

        ``book``: what the ledger holds for every other deployment; ``previous``: the deployment's last
        plan when only ``spec.replicas`` changed since (else None: every replica is planned anew). A kept
        replica stays only while its node may hold it (``nodes.placement_problem``), no other deployment
        holds its GPUs in the book (``_taken``) and its node is not in ``avoid`` (nodes where kube-scheduler
        left its pods unschedulable); the others are planned again, on the other nodes.
        """
        name, namespace = deployment.name, deployment.namespace
        desired = deployment.spec.replicas
        avoid = set(avoid)
        usable = [n for n in nodes if _name(n) not in avoid]
        if previous is None:
            return self._call_planner(deployment, usable, pods, model_config, book), "full", []
        now = now or datetime.datetime.now(tz=datetime.UTC)
        by_name = {_name(n): n for n in nodes}
        kept: list[dict[str, Any]] = []
        moved: list[str] = []
        sharing = str(deployment.spec.placement.sharing)
        left: dict[str, NodeInventory | None] = {}  # per node: what the book and the kept replicas leave
        for replica in previous.get("replicas") or []:
            why = ""
            for pod in render.group_pods(replica) if replica.get("group") else [replica]:
                node = str(pod.get("node") or "")
                why = why or (
                    f"pods unschedulable on node {node}"
                    if node in avoid
                    else placement_problem(pod, by_name.get(node), now, self.settings.node_grace)
                )
            if not why and self._dra is None:
                held_here = reservations_of((namespace, name), {"replicas": [replica]}, sharing)
                why = _taken(held_here, by_name, book, left)
            if why:
                moved.append(why)
            else:
                kept.append(replica)
        if desired <= len(kept):
            plan = {**previous, "replicas": kept[:desired], "unscheduled": {"count": 0, "reason": ""}}
            unchanged = desired == len(kept) and not _pending(previous)
            return plan, "re-planned" if moved else "kept" if unchanged else "scaled-down", moved
        # Plan only the difference; the kept replicas are reservations under another owner (the planner
        # leaves out the reservations of the deployment it is planning).
        held = reservations_of((namespace, f"{name}.kept"), {"replicas": kept}, sharing)
        delta = deployment.model_copy(
            update={"spec": deployment.spec.model_copy(update={"replicas": desired - len(kept)})}
        )
        extra = self._call_planner(delta, usable, pods, model_config, book + held)
        plan = {**extra, "replicas": kept + list(extra.get("replicas") or [])}
        if moved:
            return plan, "re-planned", moved
        grew = desired > len(kept) + _pending(previous) or extra.get("replicas")
        return plan, "scaled-up" if grew else "kept", moved

    def _call_planner(
        self,
        deployment: LLMDeployment,
        nodes: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        model_config: dict[str, Any] | None,
        book: list[Reservation],
        dra: Any = ...,
    ) -> dict[str, Any]:
        """The planner, given the DRA objects when this reconciliation plans in DRA mode."""
        dra = self._dra if dra is ... else dra
        if dra is None:
            return self.planner(deployment, nodes, pods, model_config, book)
        return self.planner(deployment, nodes, pods, model_config, book, dra=dra)  # type: ignore[call-arg]

    def resource_api(self, deployment: LLMDeployment) -> str:
        """``dra`` or ``devicePlugin``: the spec's choice; for ``auto`` the operator's default, and for an
        ``auto`` default DRA where the cluster serves resource.k8s.io/v1 and the GPU driver publishes
        ResourceSlices. ``SpecError`` for ``dra`` on a cluster without DRA."""
        wanted = str(deployment.spec.placement.resourceAPI)
        if wanted == "auto":
            wanted = self.settings.resource_api
        served = wanted != "devicePlugin" and self.cluster.serves("resource.k8s.io/v1", "resourceslices")
        if wanted == "dra" and not served:
            raise SpecError(
                "spec.placement.resourceAPI",
                "'dra', but the cluster does not serve resource.k8s.io/v1 ResourceSlices (Kubernetes 1.34+ "
                "with a DRA driver); use devicePlugin or auto",
            )
        if not served:
            return "devicePlugin"
        slices = self.cluster.list_resource_slices()
        if wanted == "auto" and not has_gpu_slices(slices, self.settings.dra_driver):
            return "devicePlugin"
        self._dra = DraInput(slices, self.cluster.list_resource_claims(), self.settings.dra_driver)
        return "dra"

    def _fits_empty_cluster(
        self, deployment: LLMDeployment, model_config: dict[str, Any] | None, nodes: list[dict[str, Any]]
    ) -> bool:
        one = deployment.model_copy(update={"spec": deployment.spec.model_copy(update={"replicas": 1})})
        empty = replace(self._dra, claims=()) if self._dra is not None else None
        return bool(self._call_planner(one, nodes, [], model_config, [], empty).get("replicas"))

    def _check_fits(
        self,
        deployment: LLMDeployment,
        model_config: dict[str, Any] | None,
        nodes: list[dict[str, Any]],
        plan: Mapping[str, Any],
    ) -> None:
        """``SpecError`` when nothing was placed and a replica fits neither a present node, even empty,
        nor any known GPU node class (the chart's ``nodeClasses``, else the built-in catalogue). A
        replica that only a node class holds waits for the cluster autoscaler (``Scheduled=False``)."""
        nothing_placed = not plan.get("replicas") and _pending(plan)
        if not nothing_placed or deployment.spec.placement.offload != "none":
            return
        if ((plan.get("unscheduled") or {}).get("autoscaling") or {}).get("gpuClass"):
            return
        if self._fits_empty_cluster(deployment, model_config, nodes):
            return
        total = (plan.get("estimate") or {}).get("totalBytes")
        need = status.gib(total) if total else "more"
        per_replica = deployment.spec.placement.gpusPerReplica
        raise SpecError(
            "spec.placement.offload",
            f"'none', but one replica needs {need} of GPU memory and neither a present node, even empty "
            f"({largest_offer(nodes, per_replica)}), nor a known GPU node class "
            f"({largest_class(node_classes(), per_replica)}) could hold it; allow offload: cpu, lower "
            "spec.precision.weights or add a node class with bigger GPUs",
        )

    # ------------------------------------------------------------------------------- the whole

    def plan_and_apply(self, body: Mapping[str, Any], patch: Any) -> None:
        """One reconciliation; never two at once for the same deployment (kopf's handlers, its timer and
        the node-change re-plans all go through the ledger's per-deployment lock)."""
        meta = body["metadata"]
        with (
            metrics.reconciling(reconcile_outcome),
            self.ledger.deployment((meta.get("namespace") or "default", meta["name"])),
        ):
            self._plan_and_apply(body, patch)

    def replan(self, namespace: str, name: str) -> bool:
        """Re-plan a deployment outside kopf's handlers for it: replicas wait for a node and a GPU node
        appeared or changed, or a node its replicas are on went away.

        The status goes out as a merge patch of the status subresource. Returns True when nothing is
        pending any more. The handler's own retry, when it comes, finds the replicas placed.
        """
        if self.cluster.get_llmd(namespace, name) is None:
            return True  # gone: no wait for its lock
        with self.ledger.deployment((namespace, name)):
            # Read it again once no other reconciliation of it runs: what that one did (a spec change
            # applied, a deletion released) is in this read, not in one made before the wait.
            body = self.cluster.get_llmd(namespace, name)
            if body is None:
                return True
            patch = _StatusPatch()
            done = self._replan(body, patch)
            if patch.status:
                self.cluster.patch_llmd_status(namespace, name, patch.status)
        return done

    def _replan(self, body: Mapping[str, Any], patch: Any) -> bool:
        """``plan_and_apply`` whose outcome is in the status and the events: True when nothing is pending.
        A deployment being deleted is left alone (its delete handler released it; another finalizer, e.g.
        a foreground deletion's, may keep it a while): re-planning it would bring its workers back."""
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return True
        try:
            self.plan_and_apply(body, patch)
        except kopf.TemporaryError:
            return False
        except kopf.PermanentError:
            pass
        return True

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
            mode = self.resource_api(deployment)
            nodes = self.cluster.list_nodes()
            workloads = self.cluster.list_workloads()
            pods = self.cluster.foreign_gpu_pods() if mode == "devicePlugin" else []
            previous, previous_hash = self._previous_plan(namespace, name)
            owned = [
                w
                for w in workloads
                if w["metadata"].get("namespace") == namespace
                and (w["metadata"].get("labels") or {}).get(render.LABEL_DEPLOYMENT) == name
            ]
            own_pods = self.cluster.list_owned_pods(namespace, name)
            now = datetime.datetime.now(tz=datetime.UTC)
            stuck = stuck_pods(own_pods, now)
            avoid = _AVOIDED.update(
                key,
                {p.node for p in stuck if p.node and p.seconds >= self.settings.unschedulable_grace},
                self.settings.unschedulable_grace * AVOID_FACTOR,
            )
            input_hash = plan_input_hash(deployment, model_config, mode)
            with self.ledger.deciding():
                self.ledger.observe(self.cluster.reservations(workloads), read_started)
                book = self.ledger.snapshot(exclude=[key])
                kept = previous if previous_hash == input_hash else None
                with metrics.planning():
                    plan, how, moved = self._plan(
                        deployment, model_config, nodes, pods, book, kept, now=now, avoid=avoid
                    )
                if not self.cluster.serves_leaderworkersets():
                    plan = without_groups(plan)
                if avoid and _pending(plan):
                    unscheduled = dict(plan.get("unscheduled") or {})
                    unscheduled["reason"] = (
                        f"{unscheduled.get('reason')}; left out: {', '.join(sorted(avoid))} (the "
                        "deployment's pods stayed unschedulable there)"
                    )
                    plan = {**plan, "unscheduled": unscheduled}
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

        ready = _ready(owned)
        shapes = {render.placement_shape(r) for r in plan.get("replicas") or []} | {render.PLACEHOLDER}
        problems = self._problems(
            [w for w in owned if (w["metadata"].get("labels") or {}).get(render.LABEL_SHAPE) in shapes],
            [p for p in stuck if p.shape in shapes],
        )
        old_conditions = (body.get("status") or {}).get("conditions")
        new_status = status.planned_status(
            name,
            plan,
            desired=deployment.spec.replicas,
            ready=ready,
            generation=meta.get("generation"),
            old_conditions=old_conditions,
            now=status.now_rfc3339(),
            problems=problems,
            note=f"re-planned: {'; '.join(dict.fromkeys(moved))}" if moved else "",
        )
        pool = self._inference_pool(body, deployment)
        if pool is not None:
            new_status["conditions"] = status.merge_conditions(
                new_status["conditions"], [pool], status.now_rfc3339()
            )
            if pool["status"] == "False" and pool["reason"] == "APINotServed" and (
                status.condition_of(old_conditions, status.INFERENCE_POOL).get("reason") != "APINotServed"
            ):
                self.report("InferencePoolNotServed", pool["message"], True)
        new_status["resourceAPI"] = mode
        patch.status.update(new_status)
        metrics.STATE.observe_other_pods(pods)
        seen = {**(body.get("status") or {}), **new_status}
        metrics.STATE.observe_deployment(key, deployment.spec.replicas, seen, own_pods)
        if moved:
            reasons = "; ".join(dict.fromkeys(moved))
            self.report("Replanned", f"{len(moved)} replica(s) placed anew: {reasons}", True)
        self._report_problems(old_conditions, new_status["conditions"])
        _mark_waiting((namespace, name), bool(_pending(plan)))
        placed = len(plan.get("replicas") or [])
        nodes_used = sorted({p["node"] for r in plan.get("replicas") or [] for p in render.group_pods(r)})
        self.report(
            "Planned",
            f"{how}: {placed} replica(s) placed on {', '.join(nodes_used) or 'no node'}, "
            f"{_pending(plan)} pending; {new_status['vramPerReplica'] or '?'} GPU memory per replica",
            False,
        )
        if _pending(plan):
            reason = (plan.get("unscheduled") or {}).get("reason") or "no node has room"
            self.report("Unschedulable", f"{_pending(plan)} replica(s) pending: {reason}", True)
            raise Unschedulable(
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
            placeholder_image=self.settings.placeholder_image,
            priority_class=self.settings.placeholder_priority_class,
            dra_driver=self.settings.dra_driver,
        )
        for child in children:
            if child["kind"] == "ResourceClaimTemplate":
                self.cluster.create_if_absent(child)  # named by its spec, which the API keeps immutable
            elif child["kind"] == "ConfigMap":
                child["metadata"]["annotations"] = {PLAN_INPUT: input_hash}
                self.cluster.apply(child, self._existing_plan_cm)
            elif child["kind"] in _WORKLOAD_KINDS:
                self.cluster.apply(child, current.get(child["metadata"]["name"]))
            elif self._existing_plan_cm is None:
                # First reconciliation (no plan yet): create first; a 409 falls back to a patch.
                self.cluster.apply(child, None)
            else:
                self.cluster.apply(child)
        wanted = {c["metadata"]["name"] for c in children if c["kind"] in _WORKLOAD_KINDS}
        self.cluster.delete_workloads([w for n, w in current.items() if n not in wanted])
        if render.is_dra(plan) or self._dra_before:
            templates = {c["metadata"]["name"] for c in children if c["kind"] == "ResourceClaimTemplate"}
            for old in self.cluster.list_owned_claim_templates(deployment.namespace, deployment.name):
                if old["metadata"]["name"] not in templates:
                    self.cluster.delete(old)

    def _inference_pool(self, body: Mapping[str, Any], deployment: LLMDeployment) -> dict[str, Any] | None:
        """Create (or update) the InferencePool when the spec (or the operator's default) asks for one:
        the ``InferencePool`` condition to report, None when none is wanted and none was made."""
        generation = body["metadata"].get("generation")
        wanted = deployment.spec.serving.inferencePool.enabled
        wanted = self.settings.inference_pool if wanted is None else wanted
        conditions = (body.get("status") or {}).get("conditions")
        before = status.condition_of(conditions, status.INFERENCE_POOL) or None
        pool = render.render_inference_pool(body, deployment.spec)
        if not wanted:
            if before is not None and before.get("status") == "True":
                self.cluster.delete(pool)
            return None if before is None else status.condition(
                status.INFERENCE_POOL, False, "NotRequested", "spec.serving.inferencePool.enabled is false",
                generation)
        if not self.cluster.serves(render.INFERENCE_POOL_API_VERSION, "inferencepools"):
            message = (
                f"the cluster does not serve {render.INFERENCE_POOL_API_VERSION} InferencePools (install the "
                "Gateway API Inference Extension CRDs); the workers serve through Service "
                f"{pool['metadata']['name']}"
            )
            return status.condition(status.INFERENCE_POOL, False, "APINotServed", message, generation)
        self.cluster.apply(pool)
        ref = pool["spec"]["endpointPickerRef"]
        message = (f"InferencePool {pool['metadata']['name']} selects the workers on port {render.API_PORT}; "
                   f"Endpoint Picker {ref['name']}:{ref['port']['number']}")
        return status.condition(status.INFERENCE_POOL, True, "Created", message, generation)

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
        metrics.STATE.forget(key)
        return len(owned)

    def _problems(self, workloads: list[dict[str, Any]], stuck: list[StuckPod]) -> list[tuple[str, str]]:
        """What the cluster says against placed replicas: ``(reason, message)`` for ``Scheduled``."""
        out = []
        failed = failed_creates(workloads)
        if failed:
            out.append(("FailedCreate", f"the cluster refuses to create worker pods: {'; '.join(failed)}"))
        if stuck:
            shown = "; ".join(p.describe() for p in stuck[:3]) + ("; ..." if len(stuck) > 3 else "")
            grace = self.settings.unschedulable_grace
            out.append(
                (
                    "PodsUnschedulable",
                    f"{len(stuck)} worker pod(s) not scheduled: {shown} "
                    f"(re-planned elsewhere after {grace:.0f}s)",
                )
            )
        return out

    def _report_problems(self, old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> None:
        """A Warning event when the Scheduled condition turns to a problem or its message changes."""
        before = next((c for c in old or [] if c.get("type") == status.SCHEDULED), {})
        after = next((c for c in new if c.get("type") == status.SCHEDULED), {})
        changed = (before.get("reason"), before.get("message")) != (after.get("reason"), after.get("message"))
        if after.get("reason") in PROBLEM_REASONS and changed:
            self.report(str(after["reason"]), str(after.get("message") or ""), True)

    def _node(self, name: str) -> dict[str, Any] | None:
        cached = NODES.get(name)
        return dict(cached) if cached is not None else self.cluster.get_node(name)

    def _must_move(
        self,
        placements: list[dict[str, Any]],
        stuck: list[StuckPod],
        now: datetime.datetime,
        dra: bool = False,
    ) -> list[str]:
        """Why placed replicas must go elsewhere now (their nodes; pods unschedulable past the grace)."""
        out = [p.describe() for p in stuck if p.node and p.seconds >= self.settings.unschedulable_grace]
        for placement in placements:
            for pod in placement.get("pods") or [placement]:  # every node of a multi-node group
                node = str(pod.get("node") or "")
                replica = {"node": node, "gpus": pod.get("gpus"), "maxMemory": placement.get("budgets"),
                           "resource": GPU_CLASS if dra else ""}
                why = placement_problem(replica, self._node(node), now, self.settings.node_grace)
                if why:
                    out.append(why)
        return list(dict.fromkeys(out))

    def refresh(self, body: Mapping[str, Any], patch: Any) -> None:
        """The periodic look at what was placed: re-plan replicas whose node went away or whose pods
        kube-scheduler leaves unschedulable past the grace; else copy the workloads' ready replicas,
        surface refused pod creations and unscheduled pods in ``Scheduled``, and drop the
        ``status.workers`` entries of pods that no longer exist."""
        meta = body["metadata"]
        old = body.get("status") or {}
        if old.get("phase") in (None, "Failed"):
            return
        key = (meta.get("namespace") or "default", meta["name"])
        now = datetime.datetime.now(tz=datetime.UTC)
        owned = self.cluster.list_owned_workloads(*key)
        pods = self.cluster.list_owned_pods(*key)
        metrics.STATE.observe_deployment(key, _desired(body), old, pods)  # the workers' latest reports
        stuck = stuck_pods(pods, now)
        dra = old.get("resourceAPI") == "dra"
        moving = self._must_move(list(old.get("placements") or []), stuck, now, dra)
        if moving:
            log.info("%s/%s: re-planning: %s", *key, "; ".join(moving))
            with self.ledger.deployment(key):
                fresh = self.cluster.get_llmd(*key)  # read once no other reconciliation of it runs
                if fresh is not None:
                    self._replan(fresh, patch)
            return
        ready = _ready(owned)
        desired = _desired(body)
        signal = old.get("autoscaling") or {}
        problems = self._problems(owned, stuck)
        generation = meta.get("generation")
        new = [
            status.condition(
                status.READY,
                ready >= desired,
                "AllReplicasReady" if ready >= desired else "ReplicasNotReady",
                f"{ready} of {desired} replica(s) ready",
                generation,
            )
        ]
        old_conditions = list(old.get("conditions") or [])
        scheduled: dict[str, Any] = next((c for c in old_conditions if c.get("type") == status.SCHEDULED), {})
        if problems or scheduled.get("reason") in PROBLEM_REASONS:
            placed = len(old.get("placements") or [])
            new.append(status.scheduled_condition(placed, desired, signal, generation, problems))
        conditions = status.merge_conditions(old_conditions, new, status.now_rfc3339())
        gone = sorted(set(old.get("workers") or {}) - {_name(p) for p in pods})
        same = [_sans_time(c) for c in conditions] == [_sans_time(c) for c in old_conditions]
        pending = int(signal.get("pendingReplicas") or 0)
        phase = status.phase_of(desired, ready, bool(pending or problems))
        # The phase too: a stale write (this timer computing from a body read before a reconcile wrote
        # the new status) can leave one that contradicts the conditions.
        if ready == old.get("readyReplicas") and same and phase == old.get("phase") and not gone:
            return
        if gone:
            patch.status["workers"] = {pod: None for pod in gone}  # a merge patch removes them
        patch.status["readyReplicas"] = ready
        patch.status["conditions"] = conditions
        patch.status["phase"] = phase
        self._report_problems(old_conditions, conditions)


class _StatusPatch:
    """What kopf's ``patch`` offers a handler, for reconciliations outside kopf's handlers."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}


_locks_guard = threading.Lock()

#: Scheduled reasons that say the cluster refuses placed replicas (the periodic check clears them).
PROBLEM_REASONS = ("FailedCreate", "PodsUnschedulable")
#: The children that run pods: Deployments (single-node replicas, placeholders) and LeaderWorkerSets (groups).
_WORKLOAD_KINDS = ("Deployment", render.LWS_KIND)
#: Nodes where a deployment's pods stayed unschedulable are avoided for this many unschedulable graces.
AVOID_FACTOR = 5


class _Avoided:
    """Per deployment, the nodes its replicas were moved away from because kube-scheduler would not
    place them there, until when (so the next plan does not pick the same node at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[tuple[str, str], dict[str, float]] = {}

    def update(self, key: tuple[str, str], nodes: Iterable[str], seconds: float) -> set[str]:
        """Add ``nodes`` for ``seconds``; the nodes avoided now."""
        now = time.monotonic()
        with self._lock:
            known = {n: t for n, t in self._until.get(key, {}).items() if t > now}
            known.update(dict.fromkeys(nodes, now + seconds))
            if known:
                self._until[key] = known
            else:
                self._until.pop(key, None)
            return set(known)

    def reset(self) -> None:
        with self._lock:
            self._until.clear()


_AVOIDED = _Avoided()


def start_afresh() -> None:
    """Operator start: forget what an earlier run in this process knew (the ledger, the node cache,
    the nodes avoided, the deployments left waiting); the first reads rebuild it."""
    LEDGER.reset()
    NODES.reset()
    metrics.reset()
    _AVOIDED.reset()
    with _locks_guard:
        _waiting_here.clear()


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
    """Re-plan every (namespace, name) given (those with pending replicas, or with replicas on a node
    that went away); how many have none pending now."""
    placed = 0
    for namespace, name in sorted(set(waiting)):
        if Reconciler(cluster, settings).replan(namespace, name):
            placed += 1
    return placed


def node_event(
    cluster: Cluster,
    settings: Settings,
    event_type: str | None,
    node: Mapping[str, Any],
    seen: dict[str, str],
    waiting: Iterable[tuple[str, str]],
) -> None:
    """A node appeared, changed or went: keep the node cache, re-plan the deployments waiting for GPUs
    when a GPU node changed, and those with replicas on it when it can no longer hold them (gone,
    cordoned, NotReady past the grace, GPUs lost)."""
    NODES.update(event_type, node)
    name = _name(node)
    if gpu_node_changed(event_type, node, seen) and waiting:
        replan_waiting(cluster, settings, waiting)
    holders = LEDGER.holders(name)
    if not holders:
        return
    now = datetime.datetime.now(tz=datetime.UTC)
    # A node without any NVIDIA label or allocatable is a DRA node (its ResourceSlices list its GPUs): its
    # replicas move when it goes, is cordoned or stays NotReady; the periodic check sees the rest.
    problem = node_problem(name, None if event_type == "DELETED" else node, now, settings.node_grace,
                           gpu_labels=event_type == "DELETED" or advertises_gpus(node))
    if problem:
        log.info("%s: re-planning %d deployment(s) with replicas there", problem, len(holders))
        replan_waiting(cluster, settings, holders)


def _taken(
    held: Sequence[Reservation],
    nodes: Mapping[str, Mapping[str, Any]],
    book: Sequence[Reservation],
    left: dict[str, NodeInventory | None],
) -> str:
    """Why a placed replica (``held``: its reservations, from the last plan) may not stay on its GPUs: the
    ledger's ``book`` (every other deployment's reservations) holds them now; empty when it may stay.
    The plan ConfigMap can name GPUs that no workload holds any more (a workload deleted by hand, or whose
    write failed after the ConfigMap's), which another deployment may have been given meanwhile.
    ``left``: per node, what the book and the replicas kept so far leave (filled here)."""
    for reservation in held:
        if reservation.node not in left:
            inventory = node_inventory(nodes[reservation.node], []) if reservation.node in nodes else None
            if inventory is not None:
                apply_reservations([inventory], book, [])
            left[reservation.node] = inventory
        inventory = left[reservation.node]
        if inventory is None:
            continue
        for index, nbytes in reservation.gpus:
            if not 0 <= index < len(inventory.devices):
                continue
            whole = reservation.sharing != "shared" or inventory.devices[index].kind != "timeslice"
            free = inventory.free_bytes(index)
            if free < (inventory.devices[index].memory_bytes if whole else nbytes):
                others = {r.label for r in book if r.node == reservation.node and index in dict(r.gpus)}
                holders = ", ".join(sorted(others)) or "another replica"
                return f"GPU {index} of node {reservation.node} is held by {holders} now"
    for reservation in held:
        apply_reservations([n for n in [left.get(reservation.node)] if n is not None], [reservation], [])
    return ""


def without_groups(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan for a cluster that does not serve LeaderWorkerSets: replicas planned as multi-node groups
    become pending, with ``unscheduled.code`` ``LeaderWorkerSetUnavailable`` and a reason that says so (no
    autoscaling signal: no node makes them runnable)."""
    groups = [r for r in plan.get("replicas") or [] if r.get("group")]
    if not groups:
        return plan
    group = groups[0]["group"]
    reason = (
        f"{len(groups)} replica(s) need a group of {group['size']} pods x {group['gpusPerPod']} GPUs on "
        f"{group['size']} nodes (tensor parallel {group['tensorParallel']} x {group['pipelineParallel']} "
        f"pipeline stages), which kubevram runs as a LeaderWorkerSet, and the cluster does not serve "
        f"{render.LWS_API_VERSION}: install LeaderWorkerSet (https://lws.sigs.k8s.io) or set "
        "spec.placement.multiNode: never"
    )
    return {
        **plan,
        "replicas": [r for r in plan["replicas"] if not r.get("group")],
        "unscheduled": {
            "count": _pending(plan) + len(groups),
            "reason": reason,
            "autoscaling": None,
            "code": render.LWS_UNAVAILABLE,
        },
    }


def _ready(workloads: Iterable[Mapping[str, Any]]) -> int:
    """Ready worker replicas (a placeholder's pause pods are ready too, and serve nothing)."""
    return sum(
        int((w.get("status") or {}).get("readyReplicas") or 0)
        for w in workloads
        if ((w.get("metadata") or {}).get("labels") or {}).get(render.LABEL_SHAPE) != render.PLACEHOLDER
    )


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _desired(body: Mapping[str, Any]) -> int:
    return int((body.get("spec") or {}).get("replicas") or 0)


def _sans_time(cond: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cond.items() if k != "lastTransitionTime"}


def _pending(plan: Mapping[str, Any]) -> int:
    return int((plan.get("unscheduled") or {}).get("count") or 0)


def _offer(name: str, count: int, mib: int, per_replica: int) -> tuple[int, str]:
    """(MiB one replica could get, words): ``per_replica`` GPUs at most (0: as many as there are)."""
    n = min(count, per_replica) if per_replica else count
    if per_replica == 1 or n == 1:
        return mib, f"largest GPU: {mib} MiB ({name})"
    return n * mib, f"largest: {n} x {mib} MiB ({name})"


def largest_offer(nodes: Iterable[Mapping[str, Any]], per_replica: int) -> str:
    """The most GPU memory one replica could get on one present node, in words: the largest single GPU
    when ``spec.placement.gpusPerReplica`` is 1, else that many (or all) GPUs of a node."""
    best = (0, "no GPU node")
    for node in nodes:
        inventory = node_inventory(node, [])
        if inventory is None or not inventory.devices:
            continue
        mib = max(d.memory_bytes for d in inventory.devices) // 2**20
        count = sum(1 for d in inventory.devices if d.memory_bytes // 2**20 == mib)
        best = max(best, _offer(f"node {inventory.name}", count, mib, per_replica))
    return best[1]


def largest_class(raw: Sequence[Mapping[str, Any]] | None, per_replica: int) -> str:
    """The same for the node classes the autoscaling signal chooses from."""
    classes = parse_node_classes(raw, []) or KNOWN_PRODUCTS
    best = max(_offer(f"class {c.name}", c.gpus_per_node, c.gpu_memory_mib, per_replica) for c in classes)
    return best[1]


def _transient(exc: ApiException, settings: Settings) -> Exception:
    """API errors worth a retry (conflicts, throttling, server errors) become ``TemporaryError``."""
    if exc.status in TRANSIENT_STATUSES:
        return kopf.TemporaryError(
            f"API {exc.status} {exc.reason}: retrying", delay=min(settings.retry_delay, 5)
        )
    return exc
