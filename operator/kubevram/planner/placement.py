"""Joint placement of every replica of many LLMDeployments on nodes and GPUs, by free GPU memory.

``plan_cluster(deployments, nodes, pods)`` decides, for each replica, the node and the node's GPUs it
runs on, its device map and per-GPU budgets (``kubevram.planner.devicemap``), and turns what cannot be
placed into a reason with numbers and a signal for the cluster autoscaler.

The algorithm (deterministic: same input, same plan, whatever the order of the input lists):

1. Inventory (``kubevram.planner.inventory``): GPU nodes from their GFD labels, minus what running
   kubevram pods reserve (except pods of the deployments being planned: their plan is being remade)
   and what other pods request.
2. Every deployment's model facts and workload give ``need(n)``: the bytes each of ``n`` equal GPUs
   must have free for one replica (``devicemap.min_per_gpu_bytes``).
3. Deployments are planned largest first (first-fit decreasing, by the single-GPU total), ties by
   namespace and name; each replica in turn goes to the best candidate:

   * a candidate is a *device class* (kind, memory per device, resource) on an admitting node:
     Ready, not cordoned, ``nodeSelector`` matched, every NoSchedule/NoExecute taint tolerated;
   * ``exclusive`` takes ``n`` whole devices (plain GPUs or MIG devices, one MIG device at most), never
     more than the node's allocatable minus what is held; ``shared`` takes a VRAM slice of ``n``
     time-sliced GPUs (``nvidia.com/gpu.replicas`` > 1) with ``need(n)`` free each and a time-slice
     left, or one MIG device; the slices' budgets on a GPU never exceed its memory;
   * classes are ranked by the VRAM the replica takes (``n`` x device memory for exclusive,
     ``n`` x ``need(n)`` for shared), then by smaller device memory: the smallest GPU class that fits,
     and on a node the fewest GPUs that fit;
   * within the class, ``binpack`` takes the admitting node with the fewest free devices that still fit
     (best fit), ``spread`` the one with the most, and never a node that already holds a replica of
     the same deployment; ties go to the node name.
   * with ``offload: cpu|disk`` and no GPU-only fit, the replica goes to the node with the largest free
     device(s) and the device map spills the rest to CPU memory / disk.

4. What is left gets a reason ("needs 2 GPUs with >= 71.3 GiB or 4 with >= 36.2 GiB; largest free:
   1 x 40.0 GiB on gpu-a100-0") and ``autoscaling``: the smallest node class (configured, else known
   GPU products) that would fit, and the node-affinity requirements the pending pods carry.

Pure: plain data in, plain data out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.api.quantity import GiB, MiB
from kubevram.api.v1alpha1 import LLMDeployment
from kubevram.planner.calibration import deployment_coefficient
from kubevram.planner.devicemap import NEEDED_UP_TO, NoFit, ReplicaPlan, min_per_gpu_bytes, plan_replica
from kubevram.planner.dra import DRIVER, build_dra_inventory
from kubevram.planner.estimate import Estimate, Workload, estimate
from kubevram.planner.facts import ModelFacts
from kubevram.planner.groups import GroupPlan, plan_group, why_no_group
from kubevram.planner.host import HostNeed, host_need, offload_room, refusal
from kubevram.planner.inventory import (
    LABEL_COUNT,
    LABEL_MEMORY,
    LABEL_PRODUCT,
    LABEL_REPLICAS,
    PARTITION_KINDS,
    Device,
    Inventory,
    NodeInventory,
    Reservation,
    admits,
    build_inventory,
)
from kubevram.planner.report import resolve_facts

MAX_GPUS_PER_REPLICA = 16
# Every worker pod tolerates the GPU taint (the operator renders it; Kubernetes' ExtendedResourceToleration
# admission plugin adds it to any pod requesting nvidia.com/gpu).
GPU_TOLERATION: dict[str, Any] = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@lru_cache(maxsize=1024)
def _estimate(facts: ModelFacts, workload: Workload) -> Estimate:
    """``estimate`` remembered: the operator re-plans the same models over and over."""
    return estimate(facts, workload)


# ------------------------------------------------------------------------------------ node classes


@dataclass(frozen=True)
class NodeClass:
    """A kind of GPU node the cluster autoscaler can add (a node group)."""

    name: str
    gpu_product: str
    gpu_memory_mib: int
    gpus_per_node: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "gpuProduct": self.gpu_product, "gpuMemoryMiB": self.gpu_memory_mib,
                "gpusPerNode": self.gpus_per_node}


# GPU memory as GFD labels it (NVML's total, MiB) and the largest common instance of each product.
KNOWN_PRODUCTS: tuple[NodeClass, ...] = (
    NodeClass("t4", "Tesla-T4", 15360, 4),
    NodeClass("a10g", "NVIDIA-A10G", 23028, 8),
    NodeClass("l4", "NVIDIA-L4", 23034, 8),
    NodeClass("a100-40gb", "NVIDIA-A100-SXM4-40GB", 40960, 8),
    NodeClass("l40s", "NVIDIA-L40S", 46068, 8),
    NodeClass("h100-80gb", "NVIDIA-H100-80GB-HBM3", 81559, 8),
    NodeClass("a100-80gb", "NVIDIA-A100-SXM4-80GB", 81920, 8),
    NodeClass("h200", "NVIDIA-H200", 143771, 8),
)


def parse_node_classes(raw: Sequence[Any] | None, warnings: list[str]) -> tuple[NodeClass, ...]:
    """``[{"name", "gpuProduct", "gpuMemoryMiB", "gpusPerNode"}]`` (the operator's KUBEVRAM_NODE_CLASSES);
    bad entries are skipped with a warning naming the entry and the field."""
    out = []
    for i, item in enumerate(raw or []):
        if not isinstance(item, Mapping):
            warnings.append(f"nodeClasses[{i}]: not a mapping; skipped")
            continue
        try:
            name = str(item["name"])
            mem = int(item["gpuMemoryMiB"])
            per_node = int(item.get("gpusPerNode", 8))
        except KeyError as exc:
            warnings.append(f"nodeClasses[{i}].{exc.args[0]}: is required; skipped")
            continue
        except (TypeError, ValueError):
            warnings.append(f"nodeClasses[{i}]: gpuMemoryMiB and gpusPerNode must be integers; skipped")
            continue
        if mem <= 0 or per_node <= 0:
            warnings.append(f"nodeClasses[{i}]: gpuMemoryMiB and gpusPerNode must be > 0; skipped")
            continue
        out.append(NodeClass(name, str(item.get("gpuProduct") or name), mem, per_node))
    return tuple(out)


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class DraInput:
    """What a DRA cluster shows of its GPUs: ResourceSlice and ResourceClaim objects, and the driver."""

    slices: Sequence[Mapping[str, Any]]
    claims: Sequence[Mapping[str, Any]] = ()
    driver: str = DRIVER


def replica_gpu_bytes(replica: Mapping[str, Any]) -> int:
    """GPU memory one placed replica (plan JSON) is planned to use: the sum of its per-GPU totals
    (weights, KV cache, activations, CUDA context and headroom on each of its GPUs; every rank of every
    pod of a multi-node group), else of its GPU budgets. Offloaded weights are not in it (``offloaded``
    says where they go)."""
    group = replica.get("group")
    if isinstance(group, Mapping) and group.get("ranks"):  # every pod of a multi-node replica
        return sum(int(r.get("total") or 0) for r in group["ranks"] if isinstance(r, Mapping))
    per_gpu = replica.get("perGpu")
    if per_gpu:
        return sum(int(g.get("total") or 0) for g in per_gpu if isinstance(g, Mapping))
    return sum(int(v) for k, v in (replica.get("maxMemory") or {}).items() if str(k).isdigit())


def vram_per_replica(plan: Mapping[str, Any]) -> int | None:
    """The one per-replica GPU memory figure (``kubevram plan``'s PER REPLICA, ``status.vramPerReplica``,
    the ``Planned`` condition and events): its first placed replica's, else the estimate's total."""
    replicas = plan.get("replicas") or []
    if replicas:
        return replica_gpu_bytes(replicas[0])
    total = (plan.get("estimate") or {}).get("totalBytes")
    return int(total) if total else None


def offloaded(replica: Mapping[str, Any]) -> dict[str, int]:
    """``{"cpu" | "disk": bytes}``: what the replica's budgets put off its GPUs."""
    budgets = replica.get("maxMemory") or {}
    return {where: int(budgets[where]) for where in ("cpu", "disk") if budgets.get(where)}


@dataclass(frozen=True)
class GroupPod:
    """One pod of a multi-node replica: its node and the node's GPUs it takes whole."""

    node: str
    gpus: tuple[int, ...]
    reservation: dict[int, int]  # node GPU index -> bytes
    product: str

    def to_json(self, index: int) -> dict[str, Any]:
        return {"index": index, "node": self.node, "gpus": list(self.gpus),
                "reservation": {str(k): v for k, v in sorted(self.reservation.items())},
                "gpuProduct": self.product}


@dataclass
class PlacedReplica:
    """One replica: on one node, or (``group``) one pod per node of a multi-node group, whose pod 0 (the
    leader) is ``node``/``gpus``/``reservation``."""

    node: str
    gpus: list[int]  # node GPU indices
    plan: ReplicaPlan
    shared: bool
    resource: str
    reservation: dict[int, int]  # node GPU index -> bytes this replica holds there
    product: str
    group: GroupPlan | None = None
    pods: tuple[GroupPod, ...] = ()
    device_kind: str = "gpu"  # the kind of its devices: gpu | timeslice (VRAM slices) | mig | mps

    def to_json(self) -> dict[str, Any]:
        out = {
            "node": self.node,
            "gpus": list(self.gpus),
            **self.plan.to_json(),
            "shared": self.shared,
            "resource": self.resource,
            "reservation": {str(k): v for k, v in sorted(self.reservation.items())},
            "gpuProduct": self.product,
            "deviceKind": self.device_kind,
        }
        if self.group is not None:
            out["group"] = {**self.group.to_json(), "pods": [p.to_json(i) for i, p in enumerate(self.pods)]}
        return out


@dataclass
class DeploymentPlan:
    name: str
    namespace: str
    estimate: Estimate | None = None
    replicas: list[PlacedReplica] = field(default_factory=list)
    unscheduled: int = 0
    reason: str | None = None
    autoscaling: dict[str, Any] | None = None
    error: SpecError | None = None
    resource_api: str = "devicePlugin"  # how the inventory was read: devicePlugin | dra
    host: HostNeed | None = None  # what each worker pod requests of its node besides GPUs

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "resourceAPI": self.resource_api,
            "estimate": self.estimate.to_json() if self.estimate is not None else None,
            "host": self.host.to_json() if self.host is not None else None,
            "replicas": [r.to_json() for r in self.replicas],
            "unscheduled": {
                "count": self.unscheduled,
                "reason": self.reason if self.unscheduled else None,
                "autoscaling": self.autoscaling if self.unscheduled else None,
            },
        }
        if self.error is not None:
            out["error"] = {"field": self.error.field, "message": self.error.message}
        return out


