"""DRA mode end to end over HTTP: kmock's emulator serving resource.k8s.io/v1 (ResourceSlice, ResourceClaim,
ResourceClaimTemplate, DeviceClass) and the InferencePool API, kopf's KopfRunner, the real planner.

The same LLMDeployment (``resourceAPI: auto``) runs on a DRA cluster with ResourceClaimTemplates and on a
device-plugin cluster with ``nvidia.com/gpu``; deployments never share a device beyond its memory; the
InferencePool is created when asked for and the API is served, and a condition says so when it is not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dra_cluster import (
    A100_80,
    L4,
    RESOURCE,
    MiB,
    allocated_claim,
    dra_node,
    gpu_device,
    resource_slice,
    selects,
    serve,
)
from kubevram_emulator import EmulatedCluster, emulated_cluster, gpu_node, llm_deployment, running_operator
from test_inference_pool import assert_valid_inference_pool

from kubevram.controller import render
from kubevram.planner.catalog import known_config

SMALL = dict(known_config("Qwen/Qwen2-0.5B-Instruct") or {})  # its published config.json


def phase(cluster: EmulatedCluster, name: str, *phases: str) -> dict[str, Any] | None:
    obj = cluster.llmd(name)
    return obj if ((obj or {}).get("status") or {}).get("phase") in phases else None


def templates(cluster: EmulatedCluster) -> dict[str, dict[str, Any]]:
    return {
        t["metadata"]["name"]: t
        for t in cluster.items(f"{RESOURCE}/namespaces/default/resourceclaimtemplates")
    }


def workloads(cluster: EmulatedCluster, name: str) -> list[dict[str, Any]]:
    """The worker Deployments of ``name`` (not its placeholder)."""
    return [
        d
        for d in cluster.deployments()
        if d["metadata"]["labels"].get(render.LABEL_DEPLOYMENT) == name
        and d["metadata"]["labels"].get(render.LABEL_SHAPE) != render.PLACEHOLDER
    ]


def dra_cluster(cluster: EmulatedCluster) -> list[dict[str, Any]]:
    """Two DRA nodes: four whole A100s (one held by a training job's claim), two shareable L4s."""
    for node in (dra_node("a100-0"), dra_node("l4-0")):
        cluster.add_node(node)
    slices = [
        resource_slice("a100-0", [gpu_device(i, A100_80) for i in range(4)]),
        resource_slice("l4-0", [gpu_device(i, L4, shares="memory") for i in range(2)]),
    ]
    serve(cluster, slices, [allocated_claim("training", "a100-0", ["gpu-2"])])
    return [d for s in slices for d in s["spec"]["devices"]]


def test_a_dra_cluster_gets_claim_templates_that_select_by_memory_and_never_overcommit(
    cluster: EmulatedCluster, operator: Any
) -> None:
    devices = dra_cluster(cluster)
    cluster.create_llmd(
        llm_deployment(
            "qwen",
            replicas=4,
            serving={"maxSequenceLength": 4096, "maxBatchSize": 1, "inferencePool": {"enabled": True}},
        )
    )
    shared = llm_deployment(
        "small",
        "Qwen/Qwen2-0.5B-Instruct",
        replicas=3,
        placement={"sharing": "shared"},
        model_extra={"config": SMALL},
    )
    cluster.create_llmd(shared)
    qwen = cluster.wait_for("qwen planned, one replica waiting", lambda: phase(cluster, "qwen", "Scheduling"))
    small = cluster.wait_for("small planned", lambda: phase(cluster, "small", "Planned"))
    assert qwen["status"]["resourceAPI"] == small["status"]["resourceAPI"] == "dra"
    # Three free A100s (the fourth is the training job's): three replicas placed, one waiting for a node.
    assert len(qwen["status"]["placements"]) == 3 and qwen["status"]["autoscaling"]["pendingReplicas"] == 1

    found = templates(cluster)
    booked: dict[tuple[str, str], int] = {}
    for name in ("qwen", "small"):
        for workload in workloads(cluster, name):
            pod = workload["spec"]["template"]["spec"]
            (claim,) = pod["resourceClaims"]
            template = found[claim["resourceClaimTemplateName"]]
            assert template["metadata"]["ownerReferences"][0]["name"] == name
            container = pod["containers"][0]
            assert container["resources"]["claims"] == [{"name": claim["name"]}]
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
            assert workload["spec"]["template"]["metadata"]["labels"][render.LABEL_ENGINE_TYPE] == "vllm"
            node = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"
            ][0]["matchExpressions"][0]["values"][0]
            (request,) = template["spec"]["spec"]["devices"]["requests"]
            exactly = request["exactly"]
            assert [
                d["name"] for d in devices if selects(exactly, d)
            ]  # the scheduler has devices to pick from
            piece = int((exactly.get("capacity") or {}).get("requests", {}).get("memory") or 0)
            for _ in range(workload["spec"]["replicas"]):
                booked[(node, name)] = booked.get((node, name), 0) + (piece or 1)
    # Exclusive replicas: three A100s; shared ones: slices of the L4s that fit within them.
    assert booked[("a100-0", "qwen")] == 3
    assert 0 < booked[("l4-0", "small")] <= 2 * 23034 * MiB
    # The waiting replica's placeholder asks a new node for a device by claim, not by GFD labels.
    (placeholder,) = [d for d in cluster.deployments() if d["metadata"]["name"] == "qwen-placeholder"]
    (claim,) = placeholder["spec"]["template"]["spec"]["resourceClaims"]
    assert claim["resourceClaimTemplateName"].startswith("qwen-pending-")
    # The InferencePool selects qwen's workers.
    pool = cluster.get("/apis/inference.networking.k8s.io/v1/namespaces/default/inferencepools/qwen")
    assert pool is not None and pool["spec"]["selector"]["matchLabels"][render.LABEL_DEPLOYMENT] == "qwen"
    assert_valid_inference_pool(pool)
    condition = {c["type"]: c for c in qwen["status"]["conditions"]}["InferencePool"]
    assert condition["status"] == "True" and condition["reason"] == "Created"

    # Scaling down frees a device; the stale claim template goes once no workload names it.
    cluster.patch(cluster.llmd_path("qwen"), {"spec": {"replicas": 1}})
    cluster.wait_for(
        "qwen scaled to 1",
        lambda: (
            len(((phase(cluster, "qwen", "Planned") or {}).get("status") or {}).get("placements") or []) == 1
        ),
    )
    cluster.wait_for(
        "pending template gone", lambda: not [n for n in templates(cluster) if n.startswith("qwen-pending-")]
    )


