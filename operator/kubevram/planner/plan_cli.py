"""``kubevram plan``: place LLMDeployments on a cluster's GPUs and show the plan, for people or as JSON.

``plan_command(text, source, model_config, cluster_text, cluster_source, output)`` is everything the
command prints. The cluster is Node objects as ``kubectl get nodes -o yaml`` prints them (a ``List``,
a ``NodeList`` or several documents), optionally with the Pods that already hold GPUs
(``kubectl get nodes,pods -A -o yaml``); without ``--cluster`` the built-in sample cluster
(``sample_cluster.yaml`` next to this module) is used, so the command runs on a laptop.

The table shows, per deployment, the memory of one replica and where its replicas go (or why they
cannot, and which node group the cluster autoscaler should grow), then per node and GPU a bar of
fixed width: weights, KV cache, activations, overhead (CUDA context and allocator headroom), memory
held by pods already running, and what is free. Warnings (nodes skipped for bad labels, ...) go to
``warn`` (stderr by default), so ``-o json`` prints JSON only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import yaml

from kubevram.api.errors import SpecError
from kubevram.api.load import load_deployments
from kubevram.api.quantity import GiB
from kubevram.api.v1alpha1 import LLMDeployment
from kubevram.planner.estimate import Estimate
from kubevram.planner.facts import ModelFacts
from kubevram.planner.inventory import NodeInventory
from kubevram.planner.placement import (
    ClusterPlan,
    DeploymentPlan,
    PlacedReplica,
    offloaded,
    plan_cluster,
    vram_per_replica,
)
from kubevram.planner.report import Fallback, resolve_facts

SAMPLE_CLUSTER = "sample_cluster.yaml"
# libyaml's parser when PyYAML has it (5x faster on a 500-node `kubectl get nodes -o yaml`).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
BAR_WIDTH = 40
SEGMENTS = (  # (per-GPU key(s), character, legend)
    (("weights",), "█", "weights"),
    (("kvCache",), "▓", "KV cache"),
    (("activations",), "▒", "activations"),
    (("overhead", "fragmentation", "offloadBuffer", "communication"), "░",
     "overhead (CUDA context, allocator headroom, NCCL buffers)"),
)
HELD = "▪"
FREE = "·"


def sample_cluster_text() -> str:
    return resources.files("kubevram.planner").joinpath(SAMPLE_CLUSTER).read_text(encoding="utf-8")


def load_cluster(text: str, source: str = "") -> tuple[list[Any], list[Any], list[str]]:
    """Node and Pod objects from YAML or JSON (``List``/``NodeList``/``PodList`` or several documents,
    e.g. ``kubectl get nodes,pods -A -o yaml``) and warnings for anything else.

    Pods tell what is already in use: kubevram workers by their reservation annotation, other pods by
    their ``nvidia.com/gpu`` requests. Raises ``SpecError`` only when the text is not YAML or holds no Node.
    """
    docs: list[Any] | None = None
    if text.lstrip().startswith("{"):  # `kubectl get nodes -o json` is YAML too; json reads it 50x faster
        try:
            docs = [json.loads(text)]
        except ValueError:
            docs = None
    try:
        if docs is None:
            docs = [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError("", f"malformed YAML at {where}: {problem}", source=source or "--cluster") from None
    warnings: list[str] = []
    nodes: list[Any] = []
    pods: list[Any] = []
    for doc in docs:
        is_list = isinstance(doc, dict) and doc.get("kind") in ("List", "NodeList", "PodList")
        items = doc["items"] if is_list and isinstance(doc.get("items"), list) else [doc]
        for item in items:
            kind = item.get("kind", "Node") if isinstance(item, dict) else type(item).__name__
            if kind == "Node":
                nodes.append(item)
            elif kind == "Pod":
                pods.append(item)
            else:
                warnings.append(f"{source or '--cluster'}: skipped a {kind}, not a Node or Pod")
    if not nodes:
        raise SpecError("", "no Node objects found (expected `kubectl get nodes -o yaml` output)",
                        source=source or "--cluster")
    return nodes, pods, warnings


def load_nodes(text: str, source: str = "") -> tuple[list[Any], list[str]]:
    """Only the Node objects of ``load_cluster`` (and its warnings)."""
    nodes, _, warnings = load_cluster(text, source)
    return nodes, warnings


def plan_command(
    text: str,
    source: str,
    model_config: Mapping[str, Any] | None,
    cluster_text: str | None,
    cluster_source: str,
    output: str,
    *,
    fallback: Fallback | None = None,
    warn: Callable[[str], None] | None = None,
    node_classes: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Everything ``kubevram plan`` prints; raises ``SpecError`` (exit 2) on bad input."""
    warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr))
    deployments = load_deployments(text, source)
    sample = cluster_text is None
    nodes, pods, warnings = load_cluster(sample_cluster_text() if sample else str(cluster_text),
                                         "sample cluster" if sample else cluster_source)

    def resolve(dep: LLMDeployment, config: Mapping[str, Any] | None) -> ModelFacts:
        return resolve_facts(dep, config, fallback)

    plan = plan_cluster(
        deployments, nodes, pods, model_config=model_config, node_classes=node_classes, resolve=resolve
    )
    for dp in plan.deployments:
        if dp.error is not None:
            where = ": ".join(part for part in (source, dp.name) if part)
            raise SpecError(dp.error.field, dp.error.message, source=where)
    for line in [*warnings, *plan.warnings]:
        warn(line)
    if output == "json":
        return json.dumps(plan.to_json(), indent=2)
    title = "sample cluster (built in; --cluster NODES.yaml plans on yours)" if sample else cluster_source
    return render_table(plan, title)


