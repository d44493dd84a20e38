"""One placement authority through the operator's real path: kmock's emulator over HTTP, kopf's
KopfRunner, the real planner, several LLMDeployments reconciled at once.
"""

from __future__ import annotations

import copy
import datetime
import json
from collections import Counter
from typing import Any

import pytest
from kubevram_emulator import EmulatedCluster, gpu_node, running_operator
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
    """Six one-GPU deployments applied together on one 4-GPU node: four GPUs, four replicas, two waiting."""
    cluster.add_node(gpu_node("gpu-l4-0", **{**L4, "gpus": 4}))
    names = [f"m{i}" for i in range(6)]
    for name in names:
        cluster.create_llmd(llmd(name, replicas=1))
    found = cluster.wait_for("every deployment planned", lambda: settled(cluster, names), timeout=40)

    placed = [n for n, obj in found.items() if condition(obj, "Scheduled")["status"] == "True"]
    waiting = [n for n, obj in found.items() if condition(obj, "Scheduled")["status"] == "False"]
    assert (len(placed), len(waiting)) == (4, 2), {n: condition(o, "Scheduled") for n, o in found.items()}
    for name in waiting:
        assert found[name]["status"]["autoscaling"]["pendingReplicas"] == 1
    books = booked(cluster)
    assert books and max(books.values()) == 1, books  # no GPU given twice
    assert sorted(gpu for _, gpu in books) == [str(i) for i in range(4)]
    for name in placed:
        (workload,) = (w for n, w in workloads(cluster, name).items() if not n.endswith("-placeholder"))
        assert pinned_node(workload) == "gpu-l4-0"


# ------------------------------------------------------------------ nodes that go, pods that wait


ONE_L4 = {**L4, "gpus": 1}


#: A node patch: the device plugin and GFD are gone (no GPU labels, no allocatable GPUs).
NO_GPUS = {
    "metadata": {"labels": {k: None for k in ("nvidia.com/gpu.present", "nvidia.com/gpu.count",
                                              "nvidia.com/gpu.memory", "nvidia.com/gpu.product")}},
    "status": {"allocatable": {"nvidia.com/gpu": None}, "capacity": {"nvidia.com/gpu": None}},
}


def ago(seconds: float) -> str:
    moment = datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def placed_on(cluster: EmulatedCluster, name: str = "qwen") -> str | None:
    """The one node the deployment's (one) worker workload is pinned to, once that is all there is."""
    found = [w for n, w in workloads(cluster, name).items() if not n.endswith("-placeholder")]
    return pinned_node(found[0]) if len(found) == 1 and len(workloads(cluster, name)) == 1 else None


def events(cluster: EmulatedCluster, reason: str) -> list[str]:
    return [e.get("message", "") for e in cluster.items("/api/v1/namespaces/default/events")
            if e.get("reason") == reason]


def test_replicas_leave_nodes_that_are_deleted_cordoned_not_ready_or_lose_their_gpus(
    cluster: EmulatedCluster,
) -> None:
    for name in ("gpu-a", "gpu-b", "gpu-c", "gpu-d"):
        cluster.add_node(gpu_node(name, **ONE_L4))
    with running_operator():
        cluster.create_llmd(llmd(replicas=1))
        cluster.wait_for("qwen on gpu-a", lambda: placed_on(cluster) == "gpu-a")
    # Deleted while the operator was down: the resumed reconciliation must not keep it there.
    cluster.delete("/api/v1/nodes/gpu-a")
    with running_operator():
        cluster.wait_for("qwen moved off the deleted node", lambda: placed_on(cluster) == "gpu-b")
        obj = cluster.llmd("qwen")
        assert [p["node"] for p in obj["status"]["placements"]] == ["gpu-b"]
        assert "re-planned: node gpu-a is gone" in condition(obj, "Scheduled")["message"]
        assert any("node gpu-a is gone" in m for m in events(cluster, "Replanned"))

        cluster.patch("/api/v1/nodes/gpu-b", {"spec": {"unschedulable": True}})
        cluster.wait_for("qwen moved off the cordoned node", lambda: placed_on(cluster) == "gpu-c")

        not_ready = {"type": "Ready", "status": "False", "lastTransitionTime": ago(3600)}
        cluster.patch("/api/v1/nodes/gpu-c", {"status": {"conditions": [not_ready]}})
        cluster.wait_for("qwen moved off the NotReady node", lambda: placed_on(cluster) == "gpu-d")

        # gpu-d loses its GPUs (the device plugin and GFD are gone): no node is left for the replica.
        cluster.patch("/api/v1/nodes/gpu-d", NO_GPUS)
        obj = cluster.wait_for(
            "qwen waiting for a node",
            lambda: condition(o := cluster.llmd("qwen"), "Scheduled").get("status") == "False" and o,
        )
        assert obj["status"]["autoscaling"]["pendingReplicas"] == 1, obj["status"]
        assert obj["status"]["placements"] == []


