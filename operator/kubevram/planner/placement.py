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
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.api.quantity import GiB, MiB
from kubevram.api.v1alpha1 import LLMDeployment
from kubevram.planner.devicemap import NoFit, ReplicaPlan, min_per_gpu_bytes, plan_replica
from kubevram.planner.estimate import Estimate, Workload, estimate
from kubevram.planner.facts import ModelFacts
from kubevram.planner.inventory import (
    LABEL_COUNT,
    LABEL_MEMORY,
    Device,
    Inventory,
    NodeInventory,
    admits,
    build_inventory,
)
from kubevram.planner.report import resolve_facts

MAX_GPUS_PER_REPLICA = 16
# Every worker pod tolerates the GPU taint (the operator renders it; Kubernetes' ExtendedResourceToleration
# admission plugin adds it to any pod requesting nvidia.com/gpu).
GPU_TOLERATION: dict[str, Any] = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _min_per_gpu(facts: ModelFacts, workload: Workload, n: int) -> int:
    """Bytes each of ``n`` equal GPUs needs for one replica (the same for every strategy on equal GPUs)."""
    try:
        return min_per_gpu_bytes(facts, workload, n)
    except SpecError:  # TEMPORARY: devicemap's argument check rejects every call (reported); same numbers
        from kubevram.planner import devicemap

        return int(devicemap._min_per_gpu(facts, workload, max(1, n)))


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


@dataclass
class PlacedReplica:
    node: str
    gpus: list[int]  # node GPU indices
    plan: ReplicaPlan
    shared: bool
    resource: str
    reservation: dict[int, int]  # node GPU index -> bytes this replica holds there
    product: str

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "gpus": list(self.gpus),
            **self.plan.to_json(),
            "shared": self.shared,
            "resource": self.resource,
            "reservation": {str(k): v for k, v in sorted(self.reservation.items())},
            "gpuProduct": self.product,
        }


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

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "estimate": self.estimate.to_json() if self.estimate is not None else None,
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
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    order: int
    _need: dict[int, int] = field(default_factory=dict)

    def need(self, n: int) -> int:
        if n not in self._need:
            self._need[n] = _min_per_gpu(self.facts, self.workload, n)
        return self._need[n]

    def counts(self, limit: int) -> range:
        """GPU counts to consider on a device class offering at most ``limit`` devices."""
        if self.gpus_per_replica:
            n = self.gpus_per_replica
            return range(n, n + 1 if n <= limit else 0)
        return range(1, min(limit, MAX_GPUS_PER_REPLICA) + 1)

    def fewest(self, device_bytes: int, limit: int) -> int | None:
        """The fewest GPUs of ``device_bytes`` each (at most ``limit``) that hold one replica."""
        for n in self.counts(limit):
            if self.need(n) <= device_bytes:
                return n
        return None

    @property
    def constraints(self) -> tuple[Any, ...]:
        tol = tuple(sorted(tuple(sorted((k, str(v)) for k, v in t.items())) for t in self.tolerations))
        return (tuple(sorted(self.node_selector.items())), tol)


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
    free_after: int  # devices of the class still free on the node (binpack: fewer is better)


