"""Pure rendering of the children and the status from a plan JSON written by hand."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from kubevram.api.load import parse_deployment
from kubevram.api.workerplan import WorkerPlan
from kubevram.controller import render, status

GiB = 2**30
UID = "7d1c7c1e-0000-4000-8000-000000000001"


def body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llm.kubevram.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "qwen", "namespace": "ai", "uid": UID, "generation": 3},
        "spec": {"replicas": 3, "model": {"id": "Qwen/Qwen2-7B-Instruct"}, **spec},
    }


def replica(node: str, gpus: list[int], per_gpu: int = 20 * GiB, **extra: Any) -> dict[str, Any]:
    return {
        "node": node,
        "gpus": gpus,
        "maxMemory": {str(i): per_gpu for i in range(len(gpus))},
        "deviceMap": {
            "model.embed_tokens": 0,
            "model.layers.0": 0,
            "model.norm": len(gpus) - 1,
            "lm_head": len(gpus) - 1,
        },
        **extra,
    }


ESTIMATE = {
    "parameters": 7_615_616_512,
    "weightsBytes": 15_231_233_536,
    "kvCacheBytesPerToken": 57_344,
    "kvCacheBytes": 234_881_024,
    "activationBytes": 524_288_000,
    "overheadBytesPerGPU": 1_342_177_280,
    "totalBytes": 17_370_538_291,
}

# Two replicas alike on gpu-a (GPUs 0 and 1: different node GPUs, so different shapes), one on gpu-b
# over two GPUs, one pending with the planner's autoscaling requirements.
PLAN = {
    "name": "qwen",
    "estimate": ESTIMATE,
    "replicas": [replica("gpu-a", [0]), replica("gpu-a", [1]), replica("gpu-b", [2, 3], 9 * GiB)],
    "unscheduled": {
        "count": 1,
        "reason": "needs 1 GPU with >= 16.2 GiB; every admitting GPU is taken",
        "autoscaling": {
            "gpuClass": "a10g",
            "minGpuMemoryMiB": 16566,
            "gpuCount": 1,
            "nodeAffinity": [{"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["16565"]}],
        },
    },
}


OPERATOR_NAMESPACE = "kubevram-system"
OPERATOR_LABELS = {"app.kubernetes.io/name": "kubevram", "app.kubernetes.io/instance": "kubevram"}


def children(plan: dict[str, Any] = PLAN, **spec: Any) -> list[dict[str, Any]]:
    b = body(**spec)
    dep = parse_deployment(b)
    return render.render_children(
        b, dep.spec, plan, image="registry.local/worker:1", operator_namespace=OPERATOR_NAMESPACE,
        operator_labels=OPERATOR_LABELS,
    )


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def test_every_child_is_owned_namespaced_and_labelled() -> None:
    objs = children()
    assert sorted(o["kind"] for o in objs) == [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "Deployment",
        "Deployment",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    for obj in objs:
        meta = obj["metadata"]
        assert meta["namespace"] == "ai"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "llm.kubevram.io/v1alpha1",
                "kind": "LLMDeployment",
                "name": "qwen",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubevram"
        assert meta["labels"]["llm.kubevram.io/deployment"] == "qwen"


@pytest.mark.parametrize("index", range(len(children())))
def test_children_validate_against_the_kubernetes_schemas(index: int) -> None:
    kubernetes_validate.validate(children()[index], "1.37.0", strict=True)


def test_one_workload_per_placement_shape_pinned_to_its_node_with_gpu_requests() -> None:
    workloads = {d["metadata"]["name"]: d for d in by_kind(children(), "Deployment")}
    placed = [d for n, d in workloads.items() if not n.endswith("-placeholder")]
    assert len(placed) == 3 and all(d["spec"]["replicas"] == 1 for d in placed)
    nodes = []
    for workload in placed:
        pod = workload["spec"]["template"]["spec"]
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        (expression,) = term["matchExpressions"]
        assert expression["key"] == "kubernetes.io/hostname" and expression["operator"] == "In"
        nodes.append(expression["values"][0])
        container = pod["containers"][0]
        reservation = json.loads(workload["spec"]["template"]["metadata"]["annotations"][render.RESERVATION])
        assert reservation["node"] == expression["values"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(len(reservation["gpus"]))
        assert container["resources"]["requests"]["nvidia.com/gpu"] == str(len(reservation["gpus"]))
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert (
            workload["spec"]["selector"]["matchLabels"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
        )
    assert sorted(nodes) == ["gpu-a", "gpu-a", "gpu-b"]
    two_gpu = next(
        d for d in placed if '"gpu-b"' in d["spec"]["template"]["metadata"]["annotations"][render.RESERVATION]
    )
    reservation = json.loads(two_gpu["spec"]["template"]["metadata"]["annotations"][render.RESERVATION])
    assert reservation == {"node": "gpu-b", "gpus": {"2": 9 * GiB, "3": 9 * GiB}, "sharing": "exclusive"}


def test_replicas_alike_share_one_workload() -> None:
    plan = {
        **PLAN,
        "replicas": [replica("gpu-a", [0], shared=True), replica("gpu-a", [0], shared=True)],
        "unscheduled": {"count": 0},
    }
    (workload,) = by_kind(children(plan), "Deployment")
    assert workload["spec"]["replicas"] == 2


def test_pending_replicas_get_a_placeholder_that_yields_and_asks_for_a_big_enough_gpu() -> None:
    objs = children(
        placement={"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A10G"}},
        worker={"resources": {"requests": {"cpu": "4", "memory": "32Gi", "example.com/foo": "1"}}},
    )
    (pending,) = [d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "qwen-placeholder"]
    assert pending["spec"]["replicas"] == 1
    template = pending["spec"]["template"]
    pod = template["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["16565"]}
    ]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}  # the product, when pinned
    # The cluster autoscaler's overprovisioning pattern: pause, negative priority, exactly the requests.
    assert pod["priorityClassName"] == "kubevram-placeholder"
    (container,) = pod["containers"]
    assert container["image"] == render.PAUSE_IMAGE
    # What a worker of this deployment requests, so that a node that fits the placeholder fits it.
    worker = next(d for d in by_kind(objs, "Deployment") if d is not pending)
    wants = worker["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert container["resources"]["requests"] == wants["requests"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"  # the signal's gpuCount
    assert {"cpu": "4", "memory": "32Gi", "example.com/foo": "1"}.items() <= wants["requests"].items()
    assert container["resources"]["limits"] == wants["limits"]
    # Nothing reserved, nothing selected by the Service or counted as the deployment's pods.
    assert render.RESERVATION not in (template["metadata"].get("annotations") or {})
    assert render.LABEL_DEPLOYMENT not in template["metadata"]["labels"]
    assert not render.selector_labels("qwen").items() <= template["metadata"]["labels"].items()
    assert template["metadata"]["labels"][render.LABEL_PLACEHOLDER] == "qwen"
    assert pending["metadata"]["labels"][render.LABEL_DEPLOYMENT] == "qwen"  # listed with its owner
    assert pending["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert pod["automountServiceAccountToken"] is False and "volumes" not in pod
    kubernetes_validate.validate(pending, "1.37.0", strict=True)


def test_shared_placeholders_ask_for_a_time_sliced_gpu() -> None:
    from kubevram_emulator import gpu_node

    from kubevram.planner.placement import plan_cluster

    shared = parse_deployment(body(model={"id": "Qwen/Qwen2-0.5B-Instruct"}, placement={"sharing": "shared"}))
    (plan,) = plan_cluster([shared], [gpu_node("plain", gpus=1)]).to_json()
    assert plan["replicas"] == [] and plan["unscheduled"]["count"] == shared.spec.replicas
    (pending,) = [d for d in render.render_workloads(body(), shared.spec, plan, image="w") if
                  d["metadata"]["name"].endswith("-placeholder")]
    (term,) = pending["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "nvidia.com/gpu.replicas", "operator": "Gt", "values": ["1"]} in term["matchExpressions"]


def test_a_toleration_the_spec_already_lists_is_not_repeated() -> None:
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    mine = {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
    plan = {**PLAN, "replicas": [replica("gpu-a", [0])]}
    for workload in by_kind(children(plan, placement={"tolerations": [gpu, mine]}), "Deployment"):
        assert workload["spec"]["template"]["spec"]["tolerations"] == [gpu, mine]


def test_config_map_holds_one_worker_plan_per_device_map() -> None:
    (cm,) = by_kind(children(), "ConfigMap")
    keys = sorted(cm["data"])
    # gpu-a's two replicas have the same device map and budgets: one plan file for both.
    assert len(keys) == 3 and "plan.json" in keys  # the placeholder runs no worker: no plan file
    for key in keys:
        if key == "plan.json":
            assert json.loads(cm["data"][key])["replicas"] == PLAN["replicas"]
            continue
        plan = WorkerPlan.parse(json.loads(cm["data"][key]), source=key)
        assert plan.model.id == "Qwen/Qwen2-7B-Instruct"
        assert plan.deployment.name == "qwen" and plan.deployment.namespace == "ai"
    two = [
        WorkerPlan.parse(json.loads(v))
        for k, v in cm["data"].items()
        if k != "plan.json"
    ]
    assert sorted(len(p.maxMemory or {}) for p in two) == [1, 2]
    assert {p.maxMemory["1"] for p in two if p.maxMemory and "1" in p.maxMemory} == {9 * GiB}


def test_worker_container_runs_the_plan_with_probes_token_and_admin_port_off_the_service() -> None:
    objs = children()
    workload = next(
        d for d in by_kind(objs, "Deployment") if d["metadata"]["labels"][render.LABEL_SHAPE] != "placeholder"
    )
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[:3] == ["worker", "--model", "Qwen/Qwen2-7B-Instruct"]
    plan_path = args[args.index("--plan") + 1]
    key = plan_path.rsplit("/", 1)[1]
    (cm,) = by_kind(objs, "ConfigMap")
    assert key in cm["data"]
    assert pod["volumes"][0]["configMap"] == {"name": "qwen-plan", "items": [{"key": key, "path": key}]}
    assert args[args.index("--port") + 1] == "8000" and args[args.index("--admin-port") + 1] == "8001"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    token = next(e for e in container["env"] if e["name"] == "KUBEVRAM_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "qwen-admin", "key": "token"}
    assert pod["serviceAccountName"] == "qwen-worker"
    assert container["image"] == "registry.local/worker:1"
    (service,) = by_kind(objs, "Service")
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]
    assert service["spec"]["selector"] == render.selector_labels("qwen")
    (binding,) = by_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "qwen-worker"
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "qwen-worker", "namespace": "ai"}]


def test_model_volume_offload_and_user_settings_reach_the_pod() -> None:
    plan: dict[str, Any] = {**PLAN, "replicas": [replica("gpu-a", [0])], "unscheduled": {"count": 0}}
    plan["replicas"][0]["maxMemory"] = {"0": 10 * GiB, "cpu": 30 * GiB}
    objs = children(
        plan,
        model={"id": "qwen2-7b", "volume": {"persistentVolumeClaim": {"claimName": "models"}}},
        placement={
            "offload": "disk",
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
            ],
        },
        worker={"env": [{"name": "HF_HUB_OFFLINE", "value": "0"}], "resources": {"requests": {"cpu": "4"}}},
    )
    (workload,) = by_kind(objs, "Deployment")
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][2] == "/models/qwen2-7b"
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models"}} in pod["volumes"]
    # The disk budget (none here) plus 2 GiB of headroom.
    assert {"name": "offload", "emptyDir": {"sizeLimit": "2048Mi"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert [e for e in container["env"] if e["name"] == "HF_HUB_OFFLINE"] == [
        {"name": "HF_HUB_OFFLINE", "value": "0"}
    ]
    # Host memory: the CPU budget (30 GiB) and 4 GiB for the worker itself; scratch: /tmp 2 GiB, the
    # home 2 GiB (weights are on the volume), /offload 2 GiB.
    assert container["resources"]["requests"] == {
        "cpu": "4", "nvidia.com/gpu": "1", "memory": f"{34 * 1024}Mi", "ephemeral-storage": f"{6 * 1024}Mi",
    }
    (cm,) = by_kind(objs, "ConfigMap")
    worker_plan = next(WorkerPlan.parse(json.loads(v)) for k, v in cm["data"].items() if k != "plan.json")
    assert worker_plan.offloadFolder == "/tmp/kubevram-offload"


def test_mig_replicas_request_the_mig_resource() -> None:
    plan = {
        **PLAN,
        "replicas": [replica("gpu-a", [0], resource="nvidia.com/mig-3g.40gb")],
        "unscheduled": {"count": 0},
    }
    (workload,) = by_kind(children(plan), "Deployment")
    assert workload["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "nvidia.com/mig-3g.40gb": "1", "memory": f"{4 * 1024}Mi"
    }


def test_plan_changes_change_the_pod_template() -> None:
    (before,) = by_kind(
        children({**PLAN, "unscheduled": {"count": 0}, "replicas": [replica("gpu-a", [0])]}), "Deployment"
    )
    after_plan = {**PLAN, "unscheduled": {"count": 0}, "replicas": [replica("gpu-a", [0], per_gpu=21 * GiB)]}
    (after,) = by_kind(children(after_plan), "Deployment")
    assert before["metadata"]["name"] != after["metadata"]["name"]  # a new shape: a new workload
    annotations = after["spec"]["template"]["metadata"]["annotations"]
    assert (
        annotations[render.PLAN_HASH]
        != before["spec"]["template"]["metadata"]["annotations"][render.PLAN_HASH]
    )


# ------------------------------------------------------------------------------------- status


def test_planned_status_carries_estimate_placements_and_autoscaling() -> None:
    new = status.planned_status("qwen", PLAN, desired=4, ready=0, generation=3, old_conditions=None, now="T1")
    assert new["phase"] == "Scheduling"
    assert new["observedGeneration"] == 3
    assert new["replicas"] == 4 and new["readyReplicas"] == 0
    assert new["selector"] == "app.kubernetes.io/managed-by=kubevram,llm.kubevram.io/deployment=qwen"
    assert new["estimate"] == ESTIMATE
    assert new["placements"][2] == {"node": "gpu-b", "gpus": [2, 3], "budgets": {"0": 9 * GiB, "1": 9 * GiB}}
    assert new["autoscaling"] == {
        "pendingReplicas": 1,
        "gpuClass": "a10g",
        "minGpuMemoryMiB": 16566,
        "gpuCount": 1,
        "nodeCount": 1,
        "reason": "needs 1 GPU with >= 16.2 GiB; every admitting GPU is taken",
    }
    conditions = {c["type"]: c for c in new["conditions"]}
    assert [c["type"] for c in new["conditions"]] == ["Planned", "Scheduled", "Ready"]
    assert conditions["Scheduled"]["status"] == "False"
    assert conditions["Scheduled"]["reason"] == "InsufficientGPUMemory"
    assert "16.2 GiB" in conditions["Scheduled"]["message"]
    assert conditions["Planned"]["status"] == "True"
    assert new["vramPerReplica"] == "20.0Gi"


def test_condition_transition_time_moves_only_when_the_status_does() -> None:
    first = status.planned_status(
        "qwen", PLAN, desired=4, ready=0, generation=1, old_conditions=None, now="T1"
    )
    placed = {**PLAN, "unscheduled": {"count": 0}}
    second = status.planned_status(
        "qwen", placed, desired=3, ready=0, generation=2, old_conditions=first["conditions"], now="T2"
    )
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times == {"Planned": "T1", "Scheduled": "T2", "Ready": "T1"}
    assert second["phase"] == "Planned"
    third = status.planned_status(
        "qwen", placed, desired=3, ready=3, generation=2, old_conditions=second["conditions"], now="T3"
    )
    assert third["phase"] == "Running"
    assert {c["type"]: c["lastTransitionTime"] for c in third["conditions"]}["Ready"] == "T3"


def test_failed_status_names_the_field() -> None:
    failed = status.failed_status(
        "qwen",
        "Planned",
        "InvalidSpec",
        "spec.model.configMapRef: {name: 'cfg'}: not found",
        generation=2,
        old_conditions=None,
        now="T",
    )
    assert failed["phase"] == "Failed"
    planned = failed["conditions"][0]
    assert (planned["type"], planned["status"], planned["reason"]) == ("Planned", "False", "InvalidSpec")
    assert planned["message"].startswith("spec.model.configMapRef")
