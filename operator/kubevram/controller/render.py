"""Pure rendering: an LLMDeployment and its plan in, the children's manifests out.

No API calls and no globals: everything a manifest depends on (the resource's body, the plan JSON,
the worker image, the ClusterRole name) is an argument, so every rule here is tested with plain
dicts. The plan is the JSON form of ``kubevram plan -o json`` for one deployment::

    {"name": ..., "estimate": {...}, "replicas": [{"node", "gpus", "maxMemory", "deviceMap"}, ...],
     "unscheduled": {"count", "reason", "autoscaling": {"gpuClass", "minGpuMemoryMiB", "gpuCount"}}}

Children, all in the resource's namespace and owned by it (garbage-collected with it):

* ConfigMap ``<name>-plan``: one ``plan-<shape>.json`` (a ``WorkerPlan``) per distinct device map;
* Secret ``<name>-admin``: the admin token (rendered once; never rotated by a reconcile);
* ServiceAccount ``<name>-worker``, Role ``<name>-worker`` (get and patch on this LLMDeployment's
  status only, by ``resourceNames``) and the RoleBinding between them;
* Service ``<name>``: port 8000 (the OpenAI API); the admin port 8001 stays out of it;
* NetworkPolicy ``<name>-worker``: clients reach port 8000, only the operator's pods port 8001;
* one Deployment ``<name>-<shape>`` per placement shape (node, node GPUs and budgets), pinned to its
  node, and ``<name>-placeholder`` for replicas that fit nowhere yet: the cluster autoscaler's own
  overprovisioning pattern, a pause container at a negative PriorityClass that asks exactly what a
  new node must offer (GPU count, ``nvidia.com/gpu.memory`` per GPU, the spec's node selector), so
  that the autoscaler grows the right node group while any real pod preempts it. Placeholder pods
  carry no reservation and no ``llm.kubevram.io/deployment`` label: they never count as capacity,
  as reservations, in the Service or in the ready replicas.

Worker pods pass the PodSecurity ``restricted`` profile: non-root (the image's user 65532), no
privilege escalation, every capability dropped, the RuntimeDefault seccomp profile and a read-only
root filesystem. What the worker writes goes to volumes: ``/tmp``, its home (the Hugging Face cache,
where downloaded weights land, and CUDA's and Triton's caches) and, with disk offload, the offload folder;
each an emptyDir with a size limit (the home's from the model's parameters, unless the weights come
from ``spec.model.volume``), whose sum the pod requests as ephemeral storage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from kubevram.api.quantity import MiB
from kubevram.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, LLMDeploymentSpec
from kubevram.api.workerplan import DEFAULT_GROUP_PORT, DEFAULT_OFFLOAD_FOLDER, WorkerPlan
from kubevram.controller import claims
from kubevram.planner.dra import DRIVER
from kubevram.planner.host import CACHE_HEADROOM, TMP_BYTES, WORKER_MEMORY, unquantized_checkpoint_bytes

MANAGED_BY = "kubevram"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DEPLOYMENT = "llm.kubevram.io/deployment"
LABEL_SHAPE = "llm.kubevram.io/shape"
RESERVATION = "llm.kubevram.io/reservation"
PLAN_HASH = "llm.kubevram.io/plan-hash"
PENDING = "pending"
#: On placeholder pods instead of LABEL_DEPLOYMENT (so that no Service or HPA selects them).
LABEL_PLACEHOLDER = "llm.kubevram.io/placeholder-for"
PLACEHOLDER = "placeholder"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
#: The chart creates it (value -1: above the cluster autoscaler's expendable-pods cutoff of -10).
PLACEHOLDER_PRIORITY_CLASS = "kubevram-placeholder"
#: The Gateway API Inference Extension's Endpoint Picker reads each pod's engine type from this label to
#: know which metric names to scrape; ``vllm`` is its built-in mapping for vllm:num_requests_waiting,
#: vllm:num_requests_running, vllm:kv_cache_usage_perc and vllm:cache_config_info: what the worker serves.
LABEL_ENGINE_TYPE = "inference.networking.k8s.io/engine-type"
ENGINE_TYPE = "vllm"

PLAN_DIR = "/etc/kubevram"
MODEL_DIR = "/models"
OFFLOAD_DIR = DEFAULT_OFFLOAD_FOLDER
API_PORT = 8000
ADMIN_PORT = 8001
TOKEN_KEY = "token"
GPU_RESOURCE = "nvidia.com/gpu"
# On deletion a worker pod pauses PRESTOP_SECONDS (while the endpoints drop it), then gets SIGTERM and
# drains for 20 s (`kubevram worker --drain-seconds`' default); the grace period covers both and a margin.
PRESTOP_SECONDS = 5
GRACE_SECONDS = 30
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
HOSTNAME_LABEL = "kubernetes.io/hostname"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
# LeaderWorkerSet (leaderworkerset.x-k8s.io/v1): one per multi-node replica shape.
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_KIND = "LeaderWorkerSet"
#: The label LWS puts on every pod of a group: "0" on the leader.
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
GROUP_PORT = DEFAULT_GROUP_PORT
#: ``unscheduled.code`` of replicas that need a group where the cluster does not serve LeaderWorkerSets.
LWS_UNAVAILABLE = "LeaderWorkerSetUnavailable"

# The worker image's user (Dockerfile: useradd --uid 65532), its home and what it writes there.
WORKER_UID = 65532
HOME_DIR = "/home/kubevram"
HF_HOME = f"{HOME_DIR}/.cache/huggingface"
TMP_DIR = "/tmp"
WORKER_CPU = "1"


def _digest(value: Any, length: int = 8) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _base_name(name: str) -> str:
    # Deployment names become pod name prefixes: keep room for "-<shape>-<rs hash>-<pod hash>".
    return name[:36].rstrip("-")


def config_map_name(name: str) -> str:
    return f"{_base_name(name)}-plan"


def secret_name(name: str) -> str:
    return f"{_base_name(name)}-admin"


def service_account_name(name: str) -> str:
    return f"{_base_name(name)}-worker"


def selector_labels(name: str) -> dict[str, str]:
    """The labels every worker pod of the deployment carries (the Service's and HPA's selector)."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(body: Mapping[str, Any], name: str, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": body["metadata"].get("namespace") or "default",
        "labels": {
            "app.kubernetes.io/name": "kubevram-worker",
            "app.kubernetes.io/instance": body["metadata"]["name"],
            **selector_labels(body["metadata"]["name"]),
            **labels,
        },
        "ownerReferences": [owner_reference(body)],
    }