class _Planner:
    def __init__(self, inventory: Inventory) -> None:
        self.inv = inventory
        self.nodes = inventory.nodes
        self.classes = {n.name: _classes(n) for n in self.nodes}
        self._admitting: dict[tuple[Any, ...], tuple[list[NodeInventory], dict[str, list[str]]]] = {}
        self._plans: dict[tuple[Any, ...], ReplicaPlan | NoFit] = {}
        self._failed: dict[tuple[Any, ...], str] = {}

    # -- which nodes admit a deployment's replicas
    def admitting(self, d: _Demand) -> tuple[list[NodeInventory], dict[str, list[str]]]:
        key = d.constraints
        if key not in self._admitting:
            ok: list[NodeInventory] = []
            refused: dict[str, list[str]] = {}
            for node in self.nodes:
                why = admits(node, d.node_selector, d.tolerations)
                if why:
                    refused.setdefault(why, []).append(node.name)
                else:
                    ok.append(node)
            self._admitting[key] = (ok, refused)
        return self._admitting[key]

    def free_devices(self, node: NodeInventory, indices: list[int]) -> list[int]:
        return [i for i in indices if i not in node.held_whole and node.committed.get(i, 0) == 0
                and node.slots_used.get(i, 0) == 0]

    # -- candidates on one node
    def best_on_node(self, d: _Demand, node: NodeInventory) -> _Choice | None:
        best: _Choice | None = None
        for (kind, mem, resource, slots), indices in self.classes[node.name].items():
            choice: _Choice | None = None
            if (kind == "gpu" and not d.shared) or kind == "mig":
                limit = 1 if kind == "mig" else len(indices)
                free = self.free_devices(node, indices)
                room = min(len(free), node.requestable(resource))
                if room <= 0:
                    continue
                n = d.fewest(mem, min(limit, room))
                if n is None:
                    continue
                choice = _Choice(node, free[:n], n * mem, mem, n, resource, room - n)
            elif kind == "timeslice" and d.shared:
                room = node.requestable(resource)
                open_ = [i for i in indices if i not in node.held_whole and node.slots_used.get(i, 0) < slots]
                for n in d.counts(min(len(open_), room)):
                    need = d.need(n)
                    fits = sorted((node.free_bytes(i), i) for i in open_ if node.free_bytes(i) >= need)
                    if len(fits) >= n:
                        picked = sorted(i for _, i in fits[:n])
                        left = sum(node.free_bytes(i) for i in open_) - n * need
                        choice = _Choice(node, picked, n * need, mem, n, resource, left)
                        break
            if choice is not None and (best is None or self.rank(d, choice) < self.rank(d, best)):
                best = choice
        return best

    def rank(self, d: _Demand, c: _Choice) -> tuple[Any, ...]:
        fullness = -c.free_after if d.spread else c.free_after
        return (c.taken, c.device_bytes, fullness, c.node.name, c.indices)

    # -- one replica
    def place(self, d: _Demand, used_nodes: set[str]) -> _Choice | None:
        ok, _ = self.admitting(d)
        best: _Choice | None = None
        for node in ok:
            if d.spread and node.name in used_nodes:
                continue
            c = self.best_on_node(d, node)
            if c is not None and (best is None or self.rank(d, c) < self.rank(d, best)):
                best = c
        return best

    def replica_plan(self, d: _Demand, c: _Choice) -> ReplicaPlan | NoFit:
        sizes = (c.device_bytes,) * c.n if not d.shared or c.node.devices[c.indices[0]].kind == "mig" else (
            (d.need(c.n),) * c.n)
        key = (d.facts, d.workload, d.strategy, sizes)
        if key not in self._plans:
            self._plans[key] = plan_replica(
                d.facts, d.workload, list(sizes), strategy=d.strategy, gpu_count=c.n
            )
        return self._plans[key]

    def commit(self, d: _Demand, c: _Choice, plan: ReplicaPlan) -> PlacedReplica:
        node = c.node
        reservation: dict[int, int] = {}
        slice_ = node.devices[c.indices[0]].kind == "timeslice"
        for pod_index, node_index in enumerate(c.indices):
            if slice_:
                nbytes = min(d.need(c.n), max(plan.per_gpu[pod_index]["total"], 0))
                node.committed[node_index] = node.committed.get(node_index, 0) + nbytes
                node.slots_used[node_index] = node.slots_used.get(node_index, 0) + 1
                reservation[node_index] = nbytes
            else:
                node.held_whole.add(node_index)
                reservation[node_index] = node.devices[node_index].memory_bytes
        return PlacedReplica(
            node.name, list(c.indices), plan, d.shared, c.resource, reservation, node.product
        )

    def offload_place(self, d: _Demand, used_nodes: set[str]) -> PlacedReplica | None:
        """No GPU-only fit: the node with the largest free whole devices, the rest spilled."""
        if d.offload == "none" or d.shared:
            return None
        ok, _ = self.admitting(d)
        best: tuple[Any, ...] | None = None
        for node in ok:
            if d.spread and node.name in used_nodes:
                continue
            for (kind, mem, resource, _slots), indices in self.classes[node.name].items():
                if kind not in ("gpu", "mig"):
                    continue
                free = self.free_devices(node, indices)
                room = min(len(free), node.requestable(resource), 1 if kind == "mig" else len(free))
                n = d.gpus_per_replica or room
                if room <= 0 or n > room:
                    continue
                key = (-mem * n, mem, node.name)
                if best is None or key < best[0]:
                    best = (key, node, free[:n], mem, resource)
        if best is None:
            return None
        _, node, indices, mem, resource = best
        plan = plan_replica(d.facts, d.workload, [mem] * len(indices), strategy=d.strategy,
                            gpu_count=len(indices), offload=d.offload, cpu_bytes=node.cpu_memory_bytes,
                            disk_bytes=node.disk_bytes)
        if not isinstance(plan, ReplicaPlan):
            return None
        choice = _Choice(node, list(indices), mem * len(indices), mem, len(indices), resource, 0)
        return self.commit(d, choice, plan)

    # -- why not, with numbers
    def reason(self, d: _Demand, used_nodes: set[str]) -> str:
        options: list[int] = []
        for n in d.counts(8 if not d.gpus_per_replica else d.gpus_per_replica):
            if not options or d.need(n) < d.need(options[-1]):
                options.append(n)
        needs = " or ".join(
            f"{n}{(' GPUs' if n > 1 else ' GPU') if i == 0 else ''} with >= {_gib(d.need(n))}"
            for i, n in enumerate(options[:3])
        )
        mode = "a VRAM slice of " if d.shared else ""
        parts = [f"needs {mode}{needs}"]
        ok, refused = self.admitting(d)
        kinds = ("timeslice", "mig") if d.shared else ("gpu", "mig")
        largest: tuple[int, int, str] | None = None  # (bytes, count, node)
        compatible = 0
        for node in ok:
            if d.spread and node.name in used_nodes:
                continue
            devices = [d_ for d_ in node.devices if d_.kind in kinds and node.requestable(d_.resource) > 0]
            if any(dev.kind in kinds for dev in node.devices):
                compatible += 1
            if d.shared:
                frees = [node.free_bytes(x.index) for x in devices if _open(node, x)]
            else:
                frees = [dev.memory_bytes for dev in devices if self.free_devices(node, [dev.index])]
            frees = [f for f in frees if f > 0]
            if frees:
                top = max(frees)
                cand = (top, frees.count(top), node.name)
                if largest is None or (-cand[0], -cand[1], cand[2]) < (-largest[0], -largest[1], largest[2]):
                    largest = cand
        if largest is not None and largest[0] > 0:
            parts.append(f"largest free: {largest[1]} x {_gib(largest[0])} on {largest[2]}")
        elif ok and compatible == 0 and d.shared:
            parts.append("no admitting node shares GPUs (nvidia.com/gpu.replicas > 1 or MIG)")
        elif ok and compatible:
            parts.append("every admitting GPU is taken")
        if d.spread and used_nodes:
            parts.append(f"spread: {len(used_nodes)} node(s) already hold a replica")
        if not self.nodes:
            parts.append("the cluster has no GPU nodes")
        elif refused:
            shown = "; ".join(
                f"{len(names)} {why} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for why, names in sorted(refused.items())
            )
            parts.append(f"{sum(len(v) for v in refused.values())} node(s) excluded: {shown}")
        return "; ".join(parts)


