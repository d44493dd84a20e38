"""Builders of Node, Pod and LLMDeployment objects for the placement tests (imported by them)."""

from __future__ import annotations

import json
from typing import Any

from kubevram.api.v1alpha1 import LLMDeployment

MiB = 2**20
GiB = 2**30

A100_80 = ("NVIDIA-A100-SXM4-80GB", 81920)
H100_80 = ("NVIDIA-H100-80GB-HBM3", 81559)
L4 = ("NVIDIA-L4", 23034)
A10G = ("NVIDIA-A10G", 23028)
L40S = ("NVIDIA-L40S", 46068)


def gfd_node(
    name: str,
    gpu: tuple[str, int] = L4,
    count: int = 4,
    *,
    replicas: int = 1,
    allocatable: int | None = None,
    ready: bool = True,
    unschedulable: bool = False,
    taints: list[dict[str, str]] | None = None,
    labels: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
    memory: str = "512Gi",
    disk: str | None = "1Ti",
) -> dict[str, Any]:
    """A Node as `kubectl get nodes -o yaml` prints it, with GPU Feature Discovery labels (``disk``: its
    allocatable ephemeral-storage, None to leave it out)."""
    product, mib = gpu
    node_labels = {
        "kubernetes.io/hostname": name,
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": product + ("-SHARED" if replicas > 1 else ""),
        "nvidia.com/gpu.memory": str(mib),
        "nvidia.com/gpu.count": str(count),
        "nvidia.com/gpu.replicas": str(replicas),
        **(labels or {}),
    }
    if replicas > 1:
        node_labels["nvidia.com/gpu.sharing-strategy"] = "time-slicing"
    for key in drop:
        node_labels.pop(key, None)
    alloc = {
        "cpu": "64",
        "memory": memory,
        **({"ephemeral-storage": disk} if disk is not None else {}),
        "nvidia.com/gpu": str(count * replicas if allocatable is None else allocatable),
    }
    spec: dict[str, Any] = {}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": node_labels},
        "spec": spec,
        "status": {
            "allocatable": alloc,
            "capacity": dict(alloc),
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def kubevram_pod(
    name: str, deployment: str, node: str, gpus: dict[int, int], *, sharing: str = "exclusive",
    namespace: str = "default", phase: str = "Running", bound: bool = True,
) -> dict[str, Any]:
    """A worker pod carrying the operator's reservation annotation."""
    reservation = {"node": node, "gpus": {str(k): v for k, v in gpus.items()}, "sharing": sharing}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"llm.kubevram.io/deployment": deployment},
            "annotations": {"llm.kubevram.io/reservation": json.dumps(reservation)},
        },
        "spec": {"nodeName": node} if bound else {},
        "status": {"phase": phase},
    }


def other_pod(name: str, node: str, gpus: int, resource: str = "nvidia.com/gpu") -> dict[str, Any]:
    """A pod kubevram does not manage that requests GPUs."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "other"},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "resources": {"limits": {resource: str(gpus)}}}],
        },
        "status": {"phase": "Running"},
    }


def manifest(
    name: str,
    model: str = "Qwen/Qwen2-7B-Instruct",
    *,
    replicas: int = 1,
    namespace: str = "default",
    seq: int = 4096,
    batch: int = 1,
    weights: str = "bfloat16",
    config: dict[str, Any] | None = None,
    **placement: Any,
) -> dict[str, Any]:
    """An LLMDeployment as a user writes it (``config``: an inline config.json)."""
    return {
        "apiVersion": "llm.kubevram.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "model": {"id": model, **({"config": config} if config else {})},
            "precision": {"weights": weights},
            "serving": {"maxSequenceLength": seq, "maxBatchSize": batch},
            "placement": placement,
        },
    }


def deployment(name: str, model: str = "Qwen/Qwen2-7B-Instruct", **kwargs: Any) -> LLMDeployment:
    return LLMDeployment.model_validate(manifest(name, model, **kwargs))
