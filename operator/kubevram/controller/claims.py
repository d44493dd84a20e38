"""Pure rendering of DRA mode: the ResourceClaimTemplates a plan's worker pods claim their GPUs with.

In DRA mode (``spec.placement.resourceAPI``, ``resource.k8s.io/v1``) a worker pod asks for no
``nvidia.com/gpu``: it names one ResourceClaimTemplate, and kube-scheduler allocates, for the pod's claim,
devices the template's requests select. One template per placement shape (the replicas alike), and for a
multi-node group (a LeaderWorkerSet) one for its leader pod and one for its worker pods (``group_claim``):

* one request per GPU of the replica, ``gpu-<i>`` for the pod's own GPU index ``i`` (one request with
  ``count`` when every GPU has the same budget), of the DeviceClass the planner's devices came from
  (``gpu.nvidia.com`` for whole GPUs, ``mig.nvidia.com`` for MIG devices);
* a CEL selector ``device.capacity["<driver>"].memory.compareTo(quantity("<bytes>")) >= 0``: a device with
  at least that GPU's planned budget (its per-GPU total: weights, KV cache, activations, CUDA context,
  headroom), and the product the plan chose (``productName``, the node's GPUs), so every device the
  scheduler may pick can serve any of the pod's GPU indices;
* on a shareable device (``allowMultipleAllocations``, consumable capacity) ``capacity.requests.memory`` of
  exactly the planned slice: kube-scheduler keeps the slices of all claims within the device's memory.

The pods stay pinned to the planned node, so the scheduler chooses among that node's devices and the
placement ledger's accounting (devices held whole, slices held) stays true per node.

Replicas that fit nowhere get ``<name>-pending-<digest>``: ``count`` GPUs with at least the per-GPU need
(and the product, when ``spec.placement.nodeSelector`` pins ``nvidia.com/gpu.product``), which the cluster
autoscaler can satisfy from a node group whose template lists such devices (a pending group: one such
placeholder pod per node of the group, ``render.render_placeholder``).

Template specs are immutable in the API: a template is named after a digest of its spec, created once, and
deleted when no workload names it any more.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from kubevram.api.quantity import MiB
from kubevram.api.v1alpha1 import LLMDeploymentSpec
from kubevram.planner.dra import DRIVER, GPU_CLASS

API_VERSION = "resource.k8s.io/v1"
KIND = "ResourceClaimTemplate"
#: The name of the claim in the worker pod (``spec.resourceClaims[].name``, ``resources.claims[].name``).
POD_CLAIM = "gpus"
LABEL_PRODUCT = "nvidia.com/gpu.product"


def memory_selector(nbytes: int, driver: str = DRIVER) -> dict[str, Any]:
    """A device with at least ``nbytes`` of memory (Kubernetes' quantity CEL library)."""
    return {
        "cel": {"expression": f'device.capacity["{driver}"].memory.compareTo(quantity("{int(nbytes)}")) >= 0'}
    }


def product_selector(product: str, driver: str = DRIVER) -> dict[str, Any]:
    """A device of this productName, as the driver publishes it (``NVIDIA A100-SXM4-80GB``)."""
    return {
        "cel": {"expression": f"device.attributes[{json.dumps(driver)}].productName == {json.dumps(product)}"}
    }


def gfd_product_selector(label: str, driver: str = DRIVER) -> dict[str, Any]:
    """A device whose productName is GPU Feature Discovery's ``nvidia.com/gpu.product`` label value (GFD
    writes the name with its spaces as dashes)."""
    expression = (
        f'device.attributes[{json.dumps(driver)}].productName.replace(" ", "-") == {json.dumps(label)}'
    )
    return {"cel": {"expression": expression}}


def _request(
    name: str,
    device_class: str,
    selectors: list[dict[str, Any]],
    count: int = 1,
    slice_bytes: int | None = None,
) -> dict[str, Any]:
    exactly: dict[str, Any] = {
        "deviceClassName": device_class,
        "allocationMode": "ExactCount",
        "count": count,
        "selectors": selectors,
    }
    if slice_bytes is not None:
        exactly["capacity"] = {"requests": {"memory": str(int(slice_bytes))}}
    return {"name": name, "exactly": exactly}


def replica_requests(replica: Mapping[str, Any], driver: str = DRIVER) -> list[dict[str, Any]]:
    """The device requests of one placed replica (plan JSON): one per pod GPU index, or one with ``count``."""
    gpus = [int(g) for g in replica.get("gpus") or []]
    per_gpu = list(replica.get("perGpu") or [])
    budgets = replica.get("maxMemory") or {}
    reservation = {int(k): int(v) for k, v in (replica.get("reservation") or {}).items()}
    sliced = replica.get("deviceKind") == "timeslice"
    device_class = str(replica.get("resource") or GPU_CLASS)
    product = str(replica.get("gpuProduct") or "")
    wanted: list[tuple[int, int | None]] = []  # (memory the device must have, slice it takes)
    for pod_index, node_index in enumerate(gpus):
        total = int(per_gpu[pod_index].get("total") or 0) if pod_index < len(per_gpu) else 0
        need = total or int(budgets.get(str(pod_index)) or 0)
        if sliced:
            piece = reservation.get(node_index, need)
            wanted.append((piece, piece))
        else:
            wanted.append((need, None))

    def selectors(nbytes: int) -> list[dict[str, Any]]:
        return [memory_selector(nbytes, driver), *([product_selector(product, driver)] if product else [])]

    if len(wanted) > 1 and len(set(wanted)) == 1:
        need, share = wanted[0]
        return [_request("gpus", device_class, selectors(need), count=len(wanted), slice_bytes=share)]
    return [
        _request(f"gpu-{i}", device_class, selectors(nbytes), slice_bytes=piece)
        for i, (nbytes, piece) in enumerate(wanted)
    ]


def group_claim(replica: Mapping[str, Any], pods: Sequence[int]) -> dict[str, Any]:
    """What pods ``pods`` of a multi-node replica claim alike, in the form ``replica_requests`` reads: the
    group's ``gpusPerPod`` whole devices, at each pod GPU index at least the largest budget of a rank of
    those pods there (a LeaderWorkerSet has one worker template for every worker pod, and the stages
    differ: the first holds the embeddings, the last the head), of the product their nodes share (none
    pinned where they differ: the group's devices have one memory size)."""
    group = replica["group"]
    per_pod = int(group["gpusPerPod"])
    ranks = [r for r in group["ranks"] if int(r["pod"]) in pods]
    products = {str(group["pods"][p].get("gpuProduct") or "") for p in pods}
    return {
        "gpus": list(range(per_pod)),
        "perGpu": [
            {"total": max(int(r["total"]) for r in ranks if int(r["gpu"]) == i)} for i in range(per_pod)
        ],
        "resource": replica.get("resource"),
        "deviceKind": replica.get("deviceKind"),
        "gpuProduct": products.pop() if len(products) == 1 else "",
    }


def pending_requests(
    spec: LLMDeploymentSpec, plan: Mapping[str, Any], driver: str = DRIVER
) -> list[dict[str, Any]]:
    """What one pending replica asks of a new node: ``gpuCount`` GPUs with ``minGpuMemoryMiB`` each (and the
    product the spec pins); shared replicas ask for that much of a shareable GPU."""
    signal = (plan.get("unscheduled") or {}).get("autoscaling") or {}
    count = max(1, int(signal.get("gpuCount") or spec.placement.gpusPerReplica or 1))
    nbytes = int(signal.get("minGpuMemoryMiB") or 0) * MiB
    selectors = [memory_selector(nbytes, driver)]
    label = spec.placement.nodeSelector.get(LABEL_PRODUCT)
    if label:
        selectors.append(gfd_product_selector(label, driver))
    piece = nbytes if spec.placement.sharing == "shared" else None
    return [_request("gpus", GPU_CLASS, selectors, count=count, slice_bytes=piece)]


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def claim_template(
    metadata: Mapping[str, Any], prefix: str, requests: list[dict[str, Any]], claim_labels: Mapping[str, str]
) -> dict[str, Any]:
    """A ResourceClaimTemplate named ``<prefix>-<digest of its spec>``; ``metadata`` holds its namespace,
    labels and owner, ``claim_labels`` go on the claims made from it (so kubevram knows its own claims)."""
    spec = {"metadata": {"labels": dict(claim_labels)}, "spec": {"devices": {"requests": requests}}}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {**metadata, "name": f"{prefix}-{_digest(spec)}"},
        "spec": spec,
    }


def pod_claim(template: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(pod spec.resourceClaims, container resources.claims)`` naming ``template``."""
    name = template["metadata"]["name"]
    return [{"name": POD_CLAIM, "resourceClaimTemplateName": name}], [{"name": POD_CLAIM}]


__all__ = [
    "API_VERSION",
    "KIND",
    "POD_CLAIM",
    "claim_template",
    "gfd_product_selector",
    "group_claim",
    "memory_selector",
    "pending_requests",
    "pod_claim",
    "product_selector",
    "replica_requests",
]