# ------------------------------------------------------------------------------------- shapes


def _group_layout(replica: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a group's pods load (layout, stages, rank budgets), without where they run."""
    group = replica.get("group")
    if not group:
        return None
    return {k: v for k, v in group.items() if k not in ("pods", "totals")}


def worker_shape(replica: Mapping[str, Any] | None) -> str:
    """The key of a worker plan: replicas with the same device map and budgets (or the same group
    layout) share one plan file."""
    if replica is None:
        return PENDING
    shape: dict[str, Any] = {"maxMemory": replica.get("maxMemory"), "deviceMap": replica.get("deviceMap")}
    if replica.get("group"):
        shape["group"] = _group_layout(replica)
    return _digest(shape)


def group_pods(replica: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pods of a replica, leader first: ``[{"node", "gpus", "reservation"}]`` (one for a single-node
    replica)."""
    group = replica.get("group") or {}
    if group.get("pods"):
        return [dict(p) for p in group["pods"]]
    return [
        {"node": replica.get("node"), "gpus": replica.get("gpus"), "reservation": replica.get("reservation")}
    ]


def placement_shape(replica: Mapping[str, Any]) -> str:
    """The key of a workload: nodes, node GPUs and budgets (replicas that are exactly alike)."""
    shape: dict[str, Any] = {
        "node": replica.get("node"),
        "gpus": replica.get("gpus"),
        "maxMemory": replica.get("maxMemory"),
        "deviceMap": replica.get("deviceMap"),
    }
    if replica.get("group"):
        shape["pods"] = [(p["node"], p["gpus"]) for p in group_pods(replica)]
        shape["group"] = _group_layout(replica)
    return _digest(shape)


def plan_key(shape: str) -> str:
    return f"plan-{shape}.json"


def group_replicas(plan: Mapping[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Placed replicas grouped by placement shape, in plan order: ``[(shape, [replica, ...]), ...]``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for replica in plan.get("replicas") or []:
        groups.setdefault(placement_shape(replica), []).append(dict(replica))
    return list(groups.items())


def reservation(replica: Mapping[str, Any] | None, sharing: str) -> dict[str, Any]:
    """``{"node", "gpus": {node GPU index: bytes}, "sharing"}``: what one pod holds, for later plans.

    The planner's own ``reservation`` (a whole GPU's memory for exclusive replicas) is used when the
    plan has it; otherwise the replica's per-GPU budgets.
    """
    if replica is None:
        return {"node": "", "gpus": {}, "sharing": sharing}
    if replica.get("reservation"):
        gpus = {str(k): int(v) for k, v in replica["reservation"].items()}
    else:
        budgets = replica.get("maxMemory") or {}
        gpus = {
            str(node_index): int(budgets.get(str(pod_index), 0))
            for pod_index, node_index in enumerate(replica["gpus"])
        }
    return {"node": replica.get("node") or "", "gpus": gpus, "sharing": sharing}


def reservations(replica: Mapping[str, Any], sharing: str) -> list[dict[str, Any]]:
    """What each pod of a replica holds (one entry per pod of a multi-node group), for later plans."""
    if not replica.get("group"):
        return [reservation(replica, sharing)]
    return [reservation(pod, sharing) for pod in group_pods(replica)]


def group_reservation(replica: Mapping[str, Any], sharing: str, pods: slice = slice(None)) -> dict[str, Any]:
    """The reservation annotation of a group's pods: ``{"pods": [{"node", "gpus"}], "sharing"}``; a pod
    reads its own entry by its node."""
    entries = [{"node": r["node"], "gpus": r["gpus"]} for r in reservations(replica, sharing)[pods]]
    return {"pods": entries, "sharing": sharing}


# ---------------------------------------------------------------------------------- the plans


def worker_plan(
    body: Mapping[str, Any],
    spec: LLMDeploymentSpec,
    replica: Mapping[str, Any] | None,
    plan: Mapping[str, Any] | None = None,
) -> WorkerPlan:
    """What one worker loads: the spec's serving settings plus the replica's device map and budgets, and
    the planned KV cache (``plan``'s estimate) its gauge ``vllm:kv_cache_usage_perc`` is a share of."""
    device_map = dict(replica["deviceMap"]) if replica and replica.get("deviceMap") else None
    max_memory = (
        {k: int(v) for k, v in replica["maxMemory"].items()} if replica and replica.get("maxMemory") else None
    )
    uses_disk = (
        spec.placement.offload == "disk"
        or bool(max_memory and "disk" in max_memory)
        or bool(device_map and "disk" in device_map.values())
    )
    return WorkerPlan.model_validate(
        {
            "deployment": {
                "name": body["metadata"]["name"],
                "namespace": body["metadata"].get("namespace") or "default",
            },
            "model": {"id": spec.model.id, "trustRemoteCode": spec.model.trustRemoteCode},
            "precision": spec.precision.model_dump(),
            "serving": spec.serving.model_dump(exclude={"inferencePool"}),
            "generation": spec.generation.model_dump(),
            "memoryRelease": spec.memoryRelease.model_dump(),
            "deviceMap": device_map,
            "maxMemory": max_memory,
            "offloadFolder": OFFLOAD_DIR if uses_disk else None,
            "group": {**(_group_layout(replica) or {}), "port": GROUP_PORT}
            if replica and replica.get("group")
            else None,
            "kvCacheBytes": ((plan or {}).get("estimate") or {}).get("kvCacheBytes"),
        }
    )


def render_config_map(
    body: Mapping[str, Any], spec: LLMDeploymentSpec, plan: Mapping[str, Any]
) -> dict[str, Any]:
    data: dict[str, str] = {}
    for replica in plan.get("replicas") or []:
        data.setdefault(plan_key(worker_shape(replica)), worker_plan(body, spec, replica, plan).to_json())
    data["plan.json"] = json.dumps(dict(plan), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(body, config_map_name(body["metadata"]["name"])),
        "data": data,
    }


# ------------------------------------------------------------------------------ the workloads


def _model_argument(spec: LLMDeploymentSpec) -> str:
    if spec.model.volume and not spec.model.id.startswith("/"):
        return f"{MODEL_DIR}/{spec.model.id}"
    return spec.model.id


def _gpu_count(replica: Mapping[str, Any] | None, plan: Mapping[str, Any], spec: LLMDeploymentSpec) -> int:
    if replica is not None:
        return max(1, len(replica.get("gpus") or []))
    autoscaling = (plan.get("unscheduled") or {}).get("autoscaling") or {}
    return max(1, int(autoscaling.get("gpuCount") or spec.placement.gpusPerReplica or 1))


def _affinity(replica: Mapping[str, Any] | None, plan: Mapping[str, Any]) -> dict[str, Any]:
    if replica is not None:
        expressions = [{"key": HOSTNAME_LABEL, "operator": "In", "values": [replica["node"]]}]
    else:
        autoscaling = (plan.get("unscheduled") or {}).get("autoscaling") or {}
        # The planner's NodeSelectorRequirements: GPU memory (and count) a node group must offer.
        expressions = [dict(r) for r in autoscaling.get("nodeAffinity") or []]
        mib = autoscaling.get("minGpuMemoryMiB")
        if mib and not any(r.get("key") == GPU_MEMORY_LABEL for r in expressions):
            # Gt is strict: a GPU of exactly minGpuMemoryMiB fits.
            expressions.append({"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(int(mib) - 1)]})
        if not expressions:
            expressions.append({"key": GPU_MEMORY_LABEL, "operator": "Exists"})
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]
            }
        }
    }