def test_a_recently_not_ready_node_keeps_its_replica(cluster: EmulatedCluster, operator: Any) -> None:
    cluster.add_node(gpu_node("gpu-a", **ONE_L4))
    cluster.add_node(gpu_node("gpu-b", **ONE_L4))
    cluster.create_llmd(llmd(replicas=1))
    cluster.wait_for("qwen on gpu-a", lambda: placed_on(cluster) == "gpu-a")
    seen = len(cluster.requests())
    # A kubelet restart: NotReady for a few seconds, well inside the 300 s grace.
    blip = {"type": "Ready", "status": "False", "lastTransitionTime": ago(5)}
    cluster.patch("/api/v1/nodes/gpu-a", {"status": {"conditions": [blip]}})
    cluster.wait_for("two readiness checks", lambda: sum(
        1 for m, p, _ in cluster.requests()[seen:] if m == "GET" and p.endswith("/pods")) >= 2, timeout=10)
    assert placed_on(cluster) == "gpu-a"
    assert condition(cluster.llmd("qwen"), "Scheduled")["status"] == "True"


def worker_pod(workload: dict[str, Any], name: str, scheduled: dict[str, Any] | None) -> dict[str, Any]:
    """The pod the Deployment controller would make from ``workload``'s template (none runs here)."""
    template = workload["spec"]["template"]
    conditions = [{"type": "PodScheduled", **scheduled}] if scheduled else []
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", **copy.deepcopy(template["metadata"])},
        "spec": copy.deepcopy(template["spec"]),
        "status": {"phase": "Pending" if scheduled else "Running", "conditions": conditions},
    }


