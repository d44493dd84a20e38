"""Multi-node groups in DRA mode, over HTTP: kmock's emulator serving resource.k8s.io/v1 (ResourceSlices as
NVIDIA's driver publishes them for two 8 x H100 nodes) and leaderworkerset.x-k8s.io/v1, kopf's KopfRunner,
the real planner.

A replica larger than a node runs as a LeaderWorkerSet whose leader and worker pod templates each claim
exactly their pods' GPUs through ResourceClaimTemplates that exist, by CEL selectors that (evaluated against
the slices) select exactly the devices that can hold those pods' per-GPU budgets; the group holds its
devices on both nodes for later deployments, whichever devices the scheduler gave its claims; a pending
group asks the autoscaler for nodeCount nodes."""

from __future__ import annotations

import json
from typing import Any

from dra_cluster import (
    A100_80,
    H100,
    RESOURCE,
    allocated_claim,
    dra_node,
    gpu_device,
    resource_slice,
    selects,
    serve,
)
from kubevram_emulator import EmulatedCluster, llm_deployment, running_operator
from test_leader_worker_sets import L405, conditions, lws_cluster, phase  # noqa: F401 (lws_cluster: fixture)

from kubevram.api.workerplan import WorkerPlan

NODES = ("h100-0", "h100-1")


def h100_nodes(cluster: EmulatedCluster) -> list[tuple[str, dict[str, Any]]]:
    """Two DRA nodes of eight whole H100s each: ``[(node, device)]``."""
    slices = [resource_slice(node, [gpu_device(i, H100) for i in range(8)]) for node in NODES]
    for node in NODES:
        cluster.add_node(dra_node(node))
    serve(cluster, slices)
    return [(s["spec"]["nodeName"], d) for s in slices for d in s["spec"]["devices"]]


def claim_templates(cluster: EmulatedCluster) -> dict[str, dict[str, Any]]:
    found = cluster.items(f"{RESOURCE}/namespaces/default/resourceclaimtemplates")
    return {t["metadata"]["name"]: t for t in found}


def full_plan(cluster: EmulatedCluster, name: str) -> dict[str, Any]:
    cm = cluster.get(f"/api/v1/namespaces/default/configmaps/{name}-plan")
    assert cm is not None
    return dict(json.loads(cm["data"]["plan.json"]))