def is_dra(plan: Mapping[str, Any]) -> bool:
    """Whether the plan was made from DRA ResourceSlices (its pods claim GPUs by ResourceClaim)."""
    return plan.get("resourceAPI") == "dra"


def _resources(
    spec: LLMDeploymentSpec, replica: Mapping[str, Any] | None, plan: Mapping[str, Any],
    volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    """GPUs from the plan (device-plugin mode; in DRA mode the pod's claim holds them); memory (limit =
    request), CPU and ephemeral storage unless the spec sets them."""
    user = spec.worker.resources or {}
    requests = {k: str(v) for k, v in (user.get("requests") or {}).items()}
    limits = {k: str(v) for k, v in (user.get("limits") or {}).items()}
    if not is_dra(plan):
        gpus = str(_gpu_count(replica, plan, spec))
        # nvidia.com/gpu, or the MIG device resource the planner chose (nvidia.com/mig-1g.10gb, ...).
        resource = str((replica or {}).get("resource") or GPU_RESOURCE)
        requests[resource] = gpus
        limits[resource] = gpus
    # CPU-offloaded layers live in the pod's memory: ask the scheduler for it, and no more.
    cpu_budget = int(((replica or {}).get("maxMemory") or {}).get("cpu") or 0)
    # The emptyDirs' size limits: what the kubelet must find free on the node's disk.
    scratch = sum(_parse_mebibytes(v["emptyDir"]["sizeLimit"]) for v in volumes if "emptyDir" in v)
    defaults = {
        "memory": _mebibytes(WORKER_MEMORY + cpu_budget),
        "cpu": WORKER_CPU,
        "ephemeral-storage": _mebibytes(scratch),
    }
    for key, value in defaults.items():
        # A limit the spec sets without a request is the request too (as Kubernetes defaults it).
        requests.setdefault(key, limits.get(key, value))
    limits.setdefault("memory", requests["memory"])  # memory is limited; CPU is not (no throttling)
    return {"requests": requests, "limits": limits}


def _mebibytes(nbytes: int | float) -> str:
    """A Kubernetes quantity in whole MiB, rounded up."""
    return f"{max(1, -(-int(nbytes) // MiB))}Mi"


def _parse_mebibytes(quantity: str) -> int:
    return int(quantity.removesuffix("Mi")) * MiB


def checkpoint_bytes(spec: LLMDeploymentSpec, plan: Mapping[str, Any]) -> int:
    """Disk the Hugging Face cache needs for the model's checkpoint, as the planner sized it
    (``plan.host``, ``kubevram.planner.host``); for a plan written before it said so, the parameters at
    the config's dtype."""
    host = plan.get("host") or {}
    if "checkpointBytes" in host:
        return int(host["checkpointBytes"])
    config = spec.model.config or {}
    dtype = config.get("torch_dtype") or config.get("dtype")
    return unquantized_checkpoint_bytes(int((plan.get("estimate") or {}).get("parameters") or 0),
                                        str(dtype) if dtype else None)


def _volumes(
    body: Mapping[str, Any],
    spec: LLMDeploymentSpec,
    plan: Mapping[str, Any],
    replica: Mapping[str, Any] | None,
    key: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the worker's mounts: the root filesystem is read-only, so every path the
    worker writes is an emptyDir with a size limit; weights never land in the container's layer."""
    cache = CACHE_HEADROOM + (0 if spec.model.volume else checkpoint_bytes(spec, plan))
    volumes: list[dict[str, Any]] = [
        {
            "name": "plan",
            "configMap": {
                "name": config_map_name(body["metadata"]["name"]),
                "items": [{"key": key, "path": key}],
            },
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": _mebibytes(TMP_BYTES)}},
        {"name": "model-cache", "emptyDir": {"sizeLimit": _mebibytes(cache)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "plan", "mountPath": PLAN_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": TMP_DIR},
        {"name": "model-cache", "mountPath": HOME_DIR},
    ]
    if spec.model.volume:
        volumes.append({"name": "model", **spec.model.volume})
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
    if worker_plan(body, spec, replica, plan).offloadFolder:
        disk = int(((replica or {}).get("maxMemory") or {}).get("disk") or 0)
        volumes.append({"name": "offload", "emptyDir": {"sizeLimit": _mebibytes(disk + CACHE_HEADROOM)}})
        mounts.append({"name": "offload", "mountPath": OFFLOAD_DIR})
    return volumes, mounts


def pod_security_context() -> dict[str, Any]:
    """The pod's: what PodSecurity ``restricted`` requires, as the image's own non-root user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """The worker container's: no privilege escalation, no capability, read-only root filesystem."""
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env(body: Mapping[str, Any], spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    name = body["metadata"]["name"]
    env: list[dict[str, Any]] = [
        {
            "name": "KUBEVRAM_ADMIN_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret_name(name), "key": TOKEN_KEY}},
        },
        {"name": "KUBEVRAM_DEPLOYMENT", "value": name},
        {"name": "KUBEVRAM_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBEVRAM_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KUBEVRAM_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        # The writable home (the model-cache volume), whatever user or HOME a custom image has.
        {"name": "HOME", "value": HOME_DIR},
        {"name": "HF_HOME", "value": HF_HOME},
    ]
    if spec.model.volume:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    names = {e["name"] for e in spec.worker.env if isinstance(e, dict)}
    return [e for e in env if e["name"] not in names] + [dict(e) for e in spec.worker.env]


def _pod_template(
    body: Mapping[str, Any],
    spec: LLMDeploymentSpec,
    plan: Mapping[str, Any],
    replica: Mapping[str, Any] | None,
    *,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    affinity: Mapping[str, Any],
    image: str,
    dra_driver: str = DRIVER,
    claimed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A worker pod: the single-node replica's, the group leader's and the group workers' alike (the
    same container, probes, security contexts and volumes; a group's pods add the rendezvous port). In DRA
    mode it claims ``claimed`` (one of ``claimed_devices(replica)``; the replica's own devices by default)."""
    name = body["metadata"]["name"]
    key = plan_key(worker_shape(replica))
    volumes, mounts = _volumes(body, spec, plan, replica, key)
    ports = [
        {"name": "http", "containerPort": API_PORT, "protocol": "TCP"},
        {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
    ]
    if replica is not None and replica.get("group"):
        ports.append({"name": "group", "containerPort": GROUP_PORT, "protocol": "TCP"})
    container = {
        "name": "worker",
        "image": image,
        "command": ["kubevram"],
        "args": [
            "worker",
            "--model",
            _model_argument(spec),
            "--plan",
            f"{PLAN_DIR}/{key}",
            "--port",
            str(API_PORT),
            "--admin-port",
            str(ADMIN_PORT),
        ],
        "ports": ports,
        "env": _env(body, spec),
        "resources": _resources(spec, replica, plan, volumes),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 60,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(name),
        "securityContext": pod_security_context(),
        "affinity": dict(affinity),
        "tolerations": tolerations(spec),
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
    }
    if spec.placement.nodeSelector:
        pod_spec["nodeSelector"] = dict(spec.placement.nodeSelector)
    if is_dra(plan) and replica is not None:
        template = claim_template(body, spec, plan, replica, dra_driver, claimed)
        resources: dict[str, Any] = container["resources"]  # type: ignore[assignment]
        pod_spec["resourceClaims"], resources["claims"] = claims.pod_claim(template)
    return {
        "metadata": {
            "labels": {"app.kubernetes.io/name": "kubevram-worker", **labels, LABEL_ENGINE_TYPE: ENGINE_TYPE},
            "annotations": dict(annotations),
        },
        "spec": pod_spec,
    }


def render_workload(
    body: Mapping[str, Any],
    spec: LLMDeploymentSpec,
    plan: Mapping[str, Any],
    *,
    shape: str,
    replica: Mapping[str, Any] | None,
    count: int,
    image: str,
    dra_driver: str = DRIVER,
) -> dict[str, Any]:
    """One Deployment: ``count`` replicas alike (``replica`` None: the pending ones)."""
    name = body["metadata"]["name"]
    labels = {**selector_labels(name), LABEL_SHAPE: shape}
    annotations = {
        RESERVATION: json.dumps(reservation(replica, spec.placement.sharing), sort_keys=True),
        PLAN_HASH: _digest(worker_plan(body, spec, replica, plan).model_dump(mode="json")),
    }
    template = _pod_template(
        body, spec, plan, replica, labels=labels, annotations=annotations,
        affinity=_affinity(replica, plan), image=image, dra_driver=dra_driver,
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(body, f"{_base_name(name)}-{shape}", **{LABEL_SHAPE: shape}),
        "spec": {
            "replicas": count,
            "selector": {"matchLabels": labels},
            # Pinned GPUs leave no room to surge: replace pods one at a time.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": template,
        },
    }


def _on_nodes(nodes: list[str]) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": HOSTNAME_LABEL, "operator": "In", "values": nodes}
                ]}]
            }
        }
    }


def render_leader_worker_set(
    body: Mapping[str, Any],
    spec: LLMDeploymentSpec,
    plan: Mapping[str, Any],
    *,
    shape: str,
    replica: Mapping[str, Any],
    count: int,
    image: str,
    dra_driver: str = DRIVER,
) -> dict[str, Any]:
    """One LeaderWorkerSet: ``count`` groups alike of ``size`` pods, one per node of the plan (the leader,
    LWS_WORKER_INDEX 0, on the group's first node and serving the OpenAI API; the workers on the others,
    never two on one node). ``RecreateGroupOnPodRestart``: a pod that fails takes its group down and up
    again, since no rank can go on without the others. Each pod template carries what its pods reserve and,
    in DRA mode, claims its pods' GPUs (``claimed_devices``: the workers' template the largest budget of any
    worker pod at each GPU index)."""
    name = body["metadata"]["name"]
    sharing = str(spec.placement.sharing)
    pods = group_pods(replica)
    labels = {**selector_labels(name), LABEL_SHAPE: shape}
    plan_hash = _digest(worker_plan(body, spec, replica, plan).model_dump(mode="json"))

    leader_claims, worker_claims = claimed_devices(replica)

    def template(
        role: str, nodes: list[str], held: dict[str, Any], claimed: Mapping[str, Any]
    ) -> dict[str, Any]:
        affinity = _on_nodes(nodes)
        if role == "worker":  # one pod per node: the leader has its own node, the workers one each
            affinity["podAntiAffinity"] = {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": dict(labels)}, "topologyKey": HOSTNAME_LABEL}
                ]
            }
        annotations = {RESERVATION: json.dumps(held, sort_keys=True), PLAN_HASH: plan_hash}
        return _pod_template(body, spec, plan, replica, labels=labels, annotations=annotations,
                             affinity=affinity, image=image, dra_driver=dra_driver, claimed=claimed)

    leader = template("leader", [str(pods[0]["node"])], reservation(pods[0], sharing), leader_claims)
    workers = group_reservation(replica, sharing, slice(1, None))
    worker = template("worker", [str(p["node"]) for p in pods[1:]], workers, worker_claims)
    meta = _metadata(body, f"{_base_name(name)}-{shape}", **{LABEL_SHAPE: shape})
    meta["annotations"] = {RESERVATION: json.dumps(group_reservation(replica, sharing), sort_keys=True)}
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": LWS_KIND,
        "metadata": meta,
        "spec": {
            "replicas": count,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "leaderWorkerTemplate": {
                "size": len(pods),
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": leader,
                "workerTemplate": worker,
            },
        },
    }


def tolerations(spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    """The GPU taint's toleration (what the ExtendedResourceToleration admission plugin would add),
    then the spec's, each once."""
    out = [dict(GPU_TOLERATION)]
    for toleration in spec.placement.tolerations:
        item = toleration.model_dump(exclude_none=True)
        if item not in out:
            out.append(item)
    return out


def render_placeholder(
    body: Mapping[str, Any],
    spec: LLMDeploymentSpec,
    plan: Mapping[str, Any],
    *,
    count: int,
    image: str = PAUSE_IMAGE,
    priority_class: str = PLACEHOLDER_PRIORITY_CLASS,
    dra_driver: str = DRIVER,
) -> dict[str, Any]:
    """``<name>-placeholder``: ``count`` pause pods asking what a node must offer the pending replicas.

    The cluster autoscaler's overprovisioning pattern: a negative PriorityClass, so any real pod
    preempts them (kube-scheduler evicts a placeholder rather than leave a worker pending), and the
    requests of one replica: its GPUs, ``nvidia.com/gpu.memory Gt`` the per-GPU need (and
    ``nvidia.com/gpu.count``, ``nvidia.com/gpu.replicas`` for shared replicas, the spec's node
    selector), and the CPU, memory and ephemeral storage a worker asks for. A node that can run it
    is a node the planner can place the replica on; when it joins, the replica is placed there and
    the placeholder goes. In DRA mode the GPUs are a claim instead (``claims.pending_requests``), which
    the autoscaler satisfies from a node group whose template lists such devices. For groups
    (``nodeCount`` > 1 pods a replica, one per node) no two placeholder pods share a node, so that the
    autoscaler adds as many nodes as a group has pods (several pending groups ask one node per pod).
    """
    name = body["metadata"]["name"]
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_PLACEHOLDER: name, LABEL_SHAPE: PLACEHOLDER}
    # The worker's own requests (GPUs, CPU, memory, its scratch volumes' disk), and its memory limit.
    volumes, _ = _volumes(body, spec, plan, None, plan_key(PENDING))
    resources = _resources(spec, None, plan, volumes)
    pod_spec: dict[str, Any] = {
        "priorityClassName": priority_class,
        "affinity": _affinity(None, plan),
        "tolerations": tolerations(spec),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 0,
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": "pause",
                "image": image,
                "resources": resources,
                "securityContext": container_security_context(),
            }
        ],
    }
    if spec.placement.nodeSelector:
        pod_spec["nodeSelector"] = dict(spec.placement.nodeSelector)
    if int(((plan.get("unscheduled") or {}).get("autoscaling") or {}).get("nodeCount") or 1) > 1:
        pod_spec["affinity"]["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": dict(labels)}, "topologyKey": HOSTNAME_LABEL}
            ]
        }
    if is_dra(plan):
        # GFD labels are no promise on a DRA node: the claim says what it needs.
        del pod_spec["affinity"]["nodeAffinity"]
        if not pod_spec["affinity"]:
            del pod_spec["affinity"]
        template = pending_claim_template(body, spec, plan, dra_driver)
        pause = pod_spec["containers"][0]
        pod_spec["resourceClaims"], pause["resources"]["claims"] = claims.pod_claim(template)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(body, f"{_base_name(name)}-{PLACEHOLDER}", **{LABEL_SHAPE: PLACEHOLDER}),
        "spec": {
            "replicas": count,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": {"app.kubernetes.io/name": "kubevram-placeholder", **labels}},
                         "spec": pod_spec},
        },
    }


