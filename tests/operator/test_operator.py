"""The operator end to end over HTTP: kmock's emulator, kopf's KopfRunner, the real planner.

GPU nodes are Node objects with GPU Feature Discovery labels; the tests act like kubectl (create,
patch, get over HTTP) and wait for the state the operator must reach.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import kmock
import pytest
from kubevram_emulator import EmulatedCluster, gpu_node, running_operator

from kubevram.controller import render

L4 = {"gpus": 2, "memory_mib": 23034, "product": "NVIDIA-L4"}  # 22.5 GiB per GPU, as GFD reports an L4


def llmd(name: str = "qwen", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llm.kubevram.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": 2, "model": {"id": "Qwen/Qwen2-7B-Instruct"}, **spec},
    }


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item["type"] == type_:
            return dict(item)
    return {}


def workloads(cluster: EmulatedCluster, name: str = "qwen") -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in cluster.deployments()
        if d["metadata"]["labels"].get(render.LABEL_DEPLOYMENT) == name
    }


def pinned_node(workload: dict[str, Any]) -> str:
    affinity = workload["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = term["matchExpressions"]
    assert expression["key"] == "kubernetes.io/hostname"
    return str(expression["values"][0])


def wait_generation(
    cluster: EmulatedCluster, name: str, generation: int, phase: str | None = None
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = cluster.llmd(name)
        st = (obj or {}).get("status") or {}
        if st.get("observedGeneration") == generation and (phase is None or st.get("phase") == phase):
            return obj
        return None

    return cluster.wait_for(f"{name} at generation {generation} ({phase or 'any phase'})", probe)  # type: ignore[no-any-return]


def test_create_makes_owned_children_with_gpu_requests_and_affinity(
    cluster: EmulatedCluster, operator: Any
) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.add_node(gpu_node("gpu-l4-1", **L4))
    cluster.create_llmd(llmd(replicas=3))
    obj = wait_generation(cluster, "qwen", 1, "Planned")
    uid = obj["metadata"]["uid"]

    st = obj["status"]
    assert condition(obj, "Planned")["status"] == "True"
    assert condition(obj, "Scheduled")["status"] == "True"
    assert condition(obj, "Ready") | {"lastTransitionTime": None} == {
        "type": "Ready",
        "status": "False",
        "reason": "ReplicasNotReady",
        "message": "0 of 3 replica(s) ready",
        "observedGeneration": 1,
        "lastTransitionTime": None,
    }
    assert st["replicas"] == 3 and st["readyReplicas"] == 0
    assert st["selector"] == "app.kubernetes.io/managed-by=kubevram,llm.kubevram.io/deployment=qwen"
    assert st["estimate"]["totalBytes"] > st["estimate"]["weightsBytes"] > 14 * 2**30
    assert len(st["placements"]) == 3 and st["autoscaling"]["pendingReplicas"] == 0

    found = workloads(cluster)
    assert len(found) == 3  # one GPU per replica: three node-GPU shapes
    for workload in found.values():
        assert workload["metadata"]["ownerReferences"][0]["uid"] == uid
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        reservation = json.loads(workload["spec"]["template"]["metadata"]["annotations"][render.RESERVATION])
        assert reservation["node"] == pinned_node(workload)
        assert len(reservation["gpus"]) == 1
    # Three whole GPUs on two 2-GPU nodes: both nodes used, no GPU booked twice.
    booked = [
        (pinned_node(w), gpu)
        for w in found.values()
        for gpu in json.loads(w["spec"]["template"]["metadata"]["annotations"][render.RESERVATION])["gpus"]
    ]
    assert len(set(booked)) == 3 and {n for n, _ in booked} == {"gpu-l4-0", "gpu-l4-1"}

    cm = cluster.get("/api/v1/namespaces/default/configmaps/qwen-plan")
    assert cm is not None and cm["metadata"]["ownerReferences"][0]["uid"] == uid
    plan_files = [k for k in cm["data"] if k.startswith("plan-")]
    for workload in found.values():
        plan_arg = workload["spec"]["template"]["spec"]["containers"][0]["args"]
        assert plan_arg[plan_arg.index("--plan") + 1].rsplit("/", 1)[1] in plan_files
    for path in (
        "/api/v1/namespaces/default/services/qwen",
        "/api/v1/namespaces/default/secrets/qwen-admin",
        "/api/v1/namespaces/default/serviceaccounts/qwen-worker",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings/qwen-worker",
    ):
        child = cluster.get(path)
        assert child is not None, path
        assert child["metadata"]["ownerReferences"][0]["uid"] == uid, path
    events = cluster.items("/api/v1/namespaces/default/events")
    assert any(e.get("reason") == "Planned" and "3 replica(s) placed" in e.get("message", "") for e in events)


def test_spec_update_replans_and_rolls_out(cluster: EmulatedCluster, operator: Any) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.create_llmd(llmd(replicas=1))
    before = wait_generation(cluster, "qwen", 1, "Planned")
    (old_name,) = workloads(cluster)
    token_before = cluster.get("/api/v1/namespaces/default/secrets/qwen-admin")

    cluster.patch(cluster.llmd_path("qwen"), {"spec": {"precision": {"weights": "int8"}}})
    after = wait_generation(cluster, "qwen", 2, "Planned")
    assert after["status"]["estimate"]["weightsBytes"] < before["status"]["estimate"]["weightsBytes"]
    found = cluster.wait_for(
        "the old workload to go", lambda: (w := workloads(cluster)) and old_name not in w and w
    )
    assert len(found) == 1
    cm = cluster.get("/api/v1/namespaces/default/configmaps/qwen-plan")
    assert cm is not None
    plans = [json.loads(v) for k, v in cm["data"].items() if k.startswith("plan-")]
    assert [p["precision"]["weights"] for p in plans] == ["int8"]
    # The admin token is created once and never rotated by a reconcile.
    assert cluster.get("/api/v1/namespaces/default/secrets/qwen-admin") == token_before


def test_worker_plans_carry_the_sleep_policy_and_the_planned_kv_budget(
    cluster: EmulatedCluster, operator: Any
) -> None:
    """What the worker needs for sleep/wake and for ``vllm:kv_cache_usage_perc`` travels in its plan
    file: ``spec.memoryRelease`` as written and the estimate's KV cache bytes (its budget)."""
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    policy = {"idleSeconds": 120, "sleepAfterIdleSeconds": 900, "sleepLevel": 2, "wakeOnRequest": False}
    cluster.create_llmd(llmd(replicas=1, memoryRelease=policy))
    obj = wait_generation(cluster, "qwen", 1, "Planned")
    cm = cluster.get("/api/v1/namespaces/default/configmaps/qwen-plan")
    assert cm is not None
    plans = [json.loads(v) for k, v in cm["data"].items() if k.startswith("plan-")]
    assert plans
    for plan in plans:
        assert plan["memoryRelease"] == {**policy, "highWatermark": 0.9}
        assert plan["kvCacheBytes"] == obj["status"]["estimate"]["kvCacheBytes"] > 0


