"""What a worker pod asks of its node besides GPUs: host memory and disk (ephemeral storage).

The worker's root filesystem is read-only (PodSecurity ``restricted``), so everything it writes goes to
emptyDirs with a size limit, and the pod requests their sum as ephemeral storage: ``/tmp``
(``TMP_BYTES``), its home with the Hugging Face cache where the checkpoint is downloaded
(``CACHE_HEADROOM`` plus the checkpoint, unless ``spec.model.volume`` holds the weights) and, with disk
offload, the offload folder. Its memory request (limit = request) is ``WORKER_MEMORY`` plus the layers
offloaded to CPU memory. ``spec.worker.resources`` overrides either; a limit set without a request is
the request, as Kubernetes defaults it.

kube-scheduler runs a pod only on a node whose allocatable memory and ephemeral-storage cover its
requests, so the planner places a replica only where they do (``refusal``): a node with a 100 GB root
volume never runs the worker of a 70B model that downloads a 141 GB checkpoint, however much VRAM it
has. What other pods request on the node is not counted: kube-scheduler still has the last word there,
and the operator re-plans a replica whose pods stay unschedulable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.api.quantity import GiB, format_bytes, parse_memory
from kubevram.api.v1alpha1 import LLMDeploymentSpec
from kubevram.planner.estimate import Estimate
from kubevram.planner.facts import ModelFacts

TMP_BYTES = 2 * GiB  # /tmp: tokenizer and torch temporary files
CACHE_HEADROOM = 2 * GiB  # config, tokenizer, CUDA's and Triton's kernel caches beside the weights
CHECKPOINT_SLACK = 1.05  # a checkpoint's files hold a little more than its tensors
# Host memory of a worker besides CPU-offloaded layers: Python, torch, the CUDA context's host side and
# the safetensors shard being read.
WORKER_MEMORY = 4 * GiB
# Bytes per parameter of a checkpoint that is not pre-quantized, by the config's dtype (bf16 when unsaid).
_CHECKPOINT_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def checkpoint_bytes(facts: ModelFacts, est: Estimate) -> int:
    """Disk the checkpoint takes in the Hugging Face cache: a pre-quantized one (``quantization_config``)
    as its weights are stored, which is how they load; any other at the config's dtype, whatever
    precision the worker loads it in (bitsandbytes quantizes a bfloat16 checkpoint as it loads)."""
    if facts.quantization is not None:
        return int(est.weightsBytes * CHECKPOINT_SLACK)
    return unquantized_checkpoint_bytes(est.parameters, facts.config_dtype)


def unquantized_checkpoint_bytes(parameters: int, dtype: str | None) -> int:
    """A checkpoint of ``parameters`` stored at ``dtype`` (the config's; bfloat16 when unsaid)."""
    return int(parameters * _CHECKPOINT_DTYPE_BYTES.get(dtype or "bfloat16", 2) * CHECKPOINT_SLACK)


@dataclass(frozen=True)
class HostNeed:
    """What one worker pod requests of its node before any offload (bytes)."""

    memory_bytes: int  # its memory request; CPU-offloaded layers come on top unless the spec sets it
    disk_bytes: int  # its ephemeral-storage request: the emptyDirs' size limits (no offload folder)
    checkpoint_bytes: int  # the part of it the checkpoint takes (0 when spec.model.volume holds it)
    memory_set: bool = False  # the spec sets the memory request: offloaded layers must fit in it
    disk_set: bool = False  # the spec sets the ephemeral-storage request

    def to_json(self) -> dict[str, Any]:
        return {"memoryBytes": self.memory_bytes, "diskBytes": self.disk_bytes,
                "checkpointBytes": self.checkpoint_bytes}


def spec_request(spec: LLMDeploymentSpec, resource: str) -> int | None:
    """The request ``spec.worker.resources`` sets for ``resource`` (its limit when only that is set)."""
    resources = spec.worker.resources or {}
    for kind in ("requests", "limits"):
        value = (resources.get(kind) or {}).get(resource)
        if value is not None:
            try:
                return parse_memory(value)
            except ValueError as exc:
                raise SpecError(f"spec.worker.resources.{kind}.{resource}", str(exc)) from exc
    return None


def host_need(spec: LLMDeploymentSpec, facts: ModelFacts, est: Estimate) -> HostNeed:
    """The pod's memory and ephemeral-storage requests, as ``kubevram.controller.render`` writes them."""
    checkpoint = 0 if spec.model.volume else checkpoint_bytes(facts, est)
    memory, disk = spec_request(spec, "memory"), spec_request(spec, "ephemeral-storage")
    return HostNeed(
        memory_bytes=WORKER_MEMORY if memory is None else memory,
        disk_bytes=TMP_BYTES + CACHE_HEADROOM + checkpoint if disk is None else disk,
        checkpoint_bytes=checkpoint,
        memory_set=memory is not None,
        disk_set=disk is not None,
    )


def refusal(memory_bytes: int, disk_bytes: int, need: HostNeed) -> str:
    """Why a node with this allocatable memory and ephemeral-storage (0: not known) cannot run the pod,
    or ''."""
    if disk_bytes and need.disk_bytes > disk_bytes:
        if need.checkpoint_bytes and not need.disk_set:
            why = f", {format_bytes(need.checkpoint_bytes)} of it the checkpoint (or use spec.model.volume)"
        else:
            why = " (spec.worker.resources)"
        return (f"ephemeral-storage {format_bytes(disk_bytes)} < {format_bytes(need.disk_bytes)} the worker "
                f"writes{why}")
    if memory_bytes and need.memory_bytes > memory_bytes:
        return (f"memory {format_bytes(memory_bytes)} < {format_bytes(need.memory_bytes)} the worker asks "
                "(spec.worker.resources)")
    return ""


def offload_room(memory_bytes: int, disk_bytes: int, need: HostNeed) -> tuple[int, int]:
    """(CPU memory, disk) that offloaded layers may take on a node with this allocatable memory and
    ephemeral-storage (0: not known), once the worker has its own: the layers share the pod's memory
    with the worker (within the spec's request when it sets one) and the offload folder needs its own
    ``CACHE_HEADROOM`` beside the other volumes. 0 means not bounded; a bounded node with no room left
    gives 1 byte, which nothing fits in."""
    bounds = [b for b in (memory_bytes, need.memory_bytes if need.memory_set else 0) if b]
    cpu = max(1, min(bounds) - WORKER_MEMORY) if bounds else 0
    disk = max(1, disk_bytes - need.disk_bytes - CACHE_HEADROOM) if disk_bytes else 0
    return cpu, disk


__all__ = [
    "CACHE_HEADROOM",
    "CHECKPOINT_SLACK",
    "TMP_BYTES",
    "WORKER_MEMORY",
    "HostNeed",
    "checkpoint_bytes",
    "host_need",
    "offload_room",
    "refusal",
    "spec_request",
    "unquantized_checkpoint_bytes",
]