def render_workloads(
    body: Mapping[str, Any],
    spec: LLMDeploymentSpec,
    plan: Mapping[str, Any],
    *,
    image: str,
    placeholder_image: str = PAUSE_IMAGE,
    priority_class: str = PLACEHOLDER_PRIORITY_CLASS,
    dra_driver: str = DRIVER,
) -> list[dict[str, Any]]:
    """One Deployment per placement shape (a LeaderWorkerSet for a multi-node one), plus
    ``<name>-placeholder`` when replicas are unscheduled."""
    out = [
        render_leader_worker_set(
            body, spec, plan, shape=shape, replica=replicas[0], count=len(replicas), image=image,
            dra_driver=dra_driver,
        )
        if replicas[0].get("group")
        else render_workload(
            body, spec, plan, shape=shape, replica=replicas[0], count=len(replicas), image=image,
            dra_driver=dra_driver,
        )
        for shape, replicas in group_replicas(plan)
    ]
    unscheduled = plan.get("unscheduled") or {}
    pending = int(unscheduled.get("count") or 0)
    signal = unscheduled.get("autoscaling") or {}
    if pending and unscheduled.get("code") != LWS_UNAVAILABLE:
        # a multi-node replica waits for nodeCount nodes: one placeholder pod asks for each
        count = pending * max(1, int(signal.get("nodeCount") or 1))
        out.append(render_placeholder(
            body, spec, plan, count=count, image=placeholder_image, priority_class=priority_class,
            dra_driver=dra_driver,
        ))
    return out


