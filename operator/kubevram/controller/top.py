"""``kubevram top``: the cluster's GPU memory in the terminal, read from the cluster in ``KUBECONFIG``.

It reads the nodes, kubevram's workloads (their reservation annotations: what the plans reserve), the
other pods that hold GPUs, kubevram's worker pods and every LLMDeployment (estimate, placements,
pending replicas, the workers' reports, the calibration), and shows the picture the operator's metrics
give (``kubevram.planner.usage.cluster_usage``): per GPU class the totals, per deployment estimate vs
measured, and per node and GPU a bar of used, reserved and free drawn like ``kubevram plan`` draws its
bars. ``-o json`` prints ``ClusterUsage.to_json()``; ``--watch`` redraws every ``--interval`` seconds.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from kubevram.api.quantity import GiB
from kubevram.controller.adapter import Cluster
from kubevram.controller.render import LABEL_DEPLOYMENT
from kubevram.planner.plan_cli import FREE, HELD, SEGMENTS, bar, node_header
from kubevram.planner.usage import ClusterUsage, DeploymentState, DeploymentUsage, GpuUsage, cluster_usage

USED, RESERVED = SEGMENTS[0][1], SEGMENTS[3][1]  # █ and ░, as `kubevram plan` draws weights and headroom
LEGEND = (
    f"legend: {USED} used by workers  {RESERVED} reserved by kubevram, unused  {HELD} held whole  {FREE} free"
)
CLEAR = "\x1b[H\x1b[2J"


def read_usage(cluster: Cluster) -> ClusterUsage:
    """What the cluster's API shows now, as ``ClusterUsage``."""
    nodes = cluster.list_nodes()
    reservations = [r for held in cluster.reservations(cluster.list_workloads()).values() for r in held]
    others = cluster.foreign_gpu_pods()
    pods: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for pod in cluster.list_worker_pods():
        meta = pod.get("metadata") or {}
        owner = str((meta.get("labels") or {}).get(LABEL_DEPLOYMENT) or "")
        pods.setdefault((str(meta.get("namespace") or "default"), owner), []).append(pod)
    states = []
    for obj in cluster.list_llmds():
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
        desired = int((obj.get("spec") or {}).get("replicas") or 0)
        states.append(DeploymentState(*key, desired, obj.get("status") or {}, tuple(pods.get(key, ()))))
    return cluster_usage(nodes, others, reservations, states)


# ------------------------------------------------------------------------------------------ table


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f} GiB"


def _error(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:+.1f}%"


def _classes(usage: ClusterUsage) -> list[str]:
    totals: dict[str, list[int]] = {}
    for node in usage.nodes:
        row = totals.setdefault(node.product, [0, 0, 0, 0, 0])
        row[0] += len(node.gpus)
        row[1] += sum(g.capacity_bytes for g in node.gpus)
        row[2] += sum(g.reserved_bytes for g in node.gpus)
        row[3] += sum(g.used_bytes or 0 for g in node.gpus)
        row[4] += node.free_bytes
    lines = [f"{'GPU CLASS':<34} {'GPUS':>4} {'CAPACITY':>11} {'RESERVED':>11} {'USED':>11} {'FREE':>11}"]
    for product, (gpus, capacity, reserved, used, free) in sorted(totals.items()):
        lines.append(
            f"{product:<34} {gpus:>4} {_gib(capacity):>11} {_gib(reserved):>11} {_gib(used):>11} "
            f"{_gib(free):>11}"
        )
    return lines


def _deployment_lines(d: DeploymentUsage) -> list[str]:
    replicas = f"{d.ready}/{d.placed}/{d.desired}"
    estimate = d.estimate.get("total")
    lines = [
        f"{d.label:<34} {replicas:>8} {_gib(estimate):>11} {_gib(d.measured_peak_bytes):>11} "
        f"{_error(d.estimate_error_ratio):>7} {_gib(d.reserved_bytes):>11} {_gib(d.used_bytes):>11}"
    ]
    if d.pending:
        grow = f"; autoscaler: grow node class {d.gpu_class}" if d.gpu_class else ""
        lines.append(f"    {d.pending} pending ({d.pending_reason}): {d.pending_message}{grow}")
    return lines


def _gpu_line(gpu: GpuUsage) -> str:
    used = gpu.used_bytes or 0
    stranded = max(0, gpu.capacity_bytes - gpu.reserved_bytes - gpu.free_bytes)
    drawn = bar(
        gpu.capacity_bytes, [(USED, used), (RESERVED, max(0, gpu.reserved_bytes - used)), (HELD, stranded)]
    )
    figures = (
        f"used {_gib(gpu.used_bytes)}, reserved {_gib(gpu.reserved_bytes)}, free {_gib(gpu.free_bytes)} "
        f"of {_gib(gpu.capacity_bytes)}"
    )
    return f"  GPU {gpu.index:<2} [{drawn}] {figures}  {', '.join(gpu.deployments)}".rstrip()


def render_top(usage: ClusterUsage) -> str:
    """The table ``kubevram top`` prints."""
    lines = [
        *_classes(usage),
        "",
        f"{'DEPLOYMENT':<34} {'REPLICAS':>8} {'ESTIMATE':>11} {'PEAK':>11} {'ERROR':>7} {'RESERVED':>11} "
        f"{'USED':>11}",
    ]
    for d in usage.deployments:
        lines += _deployment_lines(d)
    if not usage.deployments:
        lines.append("(no LLMDeployment)")
    busy = [
        n
        for n in usage.nodes
        if n.other_pods_devices or any(g.reserved_bytes or g.used_bytes for g in n.gpus)
    ]
    lines += ["", "GPUS (per node)"]
    for node in busy:
        lines.append(node_header(node.inventory))
        lines += [_gpu_line(g) for g in node.gpus]
    idle = len(usage.nodes) - len(busy)
    if idle:
        lines.append(
            f"({idle} more GPU node{'s' if idle > 1 else ''} with nothing reserved, used or requested "
            "by other pods)"
        )
    lines += [
        "",
        LEGEND,
        "REPLICAS: ready/placed/desired; ESTIMATE: one replica; PEAK: the largest allocator "
        "peak one worker reported; ERROR: the estimate's, at the largest prefill measured",
    ]
    return "\n".join(lines)


def render(usage: ClusterUsage, output: str, *, watching: bool = False) -> str:
    if output == "json":
        return json.dumps(
            usage.to_json(), separators=(",", ":") if watching else None, indent=None if watching else 2
        )
    return render_top(usage)


def top(
    cluster: Cluster,
    output: str,
    *,
    watch: bool = False,
    interval: float = 5.0,
    out: TextIO | None = None,
    warn: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print the picture once, or every ``interval`` seconds until interrupted (``--watch``: a table is
    redrawn in place on a terminal; JSON is one document per line). A failed read while watching is
    one line on stderr, and the next read tries again."""
    out = out or sys.stdout
    warn = warn or (lambda line: print(f"kubevram top: {line}", file=sys.stderr))
    print(render(read_usage(cluster), output, watching=watch), file=out, flush=True)
    while watch:
        sleep(interval)
        try:
            usage = read_usage(cluster)
        except Exception as exc:  # the API went away for a moment: say so, keep watching
            warn(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            continue
        prefix = CLEAR if output == "table" and out.isatty() else ("\n" if output == "table" else "")
        print(prefix + render(usage, output, watching=True), file=out, flush=True)
    return 0


__all__ = ["LEGEND", "read_usage", "render", "render_top", "top"]
