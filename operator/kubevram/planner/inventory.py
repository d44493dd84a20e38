"""GPU inventory from Node objects, as ``kubectl get nodes -o yaml`` prints them, minus what pods hold.

What a node offers is read from the labels NVIDIA GPU Feature Discovery (GFD, part of the
k8s-device-plugin project) writes and from the device plugin's allocatable resources:

=================================  =========================================================================
``nvidia.com/gpu.memory``          MiB per GPU (per MIG device when the ``single`` strategy serves MIG)
``nvidia.com/gpu.product``         e.g. ``NVIDIA-A100-SXM4-80GB``; ``-SHARED`` appended when GPUs are shared,
                                   ``-MIG-<profile>`` when the ``single`` strategy serves MIG devices
``nvidia.com/gpu.count``           GPUs (MIG devices under ``single`` with MIG on)
``nvidia.com/gpu.replicas``        pods one GPU is advertised to; ``1`` (or ``0``, MIG) is no sharing
``nvidia.com/gpu.sharing-strategy`` ``none``, ``time-slicing`` or ``mps``
``nvidia.com/mig.strategy``        the device plugin's ``--mig-strategy``: ``none``, ``single``, ``mixed``
``nvidia.com/mig.capable``         whether any GPU of the node can do MIG at all
``nvidia.com/mig.config.state``    the MIG manager's progress: ``pending``/``rebooting`` while it reconfigures
``nvidia.com/mig-<P>.count``       ``mixed``: MIG devices of profile ``P`` (e.g. ``mig-3g.20gb``)
``nvidia.com/mig-<P>.memory``      ``mixed``: MiB of each such device
allocatable ``nvidia.com/gpu``     whole GPUs (or their replicas, or ``single`` MIG devices) to request
allocatable ``nvidia.com/mig-P``   ``mixed``: devices of profile ``P`` to request
=================================  =========================================================================

GFD labels ``nvidia.com/mig.strategy=single`` on EVERY GPU node when the device plugin runs with the
``single`` strategy (the GPU Operator's usual setting), MIG or not. So the strategy label alone says
nothing about MIG: MIG is on only where GFD says a device is a MIG device, that is a product name
ending in ``-MIG-<profile>`` (``single``) or per-profile ``nvidia.com/mig-<P>.*`` labels and
resources (``mixed``). ``-MIG-INVALID`` (a geometry the ``single`` strategy cannot serve) and a MIG
reconfiguration in progress leave the node out with a warning.

Allocatable is the truth about counts: GFD labels are written when GFD last ran, and a GPU the device
plugin found unhealthy drops from allocatable at once. When both are present and disagree, the node
is planned with what allocatable says, with a warning.

Four kinds of device come out of it (``Device.kind``):

* ``gpu``: a whole GPU on a node that does not share; taken whole by one ``exclusive`` replica.
* ``timeslice``: a GPU time-sliced ``gpu.replicas`` ways; ``shared`` replicas take VRAM slices of it,
  at most ``gpu.replicas`` of them, and the slices' budgets never exceed its memory.
* ``mig``: a MIG device (a hardware partition); one replica takes one device whole, in either mode.
* ``mps``: one of the ``gpu.replicas`` MPS clients of a GPU, which the device plugin caps at the GPU's
  memory divided by ``gpu.replicas``; taken whole like a MIG device.

Usable memory of a device for planning = label MiB x 2^20 minus what pods already hold. Pods tell what
they hold with the annotation ``llm.kubevram.io/reservation`` (``{"node", "gpus": {index: bytes},
"sharing"}``) that the operator writes on every kubevram worker: an ``exclusive`` reservation holds the
whole device, a ``shared`` one holds its bytes and one time-slice. Other pods that request
``nvidia.com/gpu`` (or a MIG resource) on a node hold that many devices whose indices nobody knows:
they lower the node's allocatable count instead.

Rule for re-planning: reservations of pods that belong to a deployment being planned (label
``llm.kubevram.io/deployment`` = its name, in its namespace) are NOT counted, because the plan being
made replaces them; everything else is. So re-planning deployment X never finds X blocking itself.

A node that is not a GPU node (no ``nvidia.com/gpu*`` label and no GPU allocatable) is left out
silently; a GPU node whose labels are missing or malformed is left out with a warning naming the node
and the label. Nothing here raises on bad input. Pure: plain dicts in, dataclasses out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kubevram.api.quantity import MiB, parse_quantity

GPU_RESOURCE = "nvidia.com/gpu"
LABEL_MEMORY = "nvidia.com/gpu.memory"
LABEL_PRODUCT = "nvidia.com/gpu.product"
LABEL_COUNT = "nvidia.com/gpu.count"
LABEL_REPLICAS = "nvidia.com/gpu.replicas"
LABEL_SHARING_STRATEGY = "nvidia.com/gpu.sharing-strategy"
LABEL_MIG_STRATEGY = "nvidia.com/mig.strategy"
LABEL_MIG_CAPABLE = "nvidia.com/mig.capable"
LABEL_MIG_CONFIG_STATE = "nvidia.com/mig.config.state"
ANNOTATION_RESERVATION = "llm.kubevram.io/reservation"
LABEL_DEPLOYMENT = "llm.kubevram.io/deployment"
# A MIG profile as NVIDIA names it (1g.10gb, 1g.10gb+me, 2g.35gb, ...); the device plugin turns a "+"
# into "." in resource and label names (nvidia.com/mig-1g.10gb.me).
_PROFILE = r"\d+g\.\d+gb(?:[.+-][a-z0-9]+)*"
_MIG_LABEL = re.compile(rf"^nvidia\.com/(mig-{_PROFILE})\.(count|memory)$")
_MIG_RESOURCE = re.compile(rf"^nvidia\.com/mig-{_PROFILE}$")
# GFD's product label under the single strategy with MIG on: "<GPU>-MIG-<profile>" (or -MIG-INVALID).
_MIG_PRODUCT = re.compile(r"-MIG-([^-]+)$")
SHARED_SUFFIX = "-SHARED"
# Where the MIG manager is still changing the geometry: the labels and resources are about to change.
_MIG_RECONFIGURING = ("pending", "rebooting")
# Kinds of device a replica takes whole, one per replica, whatever its sharing mode.
PARTITION_KINDS = ("mig", "mps")


@dataclass(frozen=True)
class Device:
    """One schedulable GPU device of a node, as the node advertises it."""

    index: int  # the node's own numbering, as the plan's ``gpus`` lists it
    memory_bytes: int
    kind: str  # "gpu" | "timeslice" | "mig" | "mps"
    resource: str = GPU_RESOURCE  # what a pod requests to get it (DRA: the DeviceClass)
    slots: int = 1  # time-slices it offers (time-sliced GPUs only)
    name: str = ""  # DRA: the device's name in its pool (gpu-0, gpu-0-mig-1g10gb-19-0)
    product: str = ""  # DRA: the productName attribute (the node's product otherwise)
    step: int = 1  # DRA shared devices: bytes a slice is rounded up to (the capacity's requestPolicy step)

    def slice_bytes(self, nbytes: int) -> int:
        """What a VRAM slice of ``nbytes`` consumes on this device (rounded up to its step)."""
        return -(-max(0, nbytes) // self.step) * self.step


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass
class NodeInventory:
    """A schedulable GPU node and what is left on it."""

    name: str
    product: str
    gpu_memory_mib: int  # per GPU (or per single-strategy MIG device), from the label
    gpu_count: int
    labels: dict[str, str]
    taints: tuple[Taint, ...]
    ready: bool
    unschedulable: bool
    devices: tuple[Device, ...]
    allocatable: dict[str, int]  # resource name -> count (nvidia.com/gpu, nvidia.com/mig-*)
    sharing: str  # "none" | "time-slicing" | "mps" | "mig-single" | "mig-mixed"
    cpu_memory_bytes: int = 0  # allocatable memory, for CPU offload
    disk_bytes: int = 0  # allocatable ephemeral-storage, for disk offload
    # What pods hold, filled by ``apply_pods``:
    committed: dict[int, int] = field(default_factory=dict)  # device index -> bytes held by shared slices
    slots_used: dict[int, int] = field(default_factory=dict)  # device index -> time-slices held
    held_whole: set[int] = field(default_factory=set)  # device indices held whole
    foreign: dict[str, int] = field(default_factory=dict)  # resource -> devices held by non-kubevram pods
    used: dict[str, int] = field(default_factory=dict)  # resource -> devices/time-slices kubevram pods hold

    @property
    def shares(self) -> bool:
        return self.sharing != "none"

    def free_bytes(self, index: int) -> int:
        """Usable bytes left on a device (0 when held whole)."""
        if index in self.held_whole:
            return 0
        return self.devices[index].memory_bytes - self.committed.get(index, 0)

    def requestable(self, resource: str) -> int:
        """How many more of ``resource`` the device plugin can still hand out on this node."""
        return self.allocatable.get(resource, 0) - self.used.get(resource, 0) - self.foreign.get(resource, 0)

    def hold_whole(self, index: int) -> None:
        """A pod takes device ``index`` whole (one of its resource)."""
        if index not in self.held_whole:
            self.held_whole.add(index)
            resource = self.devices[index].resource
            self.used[resource] = self.used.get(resource, 0) + 1

    def add_slice(self, index: int, nbytes: int) -> None:
        """A pod takes a VRAM slice of ``nbytes`` and one time-slice of device ``index``."""
        self.committed[index] = self.committed.get(index, 0) + max(0, nbytes)
        self.slots_used[index] = self.slots_used.get(index, 0) + 1
        resource = self.devices[index].resource
        self.used[resource] = self.used.get(resource, 0) + 1


@dataclass
class Inventory:
    nodes: list[NodeInventory]
    warnings: list[str]

    def by_name(self) -> dict[str, NodeInventory]:
        return {n.name: n for n in self.nodes}


def _map(obj: Any, key: str) -> Mapping[str, Any]:
    """``obj[key]`` when both are mappings, else an empty mapping: malformed objects never raise."""
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _int_label(
    labels: Mapping[str, str], key: str, node: str, warnings: list[str], *, default: int | None = None,
    minimum: int = 1,
) -> int | None:
    raw = labels.get(key)
    if raw is None:
        if default is None:
            warnings.append(f"node {node}: skipped, label {key} is missing")
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        warnings.append(f"node {node}: skipped, label {key}={raw!r} is not an integer")
        return None
    if value < minimum:
        warnings.append(f"node {node}: skipped, label {key}={raw!r} must be >= {minimum}")
        return None
    return value


def _count(value: Any) -> int | None:
    try:
        return parse_quantity(str(value))
    except ValueError:
        return None


def _ready(status: Mapping[str, Any]) -> bool:
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return str(cond.get("status")) == "True"
    return False


def _taints(spec: Mapping[str, Any]) -> tuple[Taint, ...]:
    out = []
    for t in spec.get("taints") or []:
        if isinstance(t, Mapping) and t.get("key"):
            out.append(Taint(str(t["key"]), str(t.get("value") or ""), str(t.get("effect") or "")))
    return tuple(out)


def _looks_like_gpu_node(labels: Mapping[str, str], allocatable: Mapping[str, Any]) -> bool:
    return any(k.startswith(("nvidia.com/gpu", "nvidia.com/mig")) for k in labels) or any(
        k == GPU_RESOURCE or _MIG_RESOURCE.match(k) for k in allocatable
    )


def _product_base(product: str) -> str:
    """The GPU's product name without GFD's ``-SHARED`` suffix."""
    return product[: -len(SHARED_SUFFIX)] if product.endswith(SHARED_SUFFIX) else product


def _mig_profiles(
    labels: Mapping[str, str], allocatable: Mapping[str, int], name: str, warnings: list[str]
) -> list[Device] | None:
    """The ``mixed`` strategy's MIG devices: per profile, the count allocatable gives (the label's when
    the node lists no allocatable for it) and the label's MiB. None when a label is malformed."""
    profiles: dict[str, dict[str, str]] = {}
    for key, value in labels.items():
        m = _MIG_LABEL.match(key)
        if m:
            profiles.setdefault(m.group(1), {})[m.group(2)] = value
    for key in allocatable:
        if _MIG_RESOURCE.match(key):
            profiles.setdefault(key.removeprefix("nvidia.com/"), {})
    devices: list[Device] = []
    for profile in sorted(profiles):
        resource = f"nvidia.com/{profile}"
        if resource in allocatable:
            count: int | None = allocatable[resource]
        else:
            count = _int_label(labels, f"{resource}.count", name, warnings, minimum=0)
        if count is None:
            return None
        if not count:
            continue
        if f"{resource}.memory" not in labels:
            warnings.append(f"node {name}: {count} {resource} ignored, label {resource}.memory is missing")
            continue
        mem = _int_label(labels, f"{resource}.memory", name, warnings)
        if mem is None:
            return None
        devices += [Device(0, mem * MiB, "mig", resource) for _ in range(count)]
    return devices