def test_pods_the_scheduler_refuses_are_reported_then_replanned_elsewhere(
    cluster: EmulatedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEVRAM_UNSCHEDULABLE_GRACE", "60")
    cluster.add_node(gpu_node("gpu-a", **ONE_L4))
    cluster.add_node(gpu_node("gpu-b", **ONE_L4))
    pods = "/api/v1/namespaces/default/pods"
    with running_operator():
        cluster.create_llmd(llmd(replicas=1))
        cluster.wait_for("qwen on gpu-a", lambda: placed_on(cluster) == "gpu-a")
        (workload,) = workloads(cluster).values()
        refused = {"status": "False", "reason": "Unschedulable",
                   "message": "0/2 nodes are available: 1 Insufficient nvidia.com/gpu.",
                   "lastTransitionTime": ago(10)}
        cluster.create(pods, worker_pod(workload, "qwen-a-1", refused))
        obj = cluster.wait_for(
            "Scheduled=False while the pod waits",
            lambda: condition(o := cluster.llmd("qwen"), "Scheduled").get("reason") == "PodsUnschedulable"
            and o,
        )
        message = condition(obj, "Scheduled")["message"]
        assert "pod qwen-a-1 unschedulable on gpu-a" in message and "Insufficient nvidia.com/gpu" in message
        assert any("qwen-a-1" in m for m in events(cluster, "PodsUnschedulable"))
        assert obj["status"]["phase"] == "Scheduling"

        # Past the grace: the replica goes to the other node, and the status says why.
        cluster.patch(f"{pods}/qwen-a-1", {"status": {"conditions": [
            {"type": "PodScheduled", **refused, "lastTransitionTime": ago(600)}]}})
        cluster.wait_for("qwen moved to gpu-b", lambda: placed_on(cluster) == "gpu-b")
        scheduled = cluster.wait_for(
            "AllPlaced again",
            lambda: (c := condition(cluster.llmd("qwen"), "Scheduled")).get("reason") == "AllPlaced" and c,
        )
        assert "re-planned: pods unschedulable on node gpu-a" in scheduled["message"]


def test_refused_pod_creation_is_surfaced_and_stale_worker_reports_are_dropped(
    cluster: EmulatedCluster, operator: Any
) -> None:
    cluster.add_node(gpu_node("gpu-a", **ONE_L4))
    cluster.create_llmd(llmd(replicas=1))
    cluster.wait_for("qwen on gpu-a", lambda: placed_on(cluster) == "gpu-a")
    ((name, workload),) = workloads(cluster).items()
    cluster.create("/api/v1/namespaces/default/pods", worker_pod(workload, "qwen-a-live", None))
    report = {"devices": [{"index": 0, "allocatedBytes": 1}]}
    cluster.patch(cluster.llmd_path("qwen") + "/status",
                  {"status": {"workers": {"qwen-a-live": report, "qwen-a-gone": report}}})
    cluster.wait_for("the report of the deleted pod to go", lambda: set(
        ((cluster.llmd("qwen") or {}).get("status") or {}).get("workers") or {}) == {"qwen-a-live"})

    # What the ReplicaSet controller reports when PodSecurity admission refuses the pods.
    refusal = ('pods "qwen-a-x" is forbidden: violates PodSecurity "restricted:latest": '
               "allowPrivilegeEscalation != false")
    cluster.patch(f"/apis/apps/v1/namespaces/default/deployments/{name}/status", {"status": {"conditions": [
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": refusal}]}})
    obj = cluster.wait_for(
        "Scheduled=False, FailedCreate",
        lambda: condition(o := cluster.llmd("qwen"), "Scheduled").get("reason") == "FailedCreate" and o,
    )
    assert refusal in condition(obj, "Scheduled")["message"]
    assert any(refusal in m for m in events(cluster, "FailedCreate"))
    # The ReplicaSet recovers (the namespace's policy was relaxed): Scheduled is True again.
    cluster.patch(f"/apis/apps/v1/namespaces/default/deployments/{name}/status",
                  {"status": {"conditions": None}})
    cluster.wait_for(
        "AllPlaced", lambda: condition(cluster.llmd("qwen"), "Scheduled").get("status") == "True"
    )


def test_a_replica_only_a_known_node_class_can_hold_waits_for_it_and_is_placed_when_it_joins(
    cluster: EmulatedCluster, operator: Any
) -> None:
    """Llama-3-70B needs more than the two L4s here, even empty; the H200 and H100 classes hold it."""
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.create_llmd(llmd("llama", replicas=1, model={"id": "meta-llama/Meta-Llama-3-70B"}))
    obj = cluster.wait_for(
        "llama waiting for a bigger node",
        lambda: condition(o := cluster.llmd("llama"), "Scheduled").get("status") == "False" and o,
    )
    assert obj["status"]["phase"] == "Scheduling" and condition(obj, "Planned")["status"] == "True"
    signal = obj["status"]["autoscaling"]
    assert signal["pendingReplicas"] == 1 and signal["gpuClass"] == "h200", signal  # 1 x 140 GiB
    placeholder = workloads(cluster, "llama")["llama-placeholder"]
    pod = placeholder["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "kubevram-placeholder"
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert {"key": "nvidia.com/gpu.memory", "operator": "Gt",
            "values": [str(signal["minGpuMemoryMiB"] - 1)]} in term["matchExpressions"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == str(signal["gpuCount"])

    cluster.add_node(gpu_node("gpu-h100-0", gpus=8, memory_mib=81559, product="NVIDIA-H100-80GB-HBM3"))
    cluster.wait_for("llama on the new node", lambda: placed_on(cluster, "llama") == "gpu-h100-0")
    assert condition(cluster.llmd("llama"), "Scheduled")["status"] == "True"


def test_a_deployment_being_deleted_is_not_replanned_by_a_node_event(
    cluster: EmulatedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another finalizer (``kubectl delete --cascade=foreground``, a GitOps tool's) keeps a deleted
    LLMDeployment around after kubevram's delete handler released it: a GPU node that joins then must
    not bring its workers back (nor its ledger entry, nor its metrics)."""
    monkeypatch.setenv("KUBEVRAM_RETRY_DELAY", "600")  # only the node event places anything
    with running_operator():
        going = llmd("a-going", replicas=1)
        going["metadata"]["finalizers"] = ["example.com/hold"]
        cluster.create_llmd(going)
        cluster.create_llmd(llmd("b-stays", replicas=1))
        cluster.wait_for("both waiting for a node", lambda: settled(cluster, ["a-going", "b-stays"]))
        cluster.delete(cluster.llmd_path("a-going"))
        cluster.wait_for("kubevram's delete handler to finish", lambda: (
            (o := cluster.llmd("a-going")) and o["metadata"].get("finalizers") == ["example.com/hold"]))
        assert workloads(cluster, "a-going") == {}

        cluster.add_node(gpu_node("gpu-l4-0", **L4))  # room for both; re-planned by name: a-going first
        cluster.wait_for("b-stays placed", lambda: placed_on(cluster, "b-stays") == "gpu-l4-0")
        assert workloads(cluster, "a-going") == {}
        cluster.patch(cluster.llmd_path("a-going"), {"metadata": {"finalizers": None}})


def test_an_invalid_update_of_a_waiting_deployment_withdraws_its_autoscaling_signal(
    cluster: EmulatedCluster, operator: Any
) -> None:
    """Failed means nothing to schedule: no pending replicas in the status (the signal an autoscaler
    integration and the metrics read) and no placeholder keeping a GPU node asked for."""
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.create_llmd(llmd("llama", replicas=1, model={"id": "meta-llama/Meta-Llama-3-70B"}))
    cluster.wait_for("llama's placeholder", lambda: "llama-placeholder" in workloads(cluster, "llama"))
    cluster.patch(cluster.llmd_path("llama"), {"spec": {"model": {"configMapRef": {"name": "no-such"}}}})
    obj = cluster.wait_for("phase Failed", lambda: (
        ((o := cluster.llmd("llama")) or {}).get("status", {}).get("phase") == "Failed" and o))
    assert condition(obj, "Planned")["reason"] == "InvalidSpec"
    assert not (obj["status"].get("autoscaling") or {}).get("pendingReplicas"), obj["status"]
    assert not (obj["status"].get("autoscaling") or {}).get("gpuClass"), obj["status"]
    assert obj["status"].get("vramPerReplica") is None, obj["status"]
    assert workloads(cluster, "llama") == {}


def test_a_kept_replica_whose_gpu_another_deployment_took_meanwhile_is_planned_anew(
    cluster: EmulatedCluster, operator: Any
) -> None:
    """The plan ConfigMap says where a replica was; its workload is gone (deleted by hand, or its write
    failed after the ConfigMap's) and another deployment took the GPU. A scale must not put it back
    on that GPU beside the other one."""
    cluster.add_node(gpu_node("gpu-a", **ONE_L4))
    cluster.create_llmd(llmd("first", replicas=1))
    cluster.wait_for("first on gpu-a", lambda: placed_on(cluster, "first") == "gpu-a")
    cluster.create_llmd(llmd("second", replicas=1))
    cluster.wait_for("second waiting", lambda: settled(cluster, ["second"]))
    assert condition(cluster.llmd("second"), "Scheduled")["status"] == "False"
    (name,) = workloads(cluster, "first")
    cluster.delete(f"/apis/apps/v1/namespaces/default/deployments/{name}")
    cluster.wait_for("second on the GPU first's left", lambda: placed_on(cluster, "second") == "gpu-a")

    cluster.patch(cluster.llmd_path("first"), {"spec": {"replicas": 2}})
    obj = cluster.wait_for("first re-planned", lambda: (
        ((o := cluster.llmd("first")) or {}).get("status", {}).get("observedGeneration") == 2 and o))
    books = booked(cluster)
    assert max(books.values()) == 1, books  # no GPU given twice
    assert obj["status"]["autoscaling"]["pendingReplicas"] == 2, obj["status"]


def gone_while_waiting(cluster: EmulatedCluster, path: str) -> int:
    """The LLMDeployment at ``path`` goes, deleted and released (here: without kubevram's finalizer, as if
    its delete handler had run already); the length of the request log then. In one request (kmock
    collects an object with a deletionTimestamp and no finalizer): between a patch that takes the
    finalizer off and a DELETE, kopf may put it back, and the DELETE then waits for kubevram's delete
    handler, which waits for the lock the test holds (seen once under load)."""
    cluster.patch(path, {"metadata": {"finalizers": None, "deletionTimestamp": "2026-11-26T10:00:00Z"}})
    cluster.wait_for("the deployment gone", lambda: cluster.get(path) is None)
    return len(cluster.requests())


def went_on(cluster: EmulatedCluster, path: str, seen: int) -> None:
    """Wait until the reconciliation that waited for the deployment's lock went on: it read the deployment
    again, or wrote a workload."""
    wrote = ("POST", "/apis/apps/v1/namespaces/default/deployments")
    cluster.wait_for("the waiting reconciliation to read the deployment again, or to write a workload",
                     lambda: {("GET", path), wrote} & {(m, p) for m, p, _ in cluster.requests()[seen:]})


def test_a_replan_that_waited_for_its_deployment_reads_it_again(
    cluster: EmulatedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node event reads a waiting deployment, then waits for the deployment's lock (another
    reconciliation of it holds it); meanwhile the deployment is deleted and released. The re-plan must
    plan what is there once it holds the lock, not the body it read before: nothing."""
    from kubevram.controller.ledger import LEDGER

    monkeypatch.setenv("KUBEVRAM_RETRY_DELAY", "600")  # only the node event places anything
    with running_operator():
        cluster.create_llmd(llmd("qwen", replicas=1))
        cluster.wait_for("qwen waiting for a node", lambda: settled(cluster, ["qwen"]))
        path = cluster.llmd_path("qwen")
        with LEDGER.deployment(("default", "qwen")):  # a reconciliation of qwen in progress
            seen = len(cluster.requests())
            cluster.add_node(gpu_node("gpu-l4-0", **L4))
            cluster.wait_for("the node event to read qwen",
                             lambda: ("GET", path, 200) in cluster.requests()[seen:])
            seen = gone_while_waiting(cluster, path)
        went_on(cluster, path, seen)
        assert [n for n in workloads(cluster, "qwen") if n != "qwen-placeholder"] == []  # no worker


def test_the_periodic_check_that_waited_for_its_deployment_reads_it_again(
    cluster: EmulatedCluster,
) -> None:
    """The same for the periodic check: it finds qwen's node without GPUs (which only it checks), then
    waits for qwen's lock while qwen is deleted and released: it must not place qwen anew."""
    from kubevram.controller.ledger import LEDGER
    from kubevram.controller.nodes import NODES

    cluster.add_node(gpu_node("gpu-a", **ONE_L4))
    cluster.add_node(gpu_node("gpu-b", **ONE_L4))
    with running_operator():
        cluster.create_llmd(llmd("qwen", replicas=1))
        cluster.wait_for("qwen on gpu-a", lambda: placed_on(cluster) == "gpu-a")
        path = cluster.llmd_path("qwen")
        with LEDGER.deployment(("default", "qwen")):  # a reconciliation of qwen in progress
            cluster.patch("/api/v1/nodes/gpu-a", NO_GPUS)
            cluster.wait_for("the node watch to see it", lambda: "nvidia.com/gpu.count" not in (
                (NODES.get("gpu-a") or {}).get("metadata", {}).get("labels", {})))
            seen = len(cluster.requests())
            pods = "/api/v1/namespaces/default/pods"
            # The check that lists qwen's pods now sees the node without GPUs, and waits for the lock.
            cluster.wait_for("the periodic check", lambda: ("GET", pods, 200) in cluster.requests()[seen:])
            seen = gone_while_waiting(cluster, path)
        went_on(cluster, path, seen)
        assert [pinned_node(w) for w in workloads(cluster, "qwen").values()] == ["gpu-a"]  # as it was


def test_an_invalid_update_of_a_serving_deployment_says_its_workers_keep_serving(
    cluster: EmulatedCluster, operator: Any
) -> None:
    """A typo in an update must not take a serving model down (the error is permanent: it would never
    heal), so the previous plan's workers keep running; the status says so instead of "no worker runs",
    0 replicas and no placement while they serve and hold their GPUs."""
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.create_llmd(llmd("qwen", replicas=1))
    cluster.wait_for("qwen placed", lambda: placed_on(cluster, "qwen") == "gpu-l4-0")
    (worker,) = workloads(cluster, "qwen")
    cluster.patch(cluster.llmd_path("qwen"), {"spec": {"model": {"configMapRef": {"name": "no-such"}}}})
    obj = cluster.wait_for("phase Failed", lambda: (
        ((o := cluster.llmd("qwen")) or {}).get("status", {}).get("phase") == "Failed" and o))
    assert condition(obj, "Planned")["reason"] == "InvalidSpec"
    assert list(workloads(cluster, "qwen")) == [worker]  # still serving
    assert obj["status"]["replicas"] == 1, obj["status"]
    assert [p["node"] for p in obj["status"]["placements"]] == ["gpu-l4-0"], obj["status"]
    ready = condition(obj, "Ready")
    assert ready["reason"] == "PreviousPlanServing" and "previous plan" in ready["message"], ready
    assert obj["status"].get("vramPerReplica"), obj["status"]  # what the serving replica holds