# ------------------------------------------------------------------------------------------ table


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def _summary(dp: DeploymentPlan) -> list[str]:
    plan = dp.to_json()
    per_replica = vram_per_replica(plan)
    total = len(dp.replicas) + dp.unscheduled
    head = f"{dp.namespace}/{dp.name}"
    size = f"{_gib(per_replica)} GiB" if per_replica else "-"
    lines = [f"{head:<36} {size:>11}   {len(dp.replicas)}/{total} placed"]
    where: dict[tuple[str, tuple[int, ...], bool, tuple[tuple[str, int], ...]], int] = {}
    for r in plan["replicas"]:
        if r.get("group"):
            continue
        key = (r["node"], tuple(r["gpus"]), r["shared"], tuple(offloaded(r).items()))
        where[key] = where.get(key, 0) + 1
    for (node, gpus, shared, off), count in where.items():
        mode = "shared slice" if shared else "exclusive"
        times = f" x{count}" if count > 1 else ""
        spill = "".join(f" + offload to {dev}: {_gib(n)} GiB" for dev, n in off)
        lines.append(f"    {node} GPU {','.join(map(str, gpus))} ({mode}){spill}{times}")
    for i, replica in enumerate(dp.replicas):
        if replica.group is not None:
            lines += _group_lines(i, replica, dp.estimate)
    if dp.unscheduled:
        lines.append(f"    {dp.unscheduled} pending: {dp.reason}")
        sig = dp.autoscaling or {}
        terms = ", ".join(f"{t['key']} {t['operator']} {','.join(t.get('values') or [])}"
                          for t in sig.get("nodeAffinity") or [])
        if sig.get("gpuClass"):
            lines.append(
                f"    autoscaler: grow node class {sig['gpuClass']} ({sig['gpuProduct']}), "
                f"{sig['gpuCount']} GPU(s) with >= {sig['minGpuMemoryMiB']} MiB; pending pods carry [{terms}]"
            )
        elif sig:
            lines.append(f"    autoscaler: {sig.get('message', '')}; pending pods carry [{terms}]")
    return lines


def _span(values: Sequence[int]) -> str:
    """``0-7`` for consecutive numbers, ``0,2,5`` otherwise."""
    values = list(values)
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def _group_lines(index: int, r: PlacedReplica, est: Estimate | None) -> list[str]:
    """A multi-node replica: its pods, stages, per-rank budgets (ranks with equal budgets on one line) and
    how the ranks add up to the estimate (docs/estimate.md, "Replicas over several nodes")."""
    group = r.group
    assert group is not None
    lay = group.layout
    lines = [f"    replica {index}: group of {lay.pods} pods, tensor parallel {lay.tp} x {lay.pp} pipeline "
             f"stages ({lay.world} ranks)"]
    for p, pod in enumerate(r.pods):
        stages = sorted({rank.stage for rank in group.ranks if rank.pod == p})
        held = []
        for st in stages:
            stage = group.stages[st]
            a, b = stage.layers
            held.append(f"stage {st}: layers {a}-{b - 1}" + "".join(f" + {name}" for name in stage.ends))
        role = "leader" if p == 0 else "worker"
        lines.append(f"      pod {p} ({role}) {pod.node} GPU {_span(pod.gpus)}: {'; '.join(held)}")
    runs: list[list[Any]] = []  # [first rank, last rank, budget]
    for rank in group.ranks:
        if runs and runs[-1][2] == rank.budget and runs[-1][1] == rank.rank - 1:
            runs[-1][1] = rank.rank
        else:
            runs.append([rank.rank, rank.rank, rank.budget])
    for first, last, budget in runs:
        who = f"rank {first}" if first == last else f"ranks {first}-{last}"
        parts = " + ".join(f"{label} {_gib(budget[key])}" for key, label in _RANK_PARTS)
        each = " each" if first != last else ""
        lines.append(f"      {who:<12} {parts} = {_gib(budget['total'])} GiB{each}")
    totals = group.totals()
    if est is not None:
        lines.append(
            f"      sum of the ranks: weights {_gib(totals['weights'])} GiB = estimate "
            f"{_gib(est.weightsBytes)} + {_gib(totals['replicatedWeights'])} held by several ranks; KV cache "
            f"{_gib(totals['kvCache'])} GiB (estimate {_gib(est.kvCacheBytes)}); the rest is per GPU"
        )
    return lines