def _gpu_devices(
    labels: Mapping[str, str], allocatable: dict[str, int], name: str, warnings: list[str], *,
    mig_single: bool, mixed: bool,
) -> tuple[list[Device], str] | None:
    """The devices served as ``nvidia.com/gpu`` and how the node shares them; None (with a warning)
    when a label is malformed. ``allocatable`` gains ``nvidia.com/gpu`` when the node lists none."""
    listed = GPU_RESOURCE in allocatable
    if mixed and (not listed or not allocatable[GPU_RESOURCE]):
        return [], "none"  # every GPU is in MIG mode (the gpu.* labels then describe those GPUs)
    mem_mib = _int_label(labels, LABEL_MEMORY, name, warnings)
    if mem_mib is None:
        return None
    raw_replicas = _int_label(labels, LABEL_REPLICAS, name, warnings, default=1, minimum=0)
    if raw_replicas is None:
        return None
    replicas = max(1, raw_replicas)  # GFD writes 0 where sharing is disabled (MIG-enabled GPUs)
    strategy = labels.get(LABEL_SHARING_STRATEGY, "")
    if replicas > 1 and strategy not in ("", "none", "time-slicing", "mps"):
        warnings.append(f"node {name}: skipped, label {LABEL_SHARING_STRATEGY}={strategy!r} is not "
                        "none, time-slicing or mps")
        return None
    mps = replicas > 1 and strategy == "mps"
    if listed:
        # What the device plugin hands out now; labels may be stale (a GPU gone unhealthy, GFD not rerun).
        count = allocatable[GPU_RESOURCE] // replicas
        label_count = labels.get(LABEL_COUNT)
        if not mixed and label_count is not None and label_count.strip() != str(count):
            warnings.append(
                f"node {name}: label {LABEL_COUNT}={label_count!r} but allocatable {GPU_RESOURCE}="
                f"{allocatable[GPU_RESOURCE]} ({replicas} per GPU); planning with {count} GPU(s), "
                "as allocatable says"
            )
    elif LABEL_COUNT in labels:
        count_ = _int_label(labels, LABEL_COUNT, name, warnings, minimum=0)
        if count_ is None:
            return None
        count = count_
        allocatable[GPU_RESOURCE] = count * replicas
    else:
        warnings.append(f"node {name}: skipped, label {LABEL_COUNT} is missing (no {GPU_RESOURCE})")
        return None
    if mps:  # each MPS client is capped at an equal share of the GPU's memory
        share = mem_mib * MiB // replicas
        return [Device(0, share, "mps") for _ in range(count * replicas)], "mps"
    if replicas > 1:
        return [Device(0, mem_mib * MiB, "timeslice", slots=replicas) for _ in range(count)], "time-slicing"
    kind = "mig" if mig_single else "gpu"
    return [Device(0, mem_mib * MiB, kind) for _ in range(count)], "mig-single" if mig_single else "none"