@dataclass
class ClusterPlan:
    deployments: list[DeploymentPlan]
    warnings: list[str]
    inventory: Inventory

    def by_key(self) -> dict[tuple[str, str], DeploymentPlan]:
        return {d.key: d for d in self.deployments}

    def to_json(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.deployments]


# ----------------------------------------------------------------------------------------- demands


@dataclass
class _Demand:
    plan: DeploymentPlan
    facts: ModelFacts
    workload: Workload
    replicas: int
    strategy: str
    offload: str
    shared: bool
    spread: bool
    gpus_per_replica: int
    multi_node: str
    max_group_size: int
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    order: int
    host: HostNeed
    _need: dict[int, int] = field(default_factory=dict)
    _fewest: dict[tuple[int, int], int | None] = field(default_factory=dict)
    _shapes: dict[tuple[int, int], list[tuple[int, int, GroupPlan]]] = field(default_factory=dict)
    _constraints: tuple[Any, ...] | None = None

    def need(self, n: int) -> int:
        if n not in self._need:
            self._need[n] = min_per_gpu_bytes(self.facts, self.workload, n)
        return self._need[n]

    def counts(self, limit: int) -> range:
        """GPU counts to consider on a device class offering at most ``limit`` devices."""
        if self.gpus_per_replica:
            n = self.gpus_per_replica
            return range(n, n + 1 if n <= limit else 0)
        return range(1, min(limit, MAX_GPUS_PER_REPLICA) + 1)

    def fewest(self, device_bytes: int, limit: int) -> int | None:
        """The fewest GPUs of ``device_bytes`` each (at most ``limit``) that hold one replica."""
        key = (device_bytes, limit)
        if key not in self._fewest:
            self._fewest[key] = None
            for n in self.counts(limit):
                if self.floor(n) > device_bytes:
                    continue
                if self.need(n) <= device_bytes:
                    self._fewest[key] = n
                    break
        return self._fewest[key]

    def groups(self) -> bool:
        """Whether this deployment's replicas may be groups of pods at all."""
        return self.multi_node != "never" and not self.shared and not why_no_group(self.facts, self.workload)

    def group_shapes(self, device_bytes: int, per_node: int) -> list[tuple[int, int, GroupPlan]]:
        """(pods, GPUs per pod, plan) of every group of GPUs of ``device_bytes`` (at most ``per_node`` per
        pod) that holds one replica, fewest GPUs first, then fewest pods."""
        key = (-device_bytes, per_node)
        if key not in self._shapes:
            est = self.plan.estimate
            spread = (est.weightsBytes + est.kvCacheBytes) if est is not None else 0
            shapes = []
            for pods in range(2, self.max_group_size + 1):
                for per_pod in range(1, per_node + 1):
                    n = pods * per_pod
                    if self.gpus_per_replica and n != self.gpus_per_replica:
                        continue
                    if spread / n + self.workload.overhead_per_gpu > device_bytes:
                        continue  # the weights and KV alone do not fit
                    plan = plan_group(self.facts, self.workload, device_bytes, pods, per_pod)
                    if plan is not None:
                        shapes.append((n, pods, per_pod, plan))
            shapes.sort(key=lambda s: s[:3])
            self._shapes[key] = [(pods, per_pod, plan) for _, pods, per_pod, plan in shapes]
        return self._shapes[key]

    def floor(self, n: int) -> float:
        """A cheap lower bound of ``need(n)``: n GPUs hold all weights and KV plus n overheads, so one of
        them holds at least (weights + KV) / n + overhead (90 % of it, on the safe side of rounding)."""
        est = self.plan.estimate
        spread = 0.9 * (est.weightsBytes + est.kvCacheBytes) if est is not None else 0.0
        return spread / n + self.workload.overhead_per_gpu

    @property
    def constraints(self) -> tuple[Any, ...]:
        if self._constraints is None:
            tol = tuple(sorted(tuple(sorted((k, str(v)) for k, v in t.items())) for t in self.tolerations))
            self._constraints = (tuple(sorted(self.node_selector.items())), tol)
        return self._constraints


