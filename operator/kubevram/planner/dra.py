"""GPU inventory from Dynamic Resource Allocation objects (``resource.k8s.io/v1``), for the same planner.

Where the cluster runs a DRA driver for GPUs (NVIDIA's ``gpu.nvidia.com``, kubernetes-sigs/dra-driver-
nvidia-gpu), every GPU is a device in a ResourceSlice of its node, as the driver publishes it::

    spec: {driver: gpu.nvidia.com, nodeName: gpu-0, pool: {name: gpu-0, generation: 1, resourceSliceCount: 1},
           devices: [{name: gpu-0,
                      attributes: {type: {string: gpu}, productName: {string: NVIDIA A100-SXM4-80GB},
                      uuid: {string: GPU-...}, ...}, capacity: {memory: {value: 80Gi}}}]}

* a whole GPU has ``type: gpu`` and a capacity ``memory`` in bytes;
* a MIG device has ``type: mig``, ``profile`` (``1g.10gb``), ``parentUUID`` and its own ``memory``;
* with consumable capacity (KEP-5075; the driver's ``--consumable-shares``) a device carries
  ``allowMultipleAllocations: true`` and a ``requestPolicy`` on ``memory``: claims take
  ``capacity.requests.memory`` of it, rounded up to the policy's ``step``, and the scheduler keeps their sum
  within the value; ``--consumable-shares=N`` adds a capacity ``shares`` of N (one per claim).

They become the planner's plain devices (``kubevram.planner.inventory.Device``), so placement does not know
which API carried them: a whole GPU is kind ``gpu`` (an exclusive replica takes it whole), a MIG device kind
``mig`` (one replica takes it whole), a shareable device kind ``timeslice`` whose ``slots`` are its shares
(VRAM slices of ``shared`` replicas, their budgets summing to at most its memory). ``resource`` is the
DeviceClass a claim names (``gpu.nvidia.com`` or ``mig.nvidia.com``).

What is already taken comes from ResourceClaims: each allocated result of the driver holds its device whole,
or, on a shareable device, its ``consumedCapacity.memory`` (the device's whole memory when the claim did not
say) and one share. Claims of kubevram's own workers (label ``llm.kubevram.io/deployment``) are left out:
the placement ledger counts them, as it counts the device-plugin workers; so are its placeholders' (label
``app.kubernetes.io/managed-by: kubevram``), which any worker preempts. The ledger books device indices
but the scheduler picks the device, so a claim on a device the ledger booked holds a free one just like it
(``apply_claims``): what is held per node stays exact.

Only the newest generation of each pool counts (a driver republishing leaves old slices behind for a
moment); devices that consume shared counters (KEP-4815 partitionable devices) are left out with a warning,
as are slices of nodes that are not in the node list. Nothing here raises on bad input. Pure: plain dicts
in, dataclasses out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubevram.api.quantity import MiB, parse_quantity
from kubevram.planner.inventory import (
    LABEL_DEPLOYMENT,
    Device,
    Inventory,
    NodeInventory,
    Reservation,
    _count,
    _map,
    _ready,
    _taints,
    apply_reservations,
)

DRIVER = "gpu.nvidia.com"
GPU_CLASS = "gpu.nvidia.com"
MIG_CLASS = "mig.nvidia.com"
#: Slices one shareable device takes when the driver does not count shares (``--consumable-shares=memory``):
#: only its memory limits them.
UNCOUNTED_SHARES = 1 << 20


@dataclass(frozen=True)
class DraDevice:
    """One device of a ResourceSlice, with what the planner and the claims need of it."""

    node: str
    pool: str
    name: str
    type: str  # gpu | mig
    memory: int  # bytes
    product: str
    shareable: bool
    shares: int
    step: int
    profile: str = ""


def _attribute(device: Mapping[str, Any], key: str, driver: str) -> Any:
    """An attribute's value (``string``, ``int``, ``bool`` or ``version``), by short or qualified name."""
    attrs = _map(device, "attributes")
    value = attrs.get(key) or attrs.get(f"{driver}/{key}")
    if not isinstance(value, Mapping):
        return None
    for kind in ("string", "int", "bool", "version"):
        if kind in value:
            return value[kind]
    return None


def _capacity(device: Mapping[str, Any], key: str, driver: str) -> Mapping[str, Any]:
    caps = _map(device, "capacity")
    value = caps.get(key) or caps.get(f"{driver}/{key}")
    return value if isinstance(value, Mapping) else {}