def claimed(pod: dict[str, Any], found: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ResourceClaimTemplate a pod template names (it must exist), checked as DRA mode wants the pod."""
    (claim,) = pod["spec"]["resourceClaims"]
    assert claim["resourceClaimTemplateName"] in found, (claim, sorted(found))
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["claims"] == [{"name": claim["name"]}]
    asked = {**container["resources"]["requests"], **container["resources"]["limits"]}
    assert not [k for k in asked if k.startswith("nvidia.com/")]  # no device-plugin request
    return found[claim["resourceClaimTemplateName"]]


def _could_hold(device: dict[str, Any], nbytes: int, products: set[str]) -> bool:
    """Ground truth from the slice: a whole GPU of the group's product with at least ``nbytes``."""
    return (
        device["attributes"]["type"]["string"] == "gpu"
        and device["attributes"]["productName"]["string"] in products
        and int(device["capacity"]["memory"]["value"]) >= nbytes
    )


def test_a_group_claims_every_pods_gpus_by_memory_through_templates_that_exist(
    lws_cluster: EmulatedCluster,  # noqa: F811
) -> None:
    cluster = lws_cluster
    devices = h100_nodes(cluster)
    with running_operator():
        cluster.create_llmd(llm_deployment("l405", L405))
        obj = cluster.wait_for("l405 Planned", lambda: phase(cluster, "l405", "Planned"))
        assert obj["status"]["resourceAPI"] == "dra"
        (lws,) = cluster.leader_worker_sets()
        assert cluster.deployments() == []
        (replica,) = full_plan(cluster, "l405")["replicas"]
        group = replica["group"]
        size, per_pod, ranks = group["size"], group["gpusPerPod"], group["ranks"]
        assert (size, per_pod) == (2, 8) and [p["node"] for p in group["pods"]] == list(NODES)
        # The stages differ (the first holds the embeddings, the last the norm and the head): so do budgets.
        assert {r["total"] for r in ranks if r["pod"] == 0} != {r["total"] for r in ranks if r["pod"] == 1}
        # Devices to select from: the slices' H100s, devices just under and at every rank's budget, an A100.
        probes = [
            ("probe", gpu_device(90 + i, {**H100, "memory": total - below}))
            for i, total in enumerate(sorted({r["total"] for r in ranks}))
            for below in (0, 1)
        ]
        candidates = [*devices, *probes, ("probe", gpu_device(99, A100_80))]
        found = claim_templates(cluster)
        template = lws["spec"]["leaderWorkerTemplate"]
        for role, pods in (("leaderTemplate", [0]), ("workerTemplate", list(range(1, size)))):
            requests = claimed(template[role], found)["spec"]["spec"]["devices"]["requests"]
            assert sum(r["exactly"]["count"] for r in requests) == per_pod  # exactly its pods' GPUs
            # Per pod GPU index, the largest budget of a rank there (one template serves all worker pods).
            need = [
                max(r["total"] for r in ranks if r["pod"] in pods and r["gpu"] == i) for i in range(per_pod)
            ]
            products = {group["pods"][p]["gpuProduct"] for p in pods}
            by_index = [[i] for i in range(per_pod)] if len(requests) == per_pod else [list(range(per_pod))]
            for request, indices in zip(requests, by_index, strict=True):
                if len(indices) == 1:
                    assert request["name"] == f"gpu-{indices[0]}"  # the pod's own GPU index
                exactly = request["exactly"]
                nbytes = max(need[i] for i in indices)
                chosen = {(n, d["name"]) for n, d in candidates if selects(exactly, d)}
                truth = {(n, d["name"]) for n, d in candidates if _could_hold(d, nbytes, products)}
                assert chosen == truth, (role, request, sorted(chosen ^ truth))
                assert "capacity" not in exactly  # whole GPUs
        # The plan file: every rank by its pod's own GPU indices.
        (container,) = template["leaderTemplate"]["spec"]["containers"]
        key = container["args"][container["args"].index("--plan") + 1].rsplit("/", 1)[-1]
        cm = cluster.get("/api/v1/namespaces/default/configmaps/l405-plan")
        assert cm is not None
        plan = WorkerPlan.parse(json.loads(cm["data"][key]))
        assert plan.group is not None
        assert sorted((r.pod, r.gpu) for r in plan.group.ranks) == [(p, i) for p in (0, 1) for i in range(8)]

        # A change of the spec re-applies the group's LeaderWorkerSet in place (never deleted: that would
        # take the group down), still naming templates that exist.
        env = [{"name": "NCCL_DEBUG", "value": "INFO"}]
        cluster.patch(cluster.llmd_path("l405"), {"spec": {"worker": {"env": env}}})

        def regenerated() -> bool:
            planned = phase(cluster, "l405", "Planned") or {}
            return (planned.get("status") or {}).get("observedGeneration") == 2

        cluster.wait_for("generation 2 planned", regenerated)
        assert not [r for r in cluster.requests() if r[0] == "DELETE" and "/leaderworkersets/" in r[1]]
        (lws,) = cluster.leader_worker_sets()
        found = claim_templates(cluster)
        for role in ("leaderTemplate", "workerTemplate"):
            pod = lws["spec"]["leaderWorkerTemplate"][role]
            claimed(pod, found)
            assert {"name": "NCCL_DEBUG", "value": "INFO"} in pod["spec"]["containers"][0]["env"]


def test_a_groups_devices_stay_taken_on_both_nodes_whichever_the_scheduler_gave_its_claims(
    lws_cluster: EmulatedCluster,  # noqa: F811
) -> None:
    cluster = lws_cluster
    h100_nodes(cluster)
    group = {"multiNode": "always"}
    with running_operator():
        cluster.create_llmd(llm_deployment("g", placement=group))
        cluster.wait_for("g Planned", lambda: phase(cluster, "g", "Planned"))
        (replica,) = full_plan(cluster, "g")["replicas"]
        pods = replica["group"]["pods"]
        assert [(p["node"], p["gpus"]) for p in pods] == [("h100-0", [0]), ("h100-1", [0])]
        # The scheduler allocates the group's claims (made from its templates) devices of its own choosing,
        # not the planned ones; a training job's claim then gets the planned ones, free in fact.
        (lws,) = cluster.leader_worker_sets()
        found = claim_templates(cluster)
        held = []
        for index, (role, node) in enumerate((("leaderTemplate", "h100-0"), ("workerTemplate", "h100-1"))):
            template = claimed(lws["spec"]["leaderWorkerTemplate"][role], found)
            labels = template["spec"]["metadata"]["labels"]
            held.append(allocated_claim(f"g-0-{index}-gpus-x7", node, ["gpu-7"], labels=labels))
        training = [allocated_claim(f"training-{node}", node, ["gpu-0"]) for node in NODES]
        for claim in [*held, *training]:
            cluster.create(f"{RESOURCE}/namespaces/default/resourceclaims", claim)

        # Sixteen GPUs, two the group's, two the training job's: twelve replicas of one GPU, six a node.
        cluster.create_llmd(llm_deployment("q", replicas=16))
        waiting = cluster.wait_for("q waiting", lambda: phase(cluster, "q", "Scheduling"))
        placed = [p["node"] for p in waiting["status"]["placements"]]
        assert {n: placed.count(n) for n in NODES} == {"h100-0": 6, "h100-1": 6}
        assert waiting["status"]["autoscaling"]["pendingReplicas"] == 4

        # A group that fits nowhere asks for nodeCount nodes: one placeholder pod per node, never two on one.
        cluster.create_llmd(llm_deployment("g2", placement=group))
        pending = cluster.wait_for("g2 waiting", lambda: phase(cluster, "g2", "Scheduling"))
        signal = pending["status"]["autoscaling"]
        (placeholder,) = cluster.wait_for(
            "g2's placeholder",
            lambda: [d for d in cluster.deployments() if d["metadata"]["name"] == "g2-placeholder"],
        )
        assert placeholder["spec"]["replicas"] == signal["nodeCount"] == 2
        pod = placeholder["spec"]["template"]
        (request,) = claimed(pod, claim_templates(cluster))["spec"]["spec"]["devices"]["requests"]
        assert request["exactly"]["count"] == signal["gpuCount"] == 1
        assert selects(request["exactly"], gpu_device(0, H100))
        mib = signal["minGpuMemoryMiB"]
        assert not selects(request["exactly"], gpu_device(0, {**H100, "memory": (mib - 1) * 2**20}))
        (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert conditions(pending)["Scheduled"]["status"] == "False"