# A device class on one node: (kind, bytes per device, resource, slots per device).
_ClassKey = tuple[str, int, str, int]


def _classes(node: NodeInventory) -> dict[_ClassKey, list[int]]:
    out: dict[_ClassKey, list[int]] = {}
    for d in node.devices:
        out.setdefault((d.kind, d.memory_bytes, d.resource, d.slots), []).append(d.index)
    return out


@dataclass
class _Choice:
    node: NodeInventory
    indices: list[int]
    taken: int  # VRAM the replica takes (ranking)
    device_bytes: int
    n: int
    resource: str
    free_after: int  # devices (or bytes) of the class still free on the node after it (binpack: fewer first)


def _whole_free(node: NodeInventory, indices: Sequence[int]) -> list[int]:
    """Devices among ``indices`` nobody holds any part of."""
    return [i for i in indices if i not in node.held_whole and not node.slots_used.get(i, 0)
            and not node.committed.get(i, 0)]


class _Pool:
    """The nodes that admit one set of constraints (selector, tolerations), indexed by device class.

    Whole-device classes (plain GPUs, MIG devices) keep each node in a bucket by its *room*: the devices
    of the class it can still hand out (free devices, capped by allocatable minus what is held). Best fit
    is then the first non-empty bucket with room >= n. Time-sliced classes are scanned (few nodes).
    """

    def __init__(self, nodes: Sequence[NodeInventory], classes: Mapping[str, Mapping[_ClassKey, list[int]]],
                 refused: dict[str, list[str]]) -> None:
        self.nodes = list(nodes)
        self.refused = refused
        self.classes = classes
        self.buckets: dict[_ClassKey, dict[int, set[str]]] = {}
        self.room: dict[tuple[str, _ClassKey], int] = {}
        self.sliced: dict[_ClassKey, list[NodeInventory]] = {}
        self.max_devices: dict[_ClassKey, int] = {}
        self.by_name = {n.name: n for n in self.nodes}
        for node in self.nodes:
            for ck, indices in classes[node.name].items():
                per_replica = 1 if ck[0] in PARTITION_KINDS else len(indices)
                self.max_devices[ck] = max(self.max_devices.get(ck, 0), per_replica)
                if ck[0] == "timeslice":
                    self.sliced.setdefault(ck, []).append(node)
                else:
                    room = self._room(node, ck)
                    self.room[(node.name, ck)] = room
                    self.buckets.setdefault(ck, {}).setdefault(room, set()).add(node.name)

    def _room(self, node: NodeInventory, ck: _ClassKey) -> int:
        free = len(_whole_free(node, self.classes[node.name][ck]))
        return max(0, min(free, node.requestable(ck[2])))

    def refresh(self, node: NodeInventory) -> None:
        """Re-bucket ``node`` after something was committed on it."""
        for ck in self.classes[node.name]:
            if ck[0] == "timeslice":
                continue
            old, new = self.room[(node.name, ck)], self._room(node, ck)
            if old != new:
                self.buckets[ck][old].discard(node.name)
                self.buckets[ck].setdefault(new, set()).add(node.name)
                self.room[(node.name, ck)] = new

    def whole_candidates(self, ck: _ClassKey, n: int, spread: bool, used: set[str]) -> tuple[int, str] | None:
        """(room, node name) of the best node with room >= n: binpack the least room, spread the most."""
        buckets = self.buckets.get(ck, {})
        rooms = sorted((r for r, names in buckets.items() if r >= n and names), reverse=spread)
        for r in rooms:
            names = self.buckets[ck][r]
            if spread and used:
                names = names - used
            if names:
                return r, min(names)
        return None