def _natural(name: str) -> list[Any]:
    """Sort key: gpu-2 before gpu-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def slice_devices(slices: Sequence[Any], driver: str, warnings: list[str]) -> dict[str, list[DraDevice]]:
    """The driver's devices per node, from the newest generation of each pool, in natural name order."""
    newest: dict[str, int] = {}
    for obj in slices:
        spec = _map(obj, "spec")
        if spec.get("driver") != driver:
            continue
        pool = _map(spec, "pool")
        try:
            generation = int(pool.get("generation") or 0)
        except (TypeError, ValueError):
            generation = 0
        name = str(pool.get("name") or "")
        newest[name] = max(newest.get(name, generation), generation)
    out: dict[str, list[DraDevice]] = {}
    for obj in slices:
        spec = _map(obj, "spec")
        if spec.get("driver") != driver:
            continue
        pool = _map(spec, "pool")
        pool_name = str(pool.get("name") or "")
        try:
            generation = int(pool.get("generation") or 0)
        except (TypeError, ValueError):
            generation = 0
        if generation != newest.get(pool_name):
            continue
        slice_name = str(_map(obj, "metadata").get("name") or pool_name)
        node = str(spec.get("nodeName") or "")
        if not node:
            warnings.append(
                f"ResourceSlice {slice_name}: no spec.nodeName (network-attached devices are not "
                "planned); skipped"
            )
            continue
        for device in spec.get("devices") or []:
            parsed = _device(device, node, pool_name, driver, slice_name, warnings)
            if parsed is not None:
                out.setdefault(node, []).append(parsed)
    for devices in out.values():
        devices.sort(key=lambda d: (_natural(d.pool), _natural(d.name)))
    return out


def _device(
    device: Any, node: str, pool: str, driver: str, where: str, warnings: list[str]
) -> DraDevice | None:
    if not isinstance(device, Mapping):
        return None
    name = str(device.get("name") or "")
    kind = str(_attribute(device, "type", driver) or "")
    if kind not in ("gpu", "mig"):
        return None  # vfio passthrough, IMEX channels and other kinds serve no model
    if device.get("consumesCounters"):
        warnings.append(
            f"ResourceSlice {where}: device {name} consumes shared counters (partitionable "
            "devices); not planned"
        )
        return None
    memory = _capacity(device, "memory", driver)
    try:
        nbytes = parse_quantity(str(memory.get("value")))
    except ValueError:
        warnings.append(
            f"ResourceSlice {where}: device {name} has no capacity memory ({memory.get('value')!r}); skipped"
        )
        return None
    shareable = bool(device.get("allowMultipleAllocations"))
    policy = _map(memory, "requestPolicy")
    step = 1
    if shareable:
        raw = _map(policy, "validRange").get("step")
        step = max(1, parse_quantity(str(raw))) if raw is not None and _count(raw) else MiB
    shares = UNCOUNTED_SHARES
    raw_shares = _capacity(device, "shares", driver).get("value")
    if shareable and raw_shares is not None:
        shares = max(1, _count(raw_shares) or 1)
    return DraDevice(
        node=node,
        pool=pool,
        name=name,
        type=kind,
        memory=nbytes,
        product=str(_attribute(device, "productName", driver) or ""),
        shareable=shareable,
        shares=shares if shareable else 1,
        step=step,
        profile=str(_attribute(device, "profile", driver) or ""),
    )


def to_device(index: int, device: DraDevice) -> Device:
    """The planner's device for a DRA device."""
    resource = MIG_CLASS if device.type == "mig" else GPU_CLASS
    if device.shareable:
        return Device(
            index,
            device.memory,
            "timeslice",
            resource,
            slots=device.shares,
            name=device.name,
            product=device.product,
            step=device.step,
        )
    return Device(index, device.memory, device.type, resource, name=device.name, product=device.product)


def dra_node_inventory(obj: Any, devices: Sequence[DraDevice]) -> NodeInventory:
    """A Node object and its DRA devices -> its inventory (nothing taken yet)."""
    meta = _map(obj, "metadata")
    spec = _map(obj, "spec")
    status = _map(obj, "status")
    allocatable = _map(status, "allocatable")
    planned = tuple(to_device(i, d) for i, d in enumerate(devices))
    counts: dict[str, int] = {}
    for d in planned:
        counts[d.resource] = counts.get(d.resource, 0) + d.slots
    product = next((d.product for d in devices if d.type == "gpu" and d.product), "") or next(
        (d.product for d in devices if d.product), "unknown"
    )
    return NodeInventory(
        name=str(meta.get("name") or ""),
        product=product,
        gpu_memory_mib=max((d.memory for d in devices), default=0) // MiB,
        gpu_count=len(planned),
        labels={str(k): str(v) for k, v in _map(meta, "labels").items()},
        taints=_taints(spec),
        ready=_ready(status),
        unschedulable=bool(spec.get("unschedulable")),
        devices=planned,
        allocatable=counts,
        sharing="dra-shared" if any(d.kind == "timeslice" for d in planned) else "dra",
        cpu_memory_bytes=_count(allocatable.get("memory", 0)) or 0,
        disk_bytes=_count(allocatable.get("ephemeral-storage", 0)) or 0,
    )