def node_inventory(obj: Any, warnings: list[str]) -> NodeInventory | None:
    """One Node object -> its inventory, or None (with a warning when it is a GPU node gone wrong)."""
    if not isinstance(obj, Mapping):
        warnings.append(f"skipped an item that is not a Node object ({type(obj).__name__})")
        return None
    meta = _map(obj, "metadata")
    name = str(meta.get("name") or "")
    if obj.get("kind") not in (None, "Node"):
        warnings.append(f"skipped {obj.get('kind')} {name or '(unnamed)'}: not a Node")
        return None
    if not name:
        warnings.append("skipped a Node without metadata.name")
        return None
    raw_labels = _map(meta, "labels")
    labels = {str(k): str(v) for k, v in raw_labels.items()}
    spec = _map(obj, "spec")
    status = _map(obj, "status")
    raw_alloc = _map(status, "allocatable")
    if not _looks_like_gpu_node(labels, raw_alloc):
        return None
    allocatable: dict[str, int] = {}
    for key, value in raw_alloc.items():
        if key == GPU_RESOURCE or _MIG_RESOURCE.match(str(key)):
            n = _count(value)
            if n is None or n < 0:
                warnings.append(f"node {name}: skipped, allocatable {key}={value!r} is not a count")
                return None
            allocatable[str(key)] = n
    cpu_mem = _count(raw_alloc.get("memory", 0)) or 0
    disk = _count(raw_alloc.get("ephemeral-storage", 0)) or 0

    state = labels.get(LABEL_MIG_CONFIG_STATE, "")
    if state in _MIG_RECONFIGURING:
        warnings.append(f"node {name}: skipped, the MIG manager is reconfiguring its GPUs "
                        f"({LABEL_MIG_CONFIG_STATE}={state})")
        return None
    strategy = labels.get(LABEL_MIG_STRATEGY, "none")
    product = labels.get(LABEL_PRODUCT, "")
    profile = _MIG_PRODUCT.search(_product_base(product))
    mig_capable = labels.get(LABEL_MIG_CAPABLE, "").lower() != "false"
    if profile and profile.group(1) == "INVALID":
        warnings.append(f"node {name}: skipped, {LABEL_PRODUCT}={product}: GFD found a MIG geometry the "
                        f"{strategy!r} MIG strategy cannot serve (mixed profiles or MIG-enabled GPUs without "
                        "MIG devices)")
        return None
    mixed = strategy == "mixed" and mig_capable
    devices: list[Device] = []
    if mixed:
        found = _mig_profiles(labels, allocatable, name, warnings)
        if found is None:
            return None
        devices += found
    gpus = _gpu_devices(labels, allocatable, name, warnings, mixed=mixed,
                        mig_single=strategy == "single" and mig_capable and profile is not None)
    if gpus is None:
        return None
    devices += gpus[0]
    devices = [replace(d, index=i) for i, d in enumerate(devices)]
    sharing = "mig-mixed" if mixed and any(d.kind == "mig" for d in devices) else gpus[1]
    if state == "failed":
        warnings.append(f"node {name}: {LABEL_MIG_CONFIG_STATE}=failed; planned with the devices its labels "
                        "and allocatable show")
    # Per GPU as the label says (per MIG device under single); mixed: the largest device.
    label_mib = _int_label(labels, LABEL_MEMORY, name, [], default=0, minimum=0) if not mixed else 0
    mem_mib = label_mib or max((d.memory_bytes for d in devices), default=0) // MiB
    return NodeInventory(
        name=name,
        product=product or "unknown",
        gpu_memory_mib=mem_mib,
        gpu_count=len(devices),
        labels=labels,
        taints=_taints(spec),
        ready=_ready(status),
        unschedulable=bool(spec.get("unschedulable")),
        devices=tuple(devices),
        allocatable=allocatable,
        sharing=sharing,
        cpu_memory_bytes=cpu_mem,
        disk_bytes=disk,
    )