def claimed_devices(replica: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """What each pod template of a replica's workload claims (DRA mode), in ``claims.replica_requests``'
    form: the replica's own devices, or a group's leader's and then its worker pods'."""
    if not replica.get("group"):
        return [replica]
    size = len(group_pods(replica))
    return [claims.group_claim(replica, [0]), claims.group_claim(replica, range(1, size))]


def claim_template(
    body: Mapping[str, Any], spec: LLMDeploymentSpec, plan: Mapping[str, Any], replica: Mapping[str, Any],
    driver: str = DRIVER, claimed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ResourceClaimTemplate of one placement shape's pods (DRA mode): of the pods that claim
    ``claimed`` (one of ``claimed_devices(replica)``; the replica's own devices by default)."""
    name = body["metadata"]["name"]
    return claims.claim_template(
        _metadata(body, "", **{LABEL_SHAPE: placement_shape(replica)}), _base_name(name),
        claims.replica_requests(replica if claimed is None else claimed, driver), selector_labels(name),
    )


def pending_claim_template(
    body: Mapping[str, Any], spec: LLMDeploymentSpec, plan: Mapping[str, Any], driver: str = DRIVER
) -> dict[str, Any]:
    """The ResourceClaimTemplate of the placeholders of pending replicas (DRA mode); its claims carry no
    ``llm.kubevram.io/deployment`` label, like the placeholders: they hold no planned capacity."""
    name = body["metadata"]["name"]
    return claims.claim_template(
        _metadata(body, "", **{LABEL_SHAPE: PLACEHOLDER}), f"{_base_name(name)}-{PENDING}",
        claims.pending_requests(spec, plan, driver), {LABEL_MANAGED_BY: MANAGED_BY, LABEL_PLACEHOLDER: name},
    )


def render_claim_templates(
    body: Mapping[str, Any], spec: LLMDeploymentSpec, plan: Mapping[str, Any], driver: str = DRIVER
) -> list[dict[str, Any]]:
    """Every ResourceClaimTemplate the workloads name (none in device-plugin mode): one per placement shape,
    and a group's leader and workers each theirs (once where they claim alike)."""
    if not is_dra(plan):
        return []
    out: list[dict[str, Any]] = []
    for _, replicas in group_replicas(plan):
        made = (claim_template(body, spec, plan, replicas[0], driver, c)
                for c in claimed_devices(replicas[0]))
        out += {t["metadata"]["name"]: t for t in made}.values()
    if int((plan.get("unscheduled") or {}).get("count") or 0):
        out.append(pending_claim_template(body, spec, plan, driver))
    return out


def has_groups(plan: Mapping[str, Any]) -> bool:
    """Whether the plan runs replicas as groups of pods (LeaderWorkerSets)."""
    return any(r.get("group") for r in plan.get("replicas") or [])


# ---------------------------------------------------------------------- service, RBAC, secret


def render_service(body: Mapping[str, Any], plan: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Port 8000 of the pods that serve the API: every worker, or a group's leader only."""
    name = body["metadata"]["name"]
    selector = selector_labels(name)
    if plan is not None and has_groups(plan):
        selector[LWS_WORKER_INDEX] = "0"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(body, _base_name(name)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": API_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_service_account(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(body, service_account_name(body["metadata"]["name"])),
    }


def render_role(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the workers may do: read and patch this LLMDeployment's status, and nothing else."""
    name = body["metadata"]["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(body, service_account_name(name)),
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def render_role_binding(body: Mapping[str, Any]) -> dict[str, Any]:
    """Binds the workers' ServiceAccount to their Role (both named ``<name>-worker``)."""
    name = service_account_name(body["metadata"]["name"])
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(body, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": name,
                "namespace": body["metadata"].get("namespace") or "default",
            }
        ],
    }


def render_network_policy(
    body: Mapping[str, Any],
    operator_namespace: str = "",
    operator_labels: Mapping[str, str] | None = None,
    groups: bool = False,
) -> dict[str, Any]:
    """Ingress to the workers: anyone may reach the API port, only the operator's pods the admin port;
    with multi-node groups (``groups``), the deployment's own pods every port of each other (the
    rendezvous port, then the ports NCCL and gloo open between ranks).

    Without the operator's namespace and pod labels (an operator run outside the cluster) no rule opens
    the admin port. Egress stays open: workers download weights and patch their status.
    """
    name = body["metadata"]["name"]
    ingress: list[dict[str, Any]] = [{"ports": [{"protocol": "TCP", "port": API_PORT}]}]
    if groups:
        ingress.append({"from": [{"podSelector": {"matchLabels": selector_labels(name)}}]})
    if operator_namespace and operator_labels:
        ingress.append(
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: operator_namespace}},
                        "podSelector": {"matchLabels": dict(operator_labels)},
                    }
                ],
                "ports": [{"protocol": "TCP", "port": ADMIN_PORT}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(body, service_account_name(name)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def render_secret(body: Mapping[str, Any], token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(body, secret_name(body["metadata"]["name"])),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


def render_children(
    body: Mapping[str, Any],
    spec: LLMDeploymentSpec,
    plan: Mapping[str, Any],
    *,
    image: str,
    operator_namespace: str = "",
    operator_labels: Mapping[str, str] | None = None,
    placeholder_image: str = PAUSE_IMAGE,
    priority_class: str = PLACEHOLDER_PRIORITY_CLASS,
    dra_driver: str = DRIVER,
) -> list[dict[str, Any]]:
    """Every child but the Secret (which is created once, with a random token, by the caller) and the
    InferencePool (which the caller makes where the cluster serves that API)."""
    return [
        render_service_account(body),
        render_role(body),
        render_role_binding(body),
        render_config_map(body, spec, plan),
        render_service(body, plan),
        render_network_policy(body, operator_namespace, operator_labels, has_groups(plan)),
        *render_claim_templates(body, spec, plan, dra_driver),
        *render_workloads(
            body, spec, plan, image=image, placeholder_image=placeholder_image, priority_class=priority_class,
            dra_driver=dra_driver,
        ),
    ]


def render_inference_pool(body: Mapping[str, Any], spec: LLMDeploymentSpec) -> dict[str, Any]:
    """``InferencePool`` ``<name>`` (inference.networking.k8s.io/v1): the deployment's worker pods (not the
    placeholders) on the API port, routed by the Endpoint Picker ``spec.serving.inferencePool`` names."""
    name = body["metadata"]["name"]
    ref = spec.serving.inferencePool.endpointPickerRef
    return {
        "apiVersion": INFERENCE_POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": _metadata(body, _base_name(name)),
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "targetPorts": [{"number": API_PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": ref.name or f"{_base_name(name)}-epp",
                "port": {"number": ref.port},
                "failureMode": str(ref.failureMode),
            },
        },
    }


INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"