@pytest.fixture
def no_inference_pool_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A device-plugin cluster (no resource.k8s.io, no InferencePool API) with the operator running."""
    monkeypatch.setenv("KUBEVRAM_INFERENCE_POOL", "true")  # the chart's default: every deployment gets one
    with (
        emulated_cluster(tmp_path, monkeypatch, dra=False, inference_pool=False) as emulated,
        running_operator(),
    ):
        yield emulated


def test_the_same_deployment_runs_unchanged_on_a_device_plugin_cluster_and_says_when_no_pool_can_be_made(
    no_inference_pool_api: EmulatedCluster,
) -> None:
    cluster = no_inference_pool_api
    cluster.add_node(gpu_node("gpu-a100-0", gpus=4))
    cluster.create_llmd(llm_deployment("qwen", replicas=2))
    obj = cluster.wait_for("qwen planned", lambda: phase(cluster, "qwen", "Planned"))
    assert obj["status"]["resourceAPI"] == "devicePlugin"
    for workload in workloads(cluster, "qwen"):
        pod = workload["spec"]["template"]["spec"]
        assert "resourceClaims" not in pod
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    condition = {c["type"]: c for c in obj["status"]["conditions"]}["InferencePool"]
    assert (condition["status"], condition["reason"]) == ("False", "APINotServed")
    assert "inference.networking.k8s.io/v1" in condition["message"]
    events = cluster.items("/api/v1/namespaces/default/events")
    assert any(e.get("reason") == "InferencePoolNotServed" for e in events)


def test_resource_api_dra_on_a_cluster_without_dra_is_an_invalid_spec(
    no_inference_pool_api: EmulatedCluster,
) -> None:
    cluster = no_inference_pool_api
    cluster.add_node(gpu_node("gpu-a100-0", gpus=4))
    cluster.create_llmd(llm_deployment("qwen", placement={"resourceAPI": "dra"}))
    obj = cluster.wait_for("qwen failed", lambda: phase(cluster, "qwen", "Failed"))
    planned = {c["type"]: c for c in obj["status"]["conditions"]}["Planned"]
    assert planned["reason"] == "InvalidSpec" and "spec.placement.resourceAPI" in planned["message"]