class _Planner:
    def __init__(self, inventory: Inventory) -> None:
        self.inv = inventory
        self.nodes = inventory.nodes
        self.classes = {n.name: _classes(n) for n in self.nodes}
        self.biggest_device = max((dev.memory_bytes for n in self.nodes for dev in n.devices), default=0)
        self._pools: dict[tuple[Any, ...], _Pool] = {}
        self._host_refused: dict[HostNeed, dict[str, str]] = {}
        self._plans: dict[tuple[Any, ...], ReplicaPlan | NoFit] = {}
        self._failed: dict[tuple[Any, ...], str] = {}

    # -- which nodes admit a deployment's replicas
    def host_refused(self, host: HostNeed) -> dict[str, str]:
        """Node name -> why its allocatable memory or ephemeral-storage cannot take a pod of ``host``."""
        if host not in self._host_refused:
            self._host_refused[host] = {
                n.name: why for n in self.nodes if (why := refusal(n.cpu_memory_bytes, n.disk_bytes, host))
            }
        return self._host_refused[host]

    def pool(self, d: _Demand) -> _Pool:
        host = self.host_refused(d.host)
        key = (d.constraints, frozenset(host.items()))  # demands no node refuses for its host share a pool
        if key not in self._pools:
            ok: list[NodeInventory] = []
            refused: dict[str, list[str]] = {}
            for node in self.nodes:
                why = admits(node, d.node_selector, d.tolerations) or host.get(node.name, "")
                if why:
                    refused.setdefault(why, []).append(node.name)
                else:
                    ok.append(node)
            self._pools[key] = _Pool(ok, self.classes, refused)
        return self._pools[key]

    def rank(self, d: _Demand, c: _Choice) -> tuple[Any, ...]:
        fullness = -c.free_after if d.spread else c.free_after
        return (c.taken, c.device_bytes, fullness, c.node.name)

    def _sliced_choice(self, d: _Demand, node: NodeInventory, ck: _ClassKey) -> _Choice | None:
        """A VRAM slice of ``n`` time-sliced GPUs of one node: the fullest GPUs that still fit (best fit)."""
        _, mem, resource, slots = ck
        indices = self.classes[node.name][ck]
        room = node.requestable(resource)
        open_ = [i for i in indices if i not in node.held_whole and node.slots_used.get(i, 0) < slots]
        for n in d.counts(min(len(open_), room)):
            need = node.devices[indices[0]].slice_bytes(d.need(n))
            fits = sorted((node.free_bytes(i), i) for i in open_ if node.free_bytes(i) >= need)
            if len(fits) >= n:
                picked = sorted(i for _, i in fits[:n])
                left = sum(node.free_bytes(i) for i in open_) - n * need
                return _Choice(node, picked, n * need, mem, n, resource, left)
        return None

    # -- one replica
    def place(self, d: _Demand, used_nodes: set[str]) -> _Choice | None:
        """The best (node, devices) for one replica, by ``rank``; None when nothing fits."""
        pool = self.pool(d)
        best: _Choice | None = None
        for ck in pool.buckets:
            kind, mem, resource, _ = ck
            if kind == "gpu" and d.shared:
                continue
            n = d.fewest(mem, pool.max_devices[ck])
            if n is None:
                continue
            found = pool.whole_candidates(ck, n, d.spread, used_nodes)
            if found is None:
                continue
            room, name = found
            whole = _Choice(pool.by_name[name], [], n * mem, mem, n, resource, room - n)
            if best is None or self.rank(d, whole) < self.rank(d, best):
                best = whole
        if d.shared:
            for ck, nodes in pool.sliced.items():
                for node in nodes:
                    if d.spread and node.name in used_nodes:
                        continue
                    sliced = self._sliced_choice(d, node, ck)
                    if sliced is not None and (best is None or self.rank(d, sliced) < self.rank(d, best)):
                        best = sliced
        if best is not None and not best.indices:
            classes = self.classes[best.node.name]
            want = (best.device_bytes, best.resource)
            ck = next(k for k in classes if k[0] != "timeslice" and k[1:3] == want)
            best.indices = _whole_free(best.node, self.classes[best.node.name][ck])[: best.n]
        return best

    def replica_plan(self, d: _Demand, c: _Choice) -> ReplicaPlan | NoFit:
        sliced = c.node.devices[c.indices[0]].kind == "timeslice"
        sizes = (d.need(c.n),) * c.n if sliced else (c.device_bytes,) * c.n
        key = (d.facts, d.workload, d.strategy, sizes)
        if key not in self._plans:
            self._plans[key] = plan_replica(
                d.facts, d.workload, list(sizes), strategy=d.strategy, gpu_count=c.n
            )
        return self._plans[key]

    def commit(self, d: _Demand, c: _Choice, plan: ReplicaPlan) -> PlacedReplica:
        node = c.node
        reservation: dict[int, int] = {}
        for pod_index, node_index in enumerate(c.indices):
            if node.devices[node_index].kind == "timeslice":
                nbytes = min(d.need(c.n), max(plan.per_gpu[pod_index]["total"], 0))
                nbytes = node.devices[node_index].slice_bytes(nbytes)  # DRA: what the scheduler books
                node.add_slice(node_index, nbytes)
                reservation[node_index] = nbytes
            else:
                node.hold_whole(node_index)
                reservation[node_index] = node.devices[node_index].memory_bytes
        for pool in self._pools.values():
            if node.name in pool.by_name:
                pool.refresh(node)
        first = node.devices[c.indices[0]]
        return PlacedReplica(
            node.name, list(c.indices), plan, d.shared, c.resource, reservation,
            first.product or node.product, device_kind=first.kind,
        )

    # -- one replica over several nodes
    def single_node_possible(self, d: _Demand) -> bool:
        """Whether some admitting node, with all its devices of one class free, could hold a replica
        without offload (what ``multiNode: whenNeeded`` asks before grouping)."""
        pool = self.pool(d)
        for ck in pool.buckets:
            if not (ck[0] == "gpu" and d.shared) and d.fewest(ck[1], pool.max_devices[ck]) is not None:
                return True
        if d.shared:
            return any(
                d.fewest(ck[1], min(len(self.classes[n.name][ck]), n.allocatable.get(ck[2], 0))) is not None
                for ck, nodes in pool.sliced.items() for n in nodes
            )
        return False

    def group_possible(self, d: _Demand) -> bool:
        """Whether some group shape fits the admitting nodes of one class, all their GPUs free."""
        pool = self.pool(d)
        for ck, buckets in pool.buckets.items():
            if ck[0] != "gpu":
                continue
            nodes = sum(len(names) for names in buckets.values())
            if any(pods <= nodes for pods, _, _ in d.group_shapes(ck[1], pool.max_devices[ck])):
                return True
        return False

    def group_place(self, d: _Demand, used_nodes: set[str]) -> PlacedReplica | None:
        """One pod per node on ``pods`` nodes of one whole-GPU class: the shape taking the least VRAM (then
        the fewest pods, the smaller GPU), on the nodes ``binpack`` fills first (least room that fits),
        ``spread`` on nodes holding no replica of the deployment yet; ties by node name."""
        pool = self.pool(d)
        best: tuple[tuple[Any, ...], _ClassKey, int, GroupPlan, list[str]] | None = None
        for ck, buckets in pool.buckets.items():
            kind, mem, _, _ = ck
            if kind != "gpu":
                continue
            for pods, per_pod, plan in d.group_shapes(mem, pool.max_devices[ck]):
                rooms = sorted(
                    (room, name)
                    for room, names in buckets.items() if room >= per_pod
                    for name in names if not (d.spread and name in used_nodes)
                )
                if len(rooms) < pods:
                    continue
                chosen = [name for _, name in rooms[:pods]]
                key = (pods * per_pod * mem, mem, pods, chosen)
                if best is None or key < best[0]:
                    best = (key, ck, per_pod, plan, chosen)
                break  # the class's first shape that finds nodes is its best
        if best is None:
            return None
        _, ck, per_pod, plan, chosen = best
        group_pods = []
        for name in chosen:
            node = pool.by_name[name]
            indices = _whole_free(node, self.classes[name][ck])[:per_pod]
            for i in indices:
                node.hold_whole(i)
            for p in self._pools.values():
                if name in p.by_name:
                    p.refresh(node)
            held = {i: node.devices[i].memory_bytes for i in indices}
            group_pods.append(GroupPod(name, tuple(indices), held, node.product))
        leader = group_pods[0]
        pod0 = ReplicaPlan(tuple(range(per_pod)), {}, {}, plan.pod_budgets(0))
        return PlacedReplica(leader.node, list(leader.gpus), pod0, False, ck[2], dict(leader.reservation),
                             leader.product, plan, tuple(group_pods))

    def offload_place(self, d: _Demand, used_nodes: set[str]) -> PlacedReplica | None:
        """No GPU-only fit: the node with the most free whole-device memory; the map spills the rest."""
        if d.offload == "none" or d.shared:
            return None
        pool = self.pool(d)
        best: tuple[tuple[int, int, str], _ClassKey, int] | None = None
        for ck, buckets in pool.buckets.items():
            mem = ck[1]
            for room, names in buckets.items():
                n = d.gpus_per_replica or min(room, pool.max_devices[ck])
                candidates = names - used_nodes if d.spread else names
                if room <= 0 or n > room or not candidates:
                    continue
                key = (-mem * n, mem, min(candidates))
                if best is None or key < best[0]:
                    best = (key, ck, n)
        if best is None:
            return None
        (_, mem, name), ck, n = best
        node = pool.by_name[name]
        indices = _whole_free(node, self.classes[name][ck])[:n]
        cpu_bytes, disk_bytes = offload_room(node.cpu_memory_bytes, node.disk_bytes, d.host)
        plan = plan_replica(d.facts, d.workload, [mem] * n, strategy=d.strategy, gpu_count=n,
                            offload=d.offload, cpu_bytes=cpu_bytes, disk_bytes=disk_bytes)
        if not isinstance(plan, ReplicaPlan):
            return None
        return self.commit(d, _Choice(node, indices, mem * n, mem, n, ck[2], 0), plan)

    # -- why not, with numbers
    def group_need(self, d: _Demand, device_bytes: int, per_node: int) -> str:
        """What a group of GPUs of ``device_bytes`` (``per_node`` a node) would take, or why no group can
        be made ('' when there is nothing to say)."""
        why = why_no_group(d.facts, d.workload)
        if why:
            return why if d.multi_node == "always" else ""
        shapes = d.group_shapes(device_bytes, per_node) if device_bytes else []
        if not shapes:
            return ""
        pods, per_pod, plan = shapes[0]
        lay = plan.layout
        return (f"a group of {pods} pods x {per_pod} GPU{'s' if per_pod > 1 else ''} with >= "
                f"{_gib(plan.peak)} each (tensor parallel {lay.tp} x {lay.pp} pipeline stages)")

    def reason(self, d: _Demand, used_nodes: set[str], biggest_gpu: int = 0) -> str:
        """Why ``d``'s next replica fits nowhere: the per-GPU need for a few GPU counts (those a GPU of
        ``biggest_gpu`` bytes could meet, when any), the most memory free on a device, excluded nodes."""
        counts = d.counts(8 if not d.gpus_per_replica else d.gpus_per_replica)
        options: list[int] = []
        for n in counts:
            if len(options) == 3:
                break
            if d.floor(n) > biggest_gpu or d.need(n) > biggest_gpu:
                continue  # no GPU anywhere has that much
            if not options or d.need(n) < d.need(options[-1]):
                options.append(n)
        options = options or list(counts)[-1:]
        needs = " or ".join(
            f"{n}{(' GPUs' if n > 1 else ' GPU') if i == 0 else ''} with >= {_gib(d.need(n))}"
            for i, n in enumerate(options[:3])
        )
        parts = [f"needs {'a VRAM slice of ' if d.shared else ''}{needs}"]
        if d.multi_node != "never" and not d.shared and not self.single_node_possible(d):
            # a group of the cluster's own largest GPUs (the autoscaling signal names a class to add)
            device = self.biggest_device or biggest_gpu
            per_node = max((len(n.devices) for n in self.nodes
                            if any(dev.memory_bytes == device for dev in n.devices)), default=NEEDED_UP_TO)
            group = self.group_need(d, device, per_node)
            if group:
                parts[0] += f", or {group}"
        pool = self.pool(d)
        largest: tuple[int, int, str] | None = None  # (bytes, devices, node): the most memory free
        compatible = False

        def consider(nbytes: int, count: int, name: str) -> None:
            nonlocal largest
            if nbytes > 0 and count > 0 and (
                largest is None or (-nbytes, -count, name) < (-largest[0], -largest[1], largest[2])
            ):
                largest = (nbytes, count, name)

        for ck, buckets in pool.buckets.items():
            if ck[0] == "gpu" and d.shared:
                continue
            compatible = True
            for room, names in buckets.items():
                candidates = names - used_nodes if d.spread else names
                if room > 0 and candidates:
                    consider(ck[1], min(room, pool.max_devices[ck]), min(candidates))
        if d.shared:
            for ck, nodes in pool.sliced.items():
                compatible = True
                for node in nodes:
                    if (d.spread and node.name in used_nodes) or node.requestable(ck[2]) <= 0:
                        continue
                    frees = [node.free_bytes(i) for i in self.classes[node.name][ck]
                             if _open(node, node.devices[i])]
                    if frees:
                        consider(max(frees), frees.count(max(frees)), node.name)
        if largest is not None:
            parts.append(f"largest free: {largest[1]} x {_gib(largest[0])} on {largest[2]}")
        elif pool.nodes and not compatible and d.shared:
            parts.append("no admitting node shares GPUs (nvidia.com/gpu.replicas > 1, MPS or MIG)")
        elif pool.nodes and compatible:
            parts.append("every admitting GPU is taken")
        if d.spread and used_nodes:
            parts.append(f"spread: {len(used_nodes)} node(s) already hold a replica")
        if not self.nodes:
            parts.append("the cluster has no GPU nodes")
        elif pool.refused:
            shown = "; ".join(
                f"{len(names)} {why} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for why, names in sorted(pool.refused.items())
            )
            parts.append(f"{sum(len(v) for v in pool.refused.values())} node(s) excluded: {shown}")
        return "; ".join(parts)