def _pod_gpu_requests(pod: Mapping[str, Any]) -> dict[str, int]:
    """GPU resources a pod asks for (max of requests and limits, summed over its containers)."""
    out: dict[str, int] = {}
    spec = _map(pod, "spec")
    for c in spec.get("containers") or []:
        res = _map(c, "resources")
        for key in {*(res.get("requests") or {}), *(res.get("limits") or {})}:
            if key == GPU_RESOURCE or _MIG_RESOURCE.match(str(key)):
                n = max(_count((res.get("requests") or {}).get(key, 0)) or 0,
                        _count((res.get("limits") or {}).get(key, 0)) or 0)
                out[str(key)] = out.get(str(key), 0) + n
    return out


@dataclass(frozen=True)
class Reservation:
    """What one kubevram replica holds on one node: node GPU index -> bytes.

    ``exclusive`` holds each listed device whole; ``shared`` holds its bytes and one time-slice of a
    time-sliced GPU (a MIG device is always held whole). The operator writes one per replica in the
    ``llm.kubevram.io/reservation`` annotation of its workers' pod template, and its placement ledger
    hands the planner the ones it decided but the API does not show yet.
    """

    namespace: str
    deployment: str
    node: str
    gpus: tuple[tuple[int, int], ...]  # (node GPU index, bytes), sorted by index
    sharing: str = "exclusive"
    source: str = field(default="", compare=False)  # where it was read (a pod), for warnings

    @property
    def label(self) -> str:
        return self.source or f"{self.namespace}/{self.deployment}"

    @property
    def owner(self) -> tuple[str, str]:
        return (self.namespace, self.deployment)

    @classmethod
    def of(
        cls, namespace: str, deployment: str, node: str, gpus: Mapping[Any, Any], sharing: str = "exclusive",
        source: str = "",
    ) -> Reservation:
        """From plain values (``gpus`` keys and values as ints or their strings); ``ValueError`` if not."""
        return cls(namespace, deployment, node, tuple(sorted((int(k), int(v)) for k, v in gpus.items())),
                   sharing, source)

    @classmethod
    def from_annotation(
        cls, namespace: str, deployment: str, raw: Any, node: str = "", source: str = ""
    ) -> Reservation:
        """From the annotation's JSON ``{"node", "gpus": {index: bytes}, "sharing"}``; ``node`` (a pod's
        ``spec.nodeName``) wins over the annotation's. A multi-node group's pods carry
        ``{"pods": [{"node", "gpus"}, ...], "sharing"}`` (``all_from_annotation``): a pod holds the entry of
        its node (nothing before it is bound). ``ValueError`` when malformed."""
        try:
            value = json.loads(raw) if isinstance(raw, str) else raw
            if "pods" in value:
                entries = cls.all_from_annotation(namespace, deployment, value, source)
                mine = [r for r in entries if r.node == node]
                sharing = str(value.get("sharing") or "exclusive")
                return mine[0] if mine else cls(namespace, deployment, node, (), sharing, source)
            return cls.of(namespace, deployment, node or str(value.get("node") or ""),
                          value.get("gpus") or {}, str(value.get("sharing") or "exclusive"), source)
        except (TypeError, AttributeError) as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def all_from_annotation(
        cls, namespace: str, deployment: str, raw: Any, source: str = ""
    ) -> list[Reservation]:
        """Every reservation an annotation names: one, or one per pod of a group (``"pods"``)."""
        try:
            value = json.loads(raw) if isinstance(raw, str) else raw
            if "pods" not in value:
                return [cls.from_annotation(namespace, deployment, value, source=source)]
            sharing = str(value.get("sharing") or "exclusive")
            return [
                cls.of(namespace, deployment, str(p.get("node") or ""), p.get("gpus") or {}, sharing, source)
                for p in value["pods"]
            ]
        except (TypeError, AttributeError) as exc:
            raise ValueError(str(exc)) from None

    def to_annotation(self) -> dict[str, Any]:
        return {"node": self.node, "gpus": {str(k): v for k, v in self.gpus}, "sharing": self.sharing}