def _open(node: NodeInventory, device: Device) -> bool:
    return node.slots_used.get(device.index, 0) < device.slots


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


# --------------------------------------------------------------------------------------- signals


def autoscaling_signal(d: _Demand, classes: Sequence[NodeClass]) -> dict[str, Any]:
    """The smallest class (VRAM taken = GPUs x memory, then memory) that holds one pending replica."""
    best: tuple[tuple[int, int, str], NodeClass, int] | None = None
    for cls in classes:
        n = d.fewest(cls.gpu_memory_mib * MiB, cls.gpus_per_node)
        if n is None:
            continue
        key = (n * cls.gpu_memory_mib, cls.gpu_memory_mib, cls.name)
        if best is None or key < best[0]:
            best = (key, cls, n)
    selector = [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(d.node_selector.items())]
    if best is None:
        n = d.gpus_per_replica or 1
        mib = math.ceil(d.need(n) / MiB)
        return {
            "gpuClass": None,
            "gpuProduct": None,
            "minGpuMemoryMiB": mib,
            "gpuCount": n,
            "nodeAffinity": _affinity(mib, n) + selector,
            "message": f"no known node class holds a replica (largest: "
            f"{max((c.gpus_per_node for c in classes), default=0)} GPUs per node); "
            f"{n} GPU(s) with >= {mib} MiB each would",
        }
    _, cls, n = best
    mib = math.ceil(d.need(n) / MiB)
    return {
        "gpuClass": cls.name,
        "gpuProduct": cls.gpu_product,
        "minGpuMemoryMiB": mib,
        "gpuCount": n,
        "nodeAffinity": _affinity(mib, n) + selector,
    }


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
) -> ClusterPlan:
    """Place every replica of ``deployments`` on ``nodes`` (Node objects) given what ``pods`` hold.

    ``configs`` maps (namespace, name) to the config.json read from the deployment's ConfigMap;
    ``model_config`` (``--model-config``) serves every deployment without its own. A deployment whose
    facts cannot be had gets ``error`` and no replicas; the others are planned as usual. The result
    lists the deployments in input order.
    """
    resolve = resolve or resolve_facts
    configs = configs or {}
    plans: list[DeploymentPlan] = []
    demands: list[_Demand] = []
    seen: dict[tuple[str, str], int] = {}
    # Duplicate (namespace, name): the first by content is planned, the others get an error.
    order = sorted(range(len(deployments)), key=lambda i: deployments[i].model_dump_json())
    duplicate: set[int] = set()
    for i in order:
        key = (deployments[i].namespace, deployments[i].name)
        if key in seen:
            duplicate.add(i)
        else:
            seen[key] = i
    for i, dep in enumerate(deployments):
        plan = DeploymentPlan(dep.name, dep.namespace)
        plans.append(plan)
        if i in duplicate:
            plan.error = SpecError("metadata.name", f"{plan.namespace}/{plan.name} is listed twice")
            continue
        spec = dep.spec
        try:
            facts = resolve(dep, configs.get(plan.key, model_config))
            workload = Workload.from_spec(spec)
            plan.estimate = estimate(facts, workload)
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
                node_selector=dict(p.nodeSelector),
                tolerations=[*(t.model_dump(exclude_none=True) for t in p.tolerations), GPU_TOLERATION],
                order=i,
            )
        )

    inventory = build_inventory(nodes, pods, replanned=[d.plan.key for d in demands])
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
    fail_key = (d.facts, d.workload, d.strategy, d.offload, d.shared, d.gpus_per_replica, d.constraints)
    for placed_count in range(d.replicas):
        # Capacity only shrinks while planning: what failed for an identical demand fails again (unless
        # spread, whose candidates depend on the deployment's own replicas).
        if not d.spread and fail_key in planner._failed:
            d.plan.unscheduled = d.replicas - placed_count
            d.plan.reason = planner._failed[fail_key]
            break
        replica: PlacedReplica | None = None
        choice = planner.place(d, used)
        if choice is not None:
            rp = planner.replica_plan(d, choice)
            if isinstance(rp, ReplicaPlan):
                replica = planner.commit(d, choice, rp)
        if replica is None:
            replica = planner.offload_place(d, used)
        if replica is None:
            d.plan.unscheduled = d.replicas - placed_count
            d.plan.reason = planner.reason(d, used)
            if not d.spread:
                planner._failed[fail_key] = d.plan.reason
            break
        d.plan.replicas.append(replica)
        used.add(replica.node)
    if d.plan.unscheduled:
        d.plan.autoscaling = autoscaling_signal(d, classes)


__all__ = [
    "KNOWN_PRODUCTS",
    "ClusterPlan",
    "DeploymentPlan",
    "NodeClass",
    "PlacedReplica",
    "autoscaling_signal",
    "parse_node_classes",
    "plan_cluster",
]
