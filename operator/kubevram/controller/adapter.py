"""The Kubernetes adapter: the only module of the operator that talks to the API server.

Sync, on the official ``kubernetes`` client (kopf runs sync handlers in a thread pool). The client
is configured from ``KUBECONFIG`` (or ``~/.kube/config``) or, inside a pod, the service account, the
first time an adapter is made. Writes are idempotent: ``apply`` creates a missing object and
merge-patches an existing one (a 409 on create, i.e. someone created it meanwhile, becomes a patch),
so a restarted operator or a retried handler never makes duplicates.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubevram.api.load import parse_config_json
from kubevram.api.v1alpha1 import API_VERSION, PLURAL
from kubevram.controller import metrics
from kubevram.controller.render import (
    LABEL_DEPLOYMENT,
    LABEL_MANAGED_BY,
    LWS_API_VERSION,
    LWS_KIND,
    MANAGED_BY,
    RESERVATION,
)
from kubevram.planner.inventory import Reservation

MERGE_PATCH = "application/merge-patch+json"
LWS_PLURAL = "leaderworkersets"

_config_lock = threading.Lock()
_configured: dict[str, client.ApiClient] = {}
#: Discovery answers per (API server, group/version): (when read, the resources served).
_discovered: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
#: Seconds a discovery answer is trusted (a CRD installed later is seen within this long).
DISCOVERY_TTL = 30.0


def api_client() -> client.ApiClient:
    """One ``ApiClient`` per ``KUBECONFIG`` value, from the in-cluster account or the kubeconfig."""
    key = os.environ.get("KUBECONFIG", "")
    with _config_lock:
        if key not in _configured:
            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                # KUBECONFIG is read now, not when the kubernetes package was imported.
                config.load_kube_config(config_file=key or None, client_configuration=configuration)
            _configured[key] = client.ApiClient(configuration)
        return _configured[key]


class ConfigNotReadable(Exception):
    """A ConfigMap (or key) holding a model config is missing or is not a JSON object."""


class Cluster:
    """Reads the inventory (nodes, kubevram workloads) and applies children."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or api_client()
        self._lws: bool | None = None

    # ------------------------------------------------------------------------------------ reading

    def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json",
        expected: tuple[int, ...] = (),
    ) -> Any:
        """One API call; non-2xx answers raise ``ApiException`` (``.status`` 404, 409, ...). Those not in
        ``expected`` (what the caller handles as an answer: a 404 for "not created yet", a 409 for "created
        by someone else first") count in ``kubevram_api_errors_total``."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, post = self.api.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self.api.call_api(method, url, header_params=headers, body=body, post_params=post)
        response.read()
        text = response.data.decode("utf-8") if response.data else ""
        if not 200 <= response.status < 300:
            if response.status not in expected:
                metrics.api_error(response.status)
            raise ApiException(status=response.status, reason=response.reason, body=text)
        return json.loads(text) if text else None

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            data = self._request("GET", path, expected=(404,))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return data if isinstance(data, dict) else None

    def _raw(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json",
        expected: tuple[int, ...] = (),
    ) -> Any:
        return self._request(method, path, body, content_type, expected)

    def list_nodes(self) -> list[dict[str, Any]]:
        """Every Node as the API returns it (plain dicts with GFD labels and allocatable)."""
        data = self._get("/api/v1/nodes") or {}
        return list(data.get("items") or [])

    def serves_leaderworkersets(self) -> bool:
        """Whether the cluster serves ``leaderworkerset.x-k8s.io/v1`` (LeaderWorkerSet is installed): its
        discovery document lists ``leaderworkersets``. Asked once per adapter (one reconciliation)."""
        if self._lws is None:
            found = self._get(f"/apis/{LWS_API_VERSION}") or {}
            self._lws = any(r.get("name") == LWS_PLURAL for r in found.get("resources") or [])
        return self._lws

    def list_workloads(self) -> list[dict[str, Any]]:
        """Every Deployment kubevram manages, in every namespace, and its LeaderWorkerSets where served."""
        selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
        paths = [f"/apis/apps/v1/deployments?labelSelector={selector}"]
        if self.serves_leaderworkersets():
            paths.append(f"/apis/{LWS_API_VERSION}/{LWS_PLURAL}?labelSelector={selector}")
        items = [item for path in paths for item in (self._get(path) or {}).get("items") or []]
        # The label selector is a server-side filter; filter again for servers that ignore it.
        return [
            d
            for d in items
            if (d.get("metadata", {}).get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY
        ]

    def _owned(self, collection: str, namespace: str, name: str) -> list[dict[str, Any]]:
        """The objects of a namespaced collection labelled as ``name``'s (filtered again here too)."""
        selector = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_DEPLOYMENT}={name}"
        data = self._get(f"{collection.format(namespace=namespace)}?labelSelector={selector}") or {}
        return [
            d
            for d in data.get("items") or []
            if (d.get("metadata") or {}).get("namespace") == namespace
            and ((d.get("metadata") or {}).get("labels") or {}).get(LABEL_DEPLOYMENT) == name
        ]

    def list_owned_workloads(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The worker Deployments (and the placeholder) of one LLMDeployment, and its LeaderWorkerSets."""
        owned = self._owned("/apis/apps/v1/namespaces/{namespace}/deployments", namespace, name)
        if self.serves_leaderworkersets():
            collection = f"/apis/{LWS_API_VERSION}/namespaces/{{namespace}}/{LWS_PLURAL}"
            owned += self._owned(collection, namespace, name)
        return owned

    def list_owned_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The worker pods of one LLMDeployment (their scheduling state, the names in status.workers)."""
        return self._owned("/api/v1/namespaces/{namespace}/pods", namespace, name)

    def get_node(self, name: str) -> dict[str, Any] | None:
        return self._get(f"/api/v1/nodes/{name}")

    def serves(self, group_version: str, plural: str) -> bool:
        """Whether the API server serves ``plural`` in ``group_version`` (discovery, remembered a while)."""
        key = (self.api.configuration.host, group_version)
        now = time.monotonic()
        with _config_lock:
            cached = _discovered.get(key)
        if cached is None or now - cached[0] > DISCOVERY_TTL:
            data = self._get(f"/apis/{group_version}") or {}
            names = frozenset(str(r.get("name")) for r in data.get("resources") or [] if isinstance(r, dict))
            cached = (now, names)
            with _config_lock:
                _discovered[key] = cached
        return plural in cached[1]

    def list_resource_slices(self) -> list[dict[str, Any]]:
        """Every ResourceSlice (resource.k8s.io/v1): the DRA drivers' devices."""
        return list((self._get("/apis/resource.k8s.io/v1/resourceslices") or {}).get("items") or [])

    def list_resource_claims(self) -> list[dict[str, Any]]:
        """Every ResourceClaim, in every namespace: what is allocated of the devices."""
        return list((self._get("/apis/resource.k8s.io/v1/resourceclaims") or {}).get("items") or [])

    def list_owned_claim_templates(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The ResourceClaimTemplates of one LLMDeployment's workers and placeholders (DRA mode)."""
        collection = "/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaimtemplates"
        return self._owned(collection, namespace,
                           name)

    @staticmethod
    def reservations(workloads: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[Reservation]]:
        """What the API shows kubevram holds: ``{(namespace, LLMDeployment): [reservation per replica]}``.

        The pod template carries the reservation annotation; a workload with N replicas reserves N
        times. Reading templates rather than pods counts replicas whose pods do not exist yet (just
        applied, or pending). Workloads without a node (placeholders) hold nothing. A LeaderWorkerSet
        carries the reservations of all its pods, one per node of a group, on itself.
        """
        out: dict[tuple[str, str], list[Reservation]] = {}
        for workload in workloads:
            meta = workload["metadata"]
            owner = str((meta.get("labels") or {}).get(LABEL_DEPLOYMENT))
            key = (str(meta.get("namespace") or "default"), owner)
            held = out.setdefault(key, [])
            if is_leader_worker_set(workload):
                raw = (meta.get("annotations") or {}).get(RESERVATION)
            else:
                template_meta = ((workload.get("spec") or {}).get("template") or {}).get("metadata") or {}
                raw = (template_meta.get("annotations") or {}).get(RESERVATION)
            if raw is None:
                continue
            try:
                source = f"workload {key[0]}/{meta.get('name')}"
                found = Reservation.all_from_annotation(*key, raw, source=source)
            except ValueError:
                continue
            count = int((workload.get("spec") or {}).get("replicas") or 0)
            held += [one for one in found if one.node and one.gpus] * count
        return out

    def foreign_gpu_pods(self) -> list[dict[str, Any]]:
        """Running or pending pods that are not kubevram's but hold GPUs on a node (the planner
        subtracts what they request)."""
        data = self._get("/api/v1/pods?fieldSelector=status.phase!=Succeeded,status.phase!=Failed") or {}
        out = []
        for pod in data.get("items") or []:
            labels = (pod.get("metadata") or {}).get("labels") or {}
            if labels.get(LABEL_MANAGED_BY) == MANAGED_BY or not (pod.get("spec") or {}).get("nodeName"):
                continue
            containers = (pod.get("spec") or {}).get("containers") or []
            if any("nvidia.com/" in json.dumps(c.get("resources") or {}) for c in containers):
                out.append(pod)
        return out

    def list_llmds(self) -> list[dict[str, Any]]:
        """Every LLMDeployment, in every namespace."""
        return list((self._get(f"/apis/{API_VERSION}/{PLURAL}") or {}).get("items") or [])

    def list_worker_pods(self) -> list[dict[str, Any]]:
        """Every pod kubevram manages, in every namespace (their reservations place the workers' reports)."""
        data = self._get(f"/api/v1/pods?labelSelector={LABEL_MANAGED_BY}={MANAGED_BY}") or {}
        return [
            p for p in data.get("items") or []
            if ((p.get("metadata") or {}).get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY
        ]

    def read_config_json(self, namespace: str, name: str, key: str) -> dict[str, Any]:
        """The JSON object under ``key`` of a ConfigMap; ``ConfigNotReadable`` says why not."""
        cm = self._get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        if cm is None:
            raise ConfigNotReadable(f"ConfigMap {namespace}/{name} not found")
        text = (cm.get("data") or {}).get(key)
        if text is None:
            raise ConfigNotReadable(f"ConfigMap {namespace}/{name} has no key {key!r}")
        try:
            return parse_config_json(text, f"{key!r} of ConfigMap {namespace}/{name}")
        except ValueError as exc:
            raise ConfigNotReadable(str(exc)) from None

    def get_llmd(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}")

    def patch_llmd_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        path = f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self._raw("PATCH", path, {"status": status}, MERGE_PATCH)

    # ------------------------------------------------------------------------------------ writing

    @staticmethod
    def _collection(manifest: dict[str, Any]) -> str:
        api_version = manifest["apiVersion"]
        plural = _PLURALS[manifest["kind"]]
        namespace = manifest["metadata"].get("namespace")
        prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"

    def apply(self, manifest: dict[str, Any], existing: Any = ...) -> str:
        """Create the object, or merge-patch it when it exists. Returns ``created``, ``patched`` or
        ``replaced`` (deleted and created anew, when a field the API server keeps immutable must change).

        ``existing``: the object as last read (a dict), ``None`` when known to be absent, or left out
        (the patch is tried first and a 404 turns into a create). A 409 on create (someone created it
        meanwhile) turns into a patch. One request in the common cases.
        """
        collection = self._collection(manifest)
        path = f"{collection}/{manifest['metadata']['name']}"
        immutable = _IMMUTABLE.get(manifest["kind"])
        if immutable and isinstance(existing, dict) and existing.get(immutable) != manifest.get(immutable):
            return self._replace(manifest)
        if existing is ...:
            try:
                self._raw("PATCH", path, manifest, MERGE_PATCH, expected=(404,))
                return "patched"
            except ApiException as exc:
                if exc.status == 422 and immutable:
                    return self._replace(manifest)
                if exc.status != 404:
                    raise
            existing = None
        if existing is None:
            try:
                self._raw("POST", collection, manifest, expected=(409,))
                return "created"
            except ApiException as exc:
                if exc.status != 409:
                    raise
                existing = self._get(path) or {}
                if immutable and existing.get(immutable) != manifest.get(immutable):
                    return self._replace(manifest)
        self._raw("PATCH", path, _with_removals(existing, manifest), MERGE_PATCH)
        return "patched"

    def _replace(self, manifest: dict[str, Any]) -> str:
        """Delete and create anew an object whose immutable field must change. Returns ``replaced``."""
        self.delete(manifest)
        self._raw("POST", self._collection(manifest), manifest)
        return "replaced"

    def create_if_absent(self, manifest: dict[str, Any]) -> bool:
        """Create the object unless it exists (never touch an existing one). True when created."""
        try:
            self._raw("POST", self._collection(manifest), manifest, expected=(409,))
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete(self, manifest_or_kind: dict[str, Any]) -> None:
        """Delete one object; a missing object is not an error."""
        path = f"{self._collection(manifest_or_kind)}/{manifest_or_kind['metadata']['name']}"
        try:
            self._raw("DELETE", path, {"propagationPolicy": "Background"}, expected=(404,))
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_workloads(self, workloads: Iterable[dict[str, Any]]) -> None:
        for workload in workloads:
            lws = is_leader_worker_set(workload)
            api_version, kind = (LWS_API_VERSION, LWS_KIND) if lws else ("apps/v1", "Deployment")
            self.delete({"apiVersion": api_version, "kind": kind, "metadata": workload["metadata"]})


def is_leader_worker_set(workload: Mapping[str, Any]) -> bool:
    """Whether a workload read from the API is a LeaderWorkerSet (list items may carry no ``kind``)."""
    return workload.get("kind") == LWS_KIND or "leaderWorkerTemplate" in (workload.get("spec") or {})


def _with_removals(existing: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that also removes what the operator wrote before and no longer renders.

    A merge patch keeps keys it does not mention, so keys the operator owns and dropped (a
    ConfigMap's stale plan files, a pod template's former nodeSelector) are set to null. Fields the
    API server defaults (a Service's clusterIP, a Deployment's revisionHistoryLimit) are left alone.
    """
    patch = dict(manifest)
    if manifest.get("kind") == "ConfigMap":
        stale = set(existing.get("data") or {}) - set(manifest.get("data") or {})
        patch["data"] = {**(manifest.get("data") or {}), **{key: None for key in stale}}
    if manifest.get("kind") == "Deployment":
        patch["spec"] = {**manifest["spec"], "template": _template_removals(
            manifest["spec"]["template"], ((existing.get("spec") or {}).get("template") or {}))}
    if manifest.get("kind") == LWS_KIND:
        desired_lws = manifest["spec"]["leaderWorkerTemplate"]
        current_lws = (existing.get("spec") or {}).get("leaderWorkerTemplate") or {}
        patch["spec"] = {**manifest["spec"], "leaderWorkerTemplate": {
            **desired_lws,
            **{key: _template_removals(desired_lws[key], current_lws.get(key) or {})
               for key in ("leaderTemplate", "workerTemplate")},
        }}
    return patch


def _template_removals(desired: dict[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """A pod template whose optional scheduling fields the operator no longer renders become null."""
    now = current.get("spec") or {}
    removed = {key: None for key in _OPTIONAL_POD_FIELDS if key in now and key not in desired["spec"]}
    return {**desired, "spec": {**desired["spec"], **removed}} if removed else desired


# resourceClaims: a replica re-planned from DRA to the device plugin keeps its workload's name; a claim
# left on the template would name a ResourceClaimTemplate the operator deleted, and no pod could start.
_OPTIONAL_POD_FIELDS = ("nodeSelector", "affinity", "tolerations", "resourceClaims")
# Fields the API server never lets change (422): such an object is deleted and created anew. A
# RoleBinding's roleRef changed when kubevram moved the workers from a shared ClusterRole to a Role each.
_IMMUTABLE = {"RoleBinding": "roleRef"}

_PLURALS = {
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Deployment": "deployments",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "NetworkPolicy": "networkpolicies",
    "Node": "nodes",
    "Namespace": "namespaces",
    "Pod": "pods",
    "ResourceClaimTemplate": "resourceclaimtemplates",
    "InferencePool": "inferencepools",
    LWS_KIND: LWS_PLURAL,
}