def _open(node: NodeInventory, device: Device) -> bool:
    return node.slots_used.get(device.index, 0) < device.slots


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


# --------------------------------------------------------------------------------------- signals


def autoscaling_signal(d: _Demand, classes: Sequence[NodeClass]) -> dict[str, Any]:
    """The smallest class (VRAM taken = GPUs x memory, then memory) that holds one pending replica: on one
    node, or, where the deployment allows groups and no node of any class holds it (``always``: first),
    on ``nodeCount`` nodes of the class with ``gpuCount`` GPUs each."""
    selector = [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(d.node_selector.items())]
    if d.shared:  # a VRAM slice needs a GPU that is shared (time-sliced)
        selector.append({"key": LABEL_REPLICAS, "operator": "Gt", "values": ["1"]})
    matching = [cls for cls in classes if _class_matches(cls, d.node_selector)]
    best: tuple[tuple[int, int, str], NodeClass, int] | None = None
    if not (d.groups() and d.multi_node == "always"):
        for cls in matching:
            n = d.fewest(cls.gpu_memory_mib * MiB, cls.gpus_per_node)
            if n is None:
                continue
            key = (n * cls.gpu_memory_mib, cls.gpu_memory_mib, cls.name)
            if best is None or key < best[0]:
                best = (key, cls, n)
    if best is not None:
        _, cls, n = best
        mib = math.ceil(d.need(n) / MiB)
        return {
            "gpuClass": cls.name,
            "gpuProduct": cls.gpu_product,
            "minGpuMemoryMiB": mib,
            "gpuCount": n,
            "nodeCount": 1,
            "nodeAffinity": _affinity(mib, n) + selector,
        }
    grouped: tuple[tuple[int, int, str], NodeClass, int, int, int] | None = None
    if d.groups():
        for cls in matching:
            shapes = d.group_shapes(cls.gpu_memory_mib * MiB, cls.gpus_per_node)
            if not shapes:
                continue
            pods, per_pod, plan = shapes[0]
            key = (pods * per_pod * cls.gpu_memory_mib, cls.gpu_memory_mib, cls.name)
            if grouped is None or key < grouped[0]:
                grouped = (key, cls, pods, per_pod, plan.peak)
    if grouped is not None:
        _, cls, pods, per_pod, peak = grouped
        mib = math.ceil(peak / MiB)
        return {
            "gpuClass": cls.name,
            "gpuProduct": cls.gpu_product,
            "minGpuMemoryMiB": mib,
            "gpuCount": per_pod,
            "nodeCount": pods,
            "nodeAffinity": _affinity(mib, per_pod) + selector,
        }
    n = d.gpus_per_replica or 1
    mib = math.ceil(d.need(n) / MiB)
    return {
        "gpuClass": None,
        "gpuProduct": None,
        "minGpuMemoryMiB": mib,
        "gpuCount": n,
        "nodeCount": 1,
        "nodeAffinity": _affinity(mib, n) + selector,
        "message": f"no node class{' matching spec.placement.nodeSelector' if d.node_selector else ''} "
        f"holds a replica; {n} GPU(s) with >= {mib} MiB each would",
    }