def _kubevram_claim(claim: Mapping[str, Any]) -> bool:
    """A claim of a kubevram worker (the ledger counts it) or placeholder (it holds nothing planned: any
    worker preempts it)."""
    labels = _map(_map(claim, "metadata"), "labels")
    return LABEL_DEPLOYMENT in labels or labels.get("app.kubernetes.io/managed-by") == "kubevram"


def _free_twin(node: NodeInventory, index: int) -> int | None:
    """A device of ``node`` like device ``index`` (kind, memory, class) that nothing holds any part of."""
    device = node.devices[index]
    like = (device.kind, device.memory_bytes, device.resource, device.slots)
    for other in node.devices:
        i = other.index
        taken = i in node.held_whole or node.slots_used.get(i) or node.committed.get(i)
        if (other.kind, other.memory_bytes, other.resource, other.slots) == like and not taken:
            return i
    return None


def apply_claims(
    where: Mapping[tuple[str, str], tuple[NodeInventory, int]],
    claims: Sequence[Any],
    driver: str,
    warnings: list[str],
) -> None:
    """Subtract what allocated ResourceClaims (other than kubevram workers') hold, in place: ``where`` maps
    (pool, device name) to the node inventory and device index.

    Run after the ledger's reservations: a reservation books device indices, but kube-scheduler chooses
    which of a node's matching devices a kubevram claim gets, so another claim may hold the very device the
    ledger booked while kubevram's pod holds one just like it. Such a claim holds that free twin instead:
    the count of devices held per node stays exact (for a multi-node group, on every node of the group)."""
    for claim in claims:
        if not isinstance(claim, Mapping) or _kubevram_claim(claim):
            continue
        meta = _map(claim, "metadata")
        label = f"ResourceClaim {meta.get('namespace') or 'default'}/{meta.get('name') or '(unnamed)'}"
        for result in _map(_map(_map(claim, "status"), "allocation"), "devices").get("results") or []:
            if not isinstance(result, Mapping) or result.get("driver") != driver:
                continue
            found = where.get((str(result.get("pool") or ""), str(result.get("device") or "")))
            if found is None:
                continue  # a device of a node that is not planned (gone, not a GPU node here)
            node, index = found
            device = node.devices[index]
            if device.kind != "timeslice":
                if index in node.held_whole:  # booked by the ledger: its claim got another device
                    twin = _free_twin(node, index)
                    if twin is None:
                        warnings.append(
                            f"{label}: device {device.name} of node {node.name} is also booked by a "
                            "kubevram replica and no device like it is free; counted once"
                        )
                    index = index if twin is None else twin
                node.hold_whole(index)
                continue
            consumed = _map(result, "consumedCapacity").get("memory")
            try:
                nbytes = parse_quantity(str(consumed)) if consumed is not None else device.memory_bytes
            except ValueError:
                warnings.append(
                    f"{label}: consumedCapacity.memory={consumed!r} is not a quantity; the "
                    "whole device is counted"
                )
                nbytes = device.memory_bytes
            node.add_slice(index, nbytes)


def has_gpu_slices(slices: Sequence[Any], driver: str = DRIVER) -> bool:
    """Whether any ResourceSlice of ``driver`` publishes a GPU or MIG device."""
    return bool(slice_devices(slices, driver, []))


def build_dra_inventory(
    nodes: Sequence[Any],
    slices: Sequence[Any],
    claims: Sequence[Any] = (),
    *,
    driver: str = DRIVER,
    replanned: Iterable[tuple[str, str]] = (),
    reservations: Iterable[Reservation] = (),
) -> Inventory:
    """Inventory of every node with devices of ``driver`` (sorted by name) minus what ``claims`` and
    ``reservations`` (the placement ledger's, except those of ``replanned`` deployments) hold."""
    warnings: list[str] = []
    devices = slice_devices(slices, driver, warnings)
    objects = {str(_map(n, "metadata").get("name") or ""): n for n in nodes if isinstance(n, Mapping)}
    out: list[NodeInventory] = []
    where: dict[tuple[str, str], tuple[NodeInventory, int]] = {}
    for name in sorted(devices):
        if name not in objects:
            warnings.append(f"node {name}: its ResourceSlices list GPUs but there is no such Node; skipped")
            continue
        node = dra_node_inventory(objects[name], devices[name])
        out.append(node)
        where.update({(d.pool, d.name): (node, i) for i, d in enumerate(devices[name])})
    apply_reservations(out, reservations, warnings, replanned=replanned)
    apply_claims(where, claims, driver, warnings)
    return Inventory(out, sorted(warnings))


__all__ = [
    "DRIVER",
    "GPU_CLASS",
    "MIG_CLASS",
    "DraDevice",
    "apply_claims",
    "build_dra_inventory",
    "dra_node_inventory",
    "has_gpu_slices",
    "slice_devices",
    "to_device",
]