_RANK_PARTS = (("weights", "weights"), ("kvCache", "KV"), ("activations", "act"),
               ("communication", "comm"), ("overhead", "context"), ("fragmentation", "headroom"))


def bar(total: int, parts: Sequence[tuple[str, int]], width: int = BAR_WIDTH) -> str:
    """``parts`` (character, bytes) laid out in ``width`` cells by cumulative rounding; the rest is free."""
    out = []
    cum, pos = 0, 0
    for char, nbytes in parts:
        cum += max(0, nbytes)
        end = min(width, round(cum * width / total)) if total else 0
        if nbytes > 0 and end == pos and pos < width:
            end = pos + 1  # a non-empty part stays visible
        out.append(char * (end - pos))
        pos = end
    out.append(FREE * (width - pos))
    return "".join(out)


# node GPU index -> [(replica name, its per-GPU breakdown there, bytes it reserves there, shared)]
_Planned = dict[int, list[tuple[str, dict[str, int], int, bool]]]


def node_header(node: NodeInventory) -> str:
    """A node's line above its GPUs' bars: name, product, devices, sharing, other pods' requests."""
    mem = node.devices[0].memory_bytes if node.devices else 0
    uniform = all(d.memory_bytes == mem for d in node.devices)
    size = f"{len(node.devices)} x {_gib(mem)} GiB" if uniform else f"{len(node.devices)} devices"
    sharing = {"none": "", "time-slicing": f", time-sliced x{node.devices[0].slots if node.devices else 1}",
               "mps": ", MPS", "mig-single": ", MIG single", "mig-mixed": ", MIG mixed"}[node.sharing]
    foreign = sum(node.foreign.values())
    others = f"; {foreign} requested by other pods (which, the device plugin knows)" if foreign else ""
    return f"{node.name}  {node.product}  {size}{sharing}{others}"


def _node_lines(node: NodeInventory, planned: _Planned) -> list[str]:
    lines = [node_header(node)]
    for dev in node.devices:
        here = planned.get(dev.index, [])
        parts: list[tuple[str, int]] = []
        used = 0
        planned_whole = any(not shared for _, _, _, shared in here)
        planned_bytes = sum(res for _, _, res, shared in here if shared)
        for _, per_gpu, _, _ in here:
            for keys, char, _legend in SEGMENTS:
                n = sum(int(per_gpu.get(k, 0)) for k in keys)
                parts.append((char, n))
                used += n
        if dev.index in node.held_whole and not planned_whole:
            held = dev.memory_bytes
        else:
            held = max(0, node.committed.get(dev.index, 0) - planned_bytes)
        parts.append((HELD, held))
        used += held
        who = ", ".join(dict.fromkeys(name for name, _, _, _ in here))
        if held:
            who = f"{who}, running pods" if who else "running pods"
        drawn = bar(dev.memory_bytes, parts)
        figures = f"{_gib(used):>6}/{_gib(dev.memory_bytes)} GiB"
        lines.append(f"  GPU {dev.index:<2} [{drawn}] {figures}  {who}".rstrip())
    return lines


def render_table(plan: ClusterPlan, title: str) -> str:
    lines = [f"Plan on {title}", "", f"{'DEPLOYMENT':<36} {'PER REPLICA':>11}   REPLICAS"]
    for dp in plan.deployments:
        lines += _summary(dp)
    planned: dict[str, _Planned] = {}
    for dp in plan.deployments:
        for i, r in enumerate(dp.replicas):
            if r.group is not None:
                for p, pod in enumerate(r.pods):
                    for budget, node_index in zip(r.group.pod_budgets(p), pod.gpus, strict=True):
                        who = f"{dp.namespace}/{dp.name}#{i}/pod{p}"
                        planned.setdefault(pod.node, {}).setdefault(node_index, []).append(
                            (who, budget, pod.reservation[node_index], False)
                        )
                continue
            for pod_index, node_index in enumerate(r.gpus):
                planned.setdefault(r.node, {}).setdefault(node_index, []).append(
                    (f"{dp.namespace}/{dp.name}#{i}", r.plan.per_gpu[pod_index], r.reservation[node_index],
                     r.shared)
                )
    shown = [n for n in plan.inventory.nodes if n.name in planned or n.held_whole or n.committed or n.foreign]
    idle = len(plan.inventory.nodes) - len(shown)
    lines += ["", "GPUS (per node)"]
    for node in shown:
        lines += _node_lines(node, planned.get(node.name, {}))
    if idle:
        lines.append(f"({idle} more GPU node{'s' if idle > 1 else ''} with nothing planned or running)")
    legend = "  ".join(f"{char} {name}" for _, char, name in SEGMENTS)
    lines += ["", f"legend: {legend}  {HELD} held by running pods  {FREE} free"]
    return "\n".join(lines)


__all__ = [
    "bar", "load_cluster", "load_nodes", "node_header", "plan_command", "render_table", "sample_cluster_text"
]