def _class_matches(cls: NodeClass, node_selector: Mapping[str, str]) -> bool:
    """Whether nodes of ``cls`` can carry the GPU labels a deployment's ``nodeSelector`` asks for."""
    own = {LABEL_PRODUCT: cls.gpu_product, LABEL_MEMORY: str(cls.gpu_memory_mib),
           LABEL_COUNT: str(cls.gpus_per_node)}
    return all(node_selector[key] == value for key, value in own.items() if key in node_selector)


def _affinity(mib: int, n: int) -> list[dict[str, Any]]:
    """NodeSelectorRequirements: GPUs of at least ``mib`` MiB (``Gt`` is strict), at least ``n`` of them."""
    reqs: list[dict[str, Any]] = [{"key": LABEL_MEMORY, "operator": "Gt", "values": [str(mib - 1)]}]
    if n > 1:
        reqs.append({"key": LABEL_COUNT, "operator": "Gt", "values": [str(n - 1)]})
    return reqs


# ------------------------------------------------------------------------------------------ entry


FactsResolver = Callable[[LLMDeployment, Mapping[str, Any] | None], ModelFacts]


def plan_cluster(
    deployments: Sequence[LLMDeployment],
    nodes: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]] = (),
    *,
    configs: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
    model_config: Mapping[str, Any] | None = None,
    node_classes: Sequence[Mapping[str, Any]] | None = None,
    resolve: FactsResolver | None = None,
    reservations: Sequence[Reservation] = (),
    dra: DraInput | None = None,
) -> ClusterPlan:
    """Place every replica of ``deployments`` on ``nodes`` (Node objects) given what ``pods`` and
    ``reservations`` (the operator's ledger: decided, maybe not visible in the API yet) hold.
    With ``dra`` the GPUs are the devices its ResourceSlices publish (``kubevram.planner.dra``) minus what
    its allocated ResourceClaims hold, instead of the nodes' GFD labels and the pods' GPU requests.

    ``configs`` maps (namespace, name) to the config.json read from the deployment's ConfigMap;
    ``model_config`` (``--model-config``) serves every deployment without its own. A deployment whose
    facts cannot be had gets ``error`` and no replicas; the others are planned as usual. The result
    lists the deployments in input order.
    """
    resolve = resolve or resolve_facts
    configs = configs or {}
    plans: list[DeploymentPlan] = []
    demands: list[_Demand] = []
    # Duplicate (namespace, name): the first by content is planned, the others get an error.
    by_key: dict[tuple[str, str], list[int]] = {}
    for i, dep in enumerate(deployments):
        by_key.setdefault((dep.namespace, dep.name), []).append(i)
    duplicate: set[int] = set()
    for same in by_key.values():
        if len(same) > 1:
            same.sort(key=lambda i: deployments[i].model_dump_json())
            duplicate.update(same[1:])
    for i, dep in enumerate(deployments):
        plan = DeploymentPlan(dep.name, dep.namespace)
        plans.append(plan)
        if i in duplicate:
            plan.error = SpecError("metadata.name", f"{plan.namespace}/{plan.name} is listed twice")
            continue
        spec = dep.spec
        try:
            facts = resolve(dep, configs.get(plan.key, model_config))
            workload = Workload.from_spec(spec, deployment_coefficient(dep))
            plan.estimate = _estimate(facts, workload)
            plan.host = host = host_need(spec, facts, plan.estimate)
        except SpecError as exc:
            plan.error = exc
            continue
        except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
            plan.error = SpecError("spec.model", f"cannot plan: {exc}")
            continue
        p = spec.placement
        demands.append(
            _Demand(
                plan=plan,
                facts=facts,
                workload=workload,
                replicas=spec.replicas,
                strategy=str(p.strategy),
                offload=str(p.offload),
                shared=str(p.sharing) == "shared",
                spread=str(p.packing) == "spread",
                gpus_per_replica=p.gpusPerReplica,
                multi_node=str(p.multiNode),
                max_group_size=p.maxGroupSize,
                node_selector=dict(p.nodeSelector),
                tolerations=[*(t.model_dump(exclude_none=True) for t in p.tolerations), GPU_TOLERATION],
                order=i,
                host=host,
            )
        )

    replanned = [d.plan.key for d in demands]
    if dra is not None:
        inventory = build_dra_inventory(nodes, dra.slices, dra.claims, driver=dra.driver, replanned=replanned,
                                        reservations=reservations)
        for plan in plans:
            plan.resource_api = "dra"
    else:
        inventory = build_inventory(nodes, pods, replanned=replanned, reservations=reservations)
    warnings = list(inventory.warnings)
    classes = parse_node_classes(node_classes, warnings) or KNOWN_PRODUCTS
    planner = _Planner(inventory)
    demands.sort(key=lambda d: (-(d.plan.estimate.totalBytes if d.plan.estimate else 0), d.plan.namespace,
                                d.plan.name))
    for d in demands:
        try:
            _plan_deployment(planner, d, classes)
        except (SpecError, ValueError) as exc:
            d.plan.replicas, d.plan.unscheduled = [], 0
            d.plan.error = exc if isinstance(exc, SpecError) else SpecError("spec", str(exc))
    return ClusterPlan(plans, warnings, inventory)