def apply_reservations(
    nodes: Iterable[NodeInventory],
    reservations: Iterable[Reservation],
    warnings: list[str],
    *,
    replanned: Iterable[tuple[str, str]] = (),
) -> None:
    """Subtract what ``reservations`` hold from ``nodes`` (in place); those of ``replanned`` (namespace,
    name) deployments are ignored, since the plan being made replaces them, and so are those on nodes
    that are not schedulable GPU nodes here (gone, or not bound yet)."""
    by_name = {n.name: n for n in nodes}
    skip = set(replanned)
    for reservation in reservations:
        node = by_name.get(reservation.node)
        if reservation.owner in skip or node is None:
            continue
        shared = reservation.sharing == "shared"
        for index, nbytes in reservation.gpus:
            if not 0 <= index < len(node.devices):
                warnings.append(f"{reservation.label}: GPU {index} is not on node {node.name}; ignored")
                continue
            if shared and node.devices[index].kind == "timeslice":
                node.add_slice(index, nbytes)
            else:
                node.hold_whole(index)


def apply_pods(
    nodes: Iterable[NodeInventory],
    pods: Sequence[Mapping[str, Any]],
    warnings: list[str],
    *,
    replanned: Iterable[tuple[str, str]] = (),
) -> None:
    """Subtract what ``pods`` hold from ``nodes`` (in place): kubevram workers by their reservation
    annotation (``apply_reservations``), other pods by their GPU requests; pods of ``replanned``
    (namespace, name) deployments are ignored, since the plan being made replaces them."""
    nodes = list(nodes)
    by_name = {n.name: n for n in nodes}
    reservations: list[Reservation] = []
    for pod in pods:
        if not isinstance(pod, Mapping):
            continue
        meta = _map(pod, "metadata")
        status = _map(pod, "status")
        if status.get("phase") in ("Succeeded", "Failed"):
            continue
        pod_name = f"{meta.get('namespace') or 'default'}/{meta.get('name') or '(unnamed)'}"
        annotations = _map(meta, "annotations")
        spec = _map(pod, "spec")
        raw = annotations.get(ANNOTATION_RESERVATION)
        if raw is None:
            node = by_name.get(str(spec.get("nodeName") or ""))
            if node is not None:
                for resource, n in _pod_gpu_requests(pod).items():
                    node.foreign[resource] = node.foreign.get(resource, 0) + n
            continue
        labels = _map(meta, "labels")
        try:
            reservations.append(Reservation.from_annotation(
                str(meta.get("namespace") or "default"), str(labels.get(LABEL_DEPLOYMENT, "")), raw,
                str(spec.get("nodeName") or ""), f"pod {pod_name}",
            ))
        except ValueError:
            warnings.append(f"pod {pod_name}: annotation {ANNOTATION_RESERVATION} is malformed; ignored")
    apply_reservations(nodes, reservations, warnings, replanned=replanned)