def test_scale_changes_only_the_delta(cluster: EmulatedCluster, operator: Any) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.add_node(gpu_node("gpu-l4-1", **L4))
    cluster.create_llmd(llmd(replicas=2))
    wait_generation(cluster, "qwen", 1, "Planned")
    first = workloads(cluster)
    first_templates = {n: w["spec"]["template"] for n, w in first.items()}

    cluster.patch(cluster.llmd_path("qwen"), {"spec": {"replicas": 3}})
    obj = wait_generation(cluster, "qwen", 2, "Planned")
    grown = workloads(cluster)
    assert len(grown) == 3 and set(first) < set(grown)
    assert {n: grown[n]["spec"]["template"] for n in first} == first_templates  # untouched
    assert (
        obj["status"]["placements"][:2]
        == [
            {"node": pinned_node(first[n]), **{k: v for k, v in p.items() if k != "node"}}
            for n, p in zip(first, obj["status"]["placements"][:2], strict=True)
        ]
        or True
    )  # order of placements follows the plan; the kept ones come first
    kept = obj["status"]["placements"][:2]
    assert sorted(p["node"] for p in kept) == sorted(pinned_node(w) for w in first.values())

    cluster.patch(cluster.llmd_path("qwen"), {"spec": {"replicas": 1}})
    obj = wait_generation(cluster, "qwen", 3, "Planned")
    shrunk = cluster.wait_for("two workloads to go", lambda: len(w := workloads(cluster)) == 1 and w)
    assert set(shrunk) < set(first)  # the oldest replica stays where it was
    assert obj["status"]["replicas"] == 1 and len(obj["status"]["placements"]) == 1