def _plan_deployment(planner: _Planner, d: _Demand, classes: Sequence[NodeClass]) -> None:
    used: set[str] = set()
    fail_key = (d.facts, d.workload, d.strategy, d.offload, d.shared, d.gpus_per_replica, d.multi_node,
                d.max_group_size, d.constraints, d.host)
    for placed_count in range(d.replicas):
        # Capacity only shrinks while planning: what failed for an identical demand fails again (unless
        # spread, whose candidates depend on the deployment's own replicas).
        if not d.spread and fail_key in planner._failed:
            d.plan.unscheduled = d.replicas - placed_count
            d.plan.reason = planner._failed[fail_key]
            break
        replica: PlacedReplica | None = None
        grouped = d.groups() and (d.multi_node == "always" or not planner.single_node_possible(d))
        if grouped:
            replica = planner.group_place(d, used)
        else:
            choice = planner.place(d, used)
            if choice is not None:
                rp = planner.replica_plan(d, choice)
                if isinstance(rp, ReplicaPlan):
                    replica = planner.commit(d, choice, rp)
        # A deployment that runs as groups does not mix in offloaded single-node replicas (its Service
        # selects group leaders), unless no group could ever form on this cluster.
        if replica is None and not (grouped and planner.group_possible(d)):
            replica = planner.offload_place(d, used)
        if replica is None:
            d.plan.unscheduled = d.replicas - placed_count
            biggest = max([planner.biggest_device, *(c.gpu_memory_mib * MiB for c in classes)])
            d.plan.reason = planner.reason(d, used, biggest)
            if not d.spread:
                planner._failed[fail_key] = d.plan.reason
            break
        d.plan.replicas.append(replica)
        used.update([replica.node, *(p.node for p in replica.pods)])
    if d.plan.unscheduled:
        d.plan.autoscaling = autoscaling_signal(d, classes)


__all__ = [
    "KNOWN_PRODUCTS",
    "ClusterPlan",
    "DeploymentPlan",
    "DraInput",
    "GroupPod",
    "NodeClass",
    "PlacedReplica",
    "autoscaling_signal",
    "offloaded",
    "parse_node_classes",
    "plan_cluster",
    "replica_gpu_bytes",
    "vram_per_replica",
]