def _content(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(obj)


def build_inventory(
    nodes: Sequence[Any],
    pods: Sequence[Mapping[str, Any]] = (),
    *,
    replanned: Iterable[tuple[str, str]] = (),
    reservations: Iterable[Reservation] = (),
) -> Inventory:
    """Inventory of every GPU node in ``nodes`` (sorted by name; duplicates keep the first by name
    and content, with a warning) minus what ``pods`` and ``reservations`` hold."""
    warnings: list[str] = []
    by_name: dict[str, list[tuple[Any, NodeInventory]]] = {}
    for obj in nodes:
        inv = node_inventory(obj, warnings)
        if inv is not None:
            by_name.setdefault(inv.name, []).append((obj, inv))
    seen: dict[str, NodeInventory] = {}
    for name in sorted(by_name):
        found = by_name[name]
        if len(found) > 1:  # keep one whatever the input order: the first by content
            warnings.append(f"node {name}: listed {len(found)} times; one is kept")
            found.sort(key=lambda item: _content(item[0]))
        seen[name] = found[0][1]
    out = list(seen.values())
    replanned = set(replanned)
    apply_pods(out, pods, warnings, replanned=replanned)
    apply_reservations(out, reservations, warnings, replanned=replanned)
    return Inventory(out, sorted(warnings))


def tolerates(taint: Taint, tolerations: Sequence[Mapping[str, Any]]) -> bool:
    """Kubernetes' rule: a toleration matches a taint by key (or empty key with Exists), value
    (Equal, the default) and effect (empty matches every effect)."""
    for t in tolerations:
        op = t.get("operator") or "Equal"
        key = t.get("key") or ""
        if key and key != taint.key:
            continue
        if not key and op != "Exists":
            continue
        if op == "Equal" and (t.get("value") or "") != taint.value:
            continue
        effect = t.get("effect") or ""
        if effect and effect != taint.effect:
            continue
        return True
    return False


def admits(
    node: NodeInventory, node_selector: Mapping[str, str], tolerations: Sequence[Mapping[str, Any]]
) -> str:
    """Empty when a replica with these constraints may run on ``node``, else why not (short)."""
    if not node.ready:
        return "not Ready"
    if node.unschedulable:
        return "cordoned"
    for key, value in node_selector.items():
        if node.labels.get(key) != value:
            return f"nodeSelector {key}={value} does not match"
    for taint in node.taints:
        if taint.effect in ("NoSchedule", "NoExecute") and not tolerates(taint, tolerations):
            return f"taint {taint.key}={taint.value}:{taint.effect} not tolerated"
    return ""


__all__ = [
    "ANNOTATION_RESERVATION",
    "GPU_RESOURCE",
    "LABEL_COUNT",
    "LABEL_DEPLOYMENT",
    "LABEL_MEMORY",
    "LABEL_PRODUCT",
    "LABEL_REPLICAS",
    "PARTITION_KINDS",
    "Device",
    "Inventory",
    "NodeInventory",
    "Reservation",
    "Taint",
    "admits",
    "apply_pods",
    "apply_reservations",
    "build_inventory",
    "node_inventory",
    "tolerates",
]