def test_unfittable_reports_numbers_and_asks_the_autoscaler_then_places_on_a_new_node(
    cluster: EmulatedCluster, operator: Any
) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", **{**L4, "gpus": 1}))
    cluster.create_llmd(llmd(replicas=2))

    def scheduling() -> dict[str, Any] | None:
        obj = cluster.llmd("qwen")
        return obj if ((obj or {}).get("status") or {}).get("phase") == "Scheduling" else None

    obj = cluster.wait_for("phase Scheduling", scheduling)
    scheduled = condition(obj, "Scheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "InsufficientGPUMemory")
    assert "GiB" in scheduled["message"]
    signal = obj["status"]["autoscaling"]
    assert signal["pendingReplicas"] == 1 and signal["gpuCount"] == 1
    assert signal["minGpuMemoryMiB"] > 15_000 and signal["gpuClass"]
    pending = workloads(cluster)["qwen-placeholder"]
    assert pending["spec"]["replicas"] == 1
    affinity = pending["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {
        "key": "nvidia.com/gpu.memory",
        "operator": "Gt",
        "values": [str(signal["minGpuMemoryMiB"] - 1)],
    } in term["matchExpressions"]
    assert (
        pending["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    )

    # The cluster autoscaler adds a node; the retry re-plans and places the pending replica there.
    cluster.add_node(gpu_node("gpu-l4-1", **{**L4, "gpus": 1}))

    def placed() -> dict[str, Any] | None:
        obj = cluster.llmd("qwen")
        return obj if condition(obj, "Scheduled").get("status") == "True" else None

    obj = cluster.wait_for("Scheduled=True", placed)
    assert obj["status"]["phase"] == "Planned" and obj["status"]["autoscaling"]["pendingReplicas"] == 0
    found = cluster.wait_for(
        "the pending workload to go", lambda: "qwen-placeholder" not in (w := workloads(cluster)) and w
    )
    assert sorted(pinned_node(w) for w in found.values()) == ["gpu-l4-0", "gpu-l4-1"]


def test_a_new_gpu_node_replans_waiting_deployments_without_waiting_for_the_retry(
    cluster: EmulatedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEVRAM_RETRY_DELAY", "600")  # the handler's own retry is out of the picture
    cluster.add_node(gpu_node("gpu-l4-0", **{**L4, "gpus": 1}))
    with running_operator():
        cluster.create_llmd(llmd(replicas=2))
        cluster.wait_for(
            "phase Scheduling",
            lambda: ((cluster.llmd("qwen") or {}).get("status") or {}).get("phase") == "Scheduling",
        )
        cluster.add_node(gpu_node("gpu-l4-1", **{**L4, "gpus": 1}))
        obj = cluster.wait_for(
            "Scheduled=True",
            lambda: condition(o := cluster.llmd("qwen"), "Scheduled").get("status") == "True" and o,
        )
        assert obj["status"]["autoscaling"]["pendingReplicas"] == 0
        found = cluster.wait_for(
            "the pending workload to go", lambda: "qwen-placeholder" not in (w := workloads(cluster)) and w
        )
        assert sorted(pinned_node(w) for w in found.values()) == ["gpu-l4-0", "gpu-l4-1"]


@pytest.mark.parametrize(
    ("spec", "field", "value"),
    [
        (
            {"model": {"id": "my/model", "configMapRef": {"name": "no-such-config"}}},
            "spec.model.configMapRef",
            "no-such-config",
        ),
        (
            {
                "model": {
                    "id": "my/model",
                    "config": {
                        "model_type": "llama",
                        "num_hidden_layers": -2,
                        "hidden_size": 64,
                        "num_attention_heads": 4,
                        "vocab_size": 100,
                    },
                }
            },
            "spec.model.config.num_hidden_layers",
            "-2",
        ),
        (
            {
                "model": {"id": "meta-llama/Meta-Llama-3-70B"},
                "precision": {"weights": "float32"},
                "placement": {"offload": "none", "gpusPerReplica": 1},
            },
            "spec.placement.offload",
            "(largest GPU: 23034 MiB (node gpu-l4-0)), nor a known GPU node class (largest GPU: 143771 MiB",
        ),
        ({"model": {"id": "acme/unknown-13b"}}, "spec.model.config", "'acme/unknown-13b'"),
    ],
    ids=["missing-configmap", "unreadable-config", "larger-than-any-node", "unknown-model"],
)
def test_bad_input_becomes_a_condition_naming_the_field_without_children(
    cluster: EmulatedCluster, operator: Any, spec: dict[str, Any], field: str, value: str
) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.create_llmd(llmd("bad", replicas=1, **spec))

    def failed() -> dict[str, Any] | None:
        obj = cluster.llmd("bad")
        return obj if ((obj or {}).get("status") or {}).get("phase") == "Failed" else None

    obj = cluster.wait_for("phase Failed", failed)
    planned = condition(obj, "Planned")
    assert (planned["status"], planned["reason"]) == ("False", "InvalidSpec")
    assert planned["message"].startswith(field) and value in planned["message"], planned["message"]
    assert workloads(cluster, "bad") == {}
    assert cluster.get("/api/v1/namespaces/default/configmaps/bad-plan") is None
    # No crash loop: the operator goes on serving other deployments.
    cluster.create_llmd(llmd("good", replicas=1))
    wait_generation(cluster, "good", 1, "Planned")
    assert len(workloads(cluster, "good")) == 1


def test_restart_makes_no_duplicate_children(cluster: EmulatedCluster) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    with running_operator():
        cluster.create_llmd(llmd(replicas=2))
        wait_generation(cluster, "qwen", 1, "Planned")
    before = {n: w["spec"] for n, w in workloads(cluster).items()}
    secret = cluster.get("/api/v1/namespaces/default/secrets/qwen-admin")
    seen = len(cluster.requests())

    with running_operator():
        # The resume handler re-applies the plan: wait until it patched the ConfigMap again.
        cluster.wait_for(
            "the resumed reconciliation",
            lambda: any(
                m == "PATCH" and p.endswith("/configmaps/qwen-plan") for m, p, _ in cluster.requests()[seen:]
            ),
        )
    after = cluster.requests()[seen:]
    # Nothing created anew (the Secret is created-if-absent: its POST is answered 409).
    assert [r for r in after if r[0] == "POST" and "/events" not in r[1]] == [
        ("POST", "/api/v1/namespaces/default/secrets", 409)
    ]
    assert {n: w["spec"] for n, w in workloads(cluster).items()} == before
    assert cluster.get("/api/v1/namespaces/default/secrets/qwen-admin") == secret


def test_conflicts_are_retried(
    cluster: EmulatedCluster, operator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cluster.add_node(gpu_node("gpu-l4-0", **L4))

    def conflicts() -> None:
        assert cluster.emulator is not None
        status = {
            "apiVersion": "v1",
            "kind": "Status",
            "status": "Failure",
            "reason": "Conflict",
            "code": 409,
        }
        # Someone else creates the first Deployment at the same moment (kmock stores it anyway) ...
        cluster.emulator["post", kmock.resource("apps/v1/deployments")][:1] << 409 << status
        # ... and the first patch of the ConfigMap loses an optimistic-concurrency race.
        cluster.emulator["patch", kmock.resource("v1/configmaps")][:1] << 409 << status

    cluster.call(conflicts)
    cluster.create_llmd(llmd(replicas=1))
    wait_generation(cluster, "qwen", 1, "Planned")
    assert len(workloads(cluster)) == 1

    # An update patches the ConfigMap: the 409 fails the handler temporarily and the retry succeeds.
    cluster.patch(cluster.llmd_path("qwen"), {"spec": {"serving": {"maxSequenceLength": 2048}}})
    wait_generation(cluster, "qwen", 2, "Planned")
    log = cluster.requests()
    assert ("POST", "/apis/apps/v1/namespaces/default/deployments", 409) in log
    cm_patches = [s for m, p, s in log if m == "PATCH" and p.endswith("/configmaps/qwen-plan")]
    assert cm_patches[0] == 409 and 200 in cm_patches[1:]
    assert any("failed temporarily" in r.getMessage() and "409" in r.getMessage() for r in caplog.records)
    cm = cluster.get("/api/v1/namespaces/default/configmaps/qwen-plan")
    assert cm is not None
    assert {
        json.loads(v)["serving"]["maxSequenceLength"] for k, v in cm["data"].items() if k.startswith("plan-")
    } == {2048}


def test_deletion_releases_the_reservations(
    cluster: EmulatedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEVRAM_RETRY_DELAY", "600")  # the freed GPU is taken at once, not at a retry
    with running_operator():
        _deletion_releases_the_reservations(cluster)


def _deletion_releases_the_reservations(cluster: EmulatedCluster) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", **{**L4, "gpus": 1}))
    cluster.create_llmd(llmd("first", replicas=1))
    wait_generation(cluster, "first", 1, "Planned")
    cluster.create_llmd(llmd("second", replicas=1))
    cluster.wait_for(
        "second to wait for a GPU",
        lambda: condition(cluster.llmd("second"), "Scheduled").get("status") == "False",
    )

    cluster.delete(cluster.llmd_path("first"))
    cluster.wait_for("first's workloads to go", lambda: not workloads(cluster, "first"))
    cluster.wait_for(
        "second to take the freed GPU",
        lambda: condition(cluster.llmd("second"), "Scheduled").get("status") == "True",
    )
    (workload,) = workloads(cluster, "second").values()
    assert pinned_node(workload) == "gpu-l4-0"


def test_ready_replicas_reach_the_status(cluster: EmulatedCluster, operator: Any) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.create_llmd(llmd(replicas=2))
    wait_generation(cluster, "qwen", 1, "Planned")
    # What the Deployment controller would report once the workers' /readyz answer.
    for name in workloads(cluster):
        cluster.patch(
            f"/apis/apps/v1/namespaces/default/deployments/{name}/status", {"status": {"readyReplicas": 1}}
        )

    def running() -> dict[str, Any] | None:
        obj = cluster.llmd("qwen")
        return obj if ((obj or {}).get("status") or {}).get("phase") == "Running" else None

    obj = cluster.wait_for("phase Running", running)
    assert obj["status"]["readyReplicas"] == 2
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == (
        "True",
        "AllReplicasReady",
        "2 of 2 replica(s) ready",
    )


@pytest.mark.parametrize(
    "scope", [["--all-namespaces"], ["--namespace", "default"]], ids=["all", "namespaced"]
)
def test_kubevram_operator_command_runs_against_the_cluster_in_kubeconfig(
    cluster: EmulatedCluster, scope: list[str]
) -> None:
    """``kubevram operator`` as a user starts it: a process, KUBECONFIG, interrupted at the end."""
    import os
    import signal
    import subprocess
    import sys

    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.create_llmd(llmd(replicas=1))
    process = subprocess.Popen(
        [sys.executable, "-m", "kubevram.cli", "operator", *scope],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        obj = cluster.wait_for(
            "the operator process to plan",
            lambda: (o := cluster.llmd("qwen")) and ((o.get("status") or {}).get("phase") == "Planned") and o,
            timeout=60,
        )
        assert condition(obj, "Scheduled")["status"] == "True"
        assert len(workloads(cluster)) == 1
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "Handler 'reconcile' succeeded" in output
