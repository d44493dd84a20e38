"""The periodic check repairs a status that a stale write left behind.

kopf runs an object's timer beside its change handlers: the readiness timer can compute from a body read
before a reconcile wrote the new status, and its patch lands after the reconcile's (seen as an emulator
test that timed out 1 in 14 runs waiting for a scaled-down deployment's phase). Whatever wrote it, a
phase that contradicts the deployment's replicas is put right by the next check.
"""

from __future__ import annotations

from typing import Any

from kubevram_emulator import EmulatedCluster, gpu_node, llm_deployment


def phase(cluster: EmulatedCluster, name: str) -> str | None:
    return (((cluster.llmd(name) or {}).get("status")) or {}).get("phase")


def test_a_stale_phase_is_put_right_by_the_next_check(cluster: EmulatedCluster, operator: Any) -> None:
    cluster.add_node(gpu_node("gpu-0", gpus=2))
    cluster.create_llmd(llm_deployment("qwen"))
    cluster.wait_for("qwen Planned", lambda: phase(cluster, "qwen") == "Planned")
    # What a stale write leaves: the phase of a replica that waits for a node, no replica waiting.
    cluster.patch(cluster.llmd_path("qwen") + "/status", {"status": {"phase": "Scheduling"}})
    assert phase(cluster, "qwen") == "Scheduling"
    cluster.wait_for("the phase put right", lambda: phase(cluster, "qwen") == "Planned", timeout=15)
