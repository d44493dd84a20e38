"""One placement authority through the operator's real path: kmock's emulator over HTTP, kopf's
KopfRunner, the real planner, several LLMDeployments reconciled at once.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from kubevram_emulator import EmulatedCluster, gpu_node
from test_operator import L4, condition, llmd, pinned_node, workloads

from kubevram.controller import render


def booked(cluster: EmulatedCluster) -> Counter[tuple[str, str]]:
    """(node, GPU) -> replicas whose workload reserves it, over every kubevram workload."""
    out: Counter[tuple[str, str]] = Counter()
    for workload in cluster.deployments():
        annotations = workload["spec"]["template"]["metadata"].get("annotations") or {}
        if render.RESERVATION not in annotations:
            continue
        reservation = json.loads(annotations[render.RESERVATION])
        for gpu in reservation["gpus"]:
            out[(reservation["node"], gpu)] += int(workload["spec"]["replicas"])
    return out


def settled(cluster: EmulatedCluster, names: list[str]) -> dict[str, dict[str, Any]] | None:
    """Every named deployment planned (placed, or told to wait), else None."""
    out = {}
    for name in names:
        obj = cluster.llmd(name)
        if condition(obj, "Scheduled").get("status") not in ("True", "False"):
            return None
        out[name] = obj
    return out  # type: ignore[return-value]


def test_deployments_created_at_once_get_distinct_gpus(cluster: EmulatedCluster, operator: Any) -> None:
    """Ten one-GPU deployments applied together on one 8-GPU node: eight GPUs, eight replicas, two waiting."""
    cluster.add_node(gpu_node("gpu-l4-0", **{**L4, "gpus": 8}))
    names = [f"m{i}" for i in range(10)]
    for name in names:
        cluster.create_llmd(llmd(name, replicas=1))
    found = cluster.wait_for("every deployment planned", lambda: settled(cluster, names), timeout=40)

    placed = [n for n, obj in found.items() if condition(obj, "Scheduled")["status"] == "True"]
    waiting = [n for n, obj in found.items() if condition(obj, "Scheduled")["status"] == "False"]
    assert (len(placed), len(waiting)) == (8, 2), {n: condition(o, "Scheduled") for n, o in found.items()}
    for name in waiting:
        assert found[name]["status"]["autoscaling"]["pendingReplicas"] == 1
    books = booked(cluster)
    assert books and max(books.values()) == 1, books  # no GPU given twice
    assert sorted(gpu for _, gpu in books) == [str(i) for i in range(8)]
    for name in placed:
        (workload,) = (w for n, w in workloads(cluster, name).items() if not n.endswith("-pending"))
        assert pinned_node(workload) == "gpu-l4-0"
