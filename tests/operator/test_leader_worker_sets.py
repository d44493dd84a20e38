"""Multi-node replicas through the operator on the emulated API server: a model larger than any node runs
as one LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) whose pods hold GPUs on every node of the group
(the ledger counts them), whose manifest the published LeaderWorkerSet schema and the Kubernetes pod
schema accept, whose pods are the single-node workers' (security, volumes) pinned one per node, with
one plan file every rank reads; without LeaderWorkerSet installed, a condition says so."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_check import chart_module
from kubevram_emulator import EmulatedCluster, emulated_cluster, gpu_node, llm_deployment, running_operator
from pod_security import restricted
from rbac_check import denied
from test_rbac import chart_rules

from kubevram.api.workerplan import WorkerPlan
from kubevram.controller import render

ROOT = Path(__file__).resolve().parents[2]
LWS_SCHEMA = ROOT / "tests" / "data" / "lws" / "leaderworkerset-crd-schema.yaml"
H100 = {"gpus": 8, "memory_mib": 81559, "product": "NVIDIA-H100-80GB-HBM3"}
L405 = "meta-llama/Llama-3.1-405B-Instruct"


@pytest.fixture()
def lws_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedCluster]:
    """The emulated API server with LeaderWorkerSet installed."""
    with emulated_cluster(tmp_path, monkeypatch, leader_worker_sets=True) as emulated:
        yield emulated


def lws_validator() -> jsonschema.Draft4Validator:
    """The LeaderWorkerSet CRD's schema (tests/data/lws, from kubernetes-sigs/lws) as the API server
    applies it: unknown fields refused, defaults and int-or-strings as structural schemas say."""
    crd = yaml.safe_load(LWS_SCHEMA.read_text(encoding="utf-8"))
    (version,) = crd["spec"]["versions"]
    schema = chart_module().openapi_to_jsonschema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["apiVersion"] = {"enum": ["leaderworkerset.x-k8s.io/v1"]}
    schema["properties"]["kind"] = {"enum": ["LeaderWorkerSet"]}
    schema["additionalProperties"] = False
    return jsonschema.Draft4Validator(schema)


def phase(cluster: EmulatedCluster, name: str, want: str) -> dict[str, Any] | None:
    obj = cluster.llmd(name)
    return obj if ((obj or {}).get("status") or {}).get("phase") == want else None


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


def test_a_model_larger_than_a_node_runs_as_one_leader_worker_set(lws_cluster: EmulatedCluster) -> None:
    cluster = lws_cluster
    for i in range(2):
        cluster.add_node(gpu_node(f"gpu-h100-{i}", **H100))
    with running_operator():
        cluster.create_llmd(llm_deployment("l405", L405))
        obj = cluster.wait_for("l405 Planned", lambda: phase(cluster, "l405", "Planned"))
        (lws,) = cluster.wait_for("its LeaderWorkerSet", cluster.leader_worker_sets)
        assert cluster.deployments() == []  # no single-node workload, no placeholder

        # The manifest: as the LeaderWorkerSet CRD and the Kubernetes pod schema accept it.
        sent = {k: v for k, v in lws.items() if k != "status"}
        kept = ("name", "namespace", "labels", "annotations", "ownerReferences")
        sent["metadata"] = {k: v for k, v in lws["metadata"].items() if k in kept}
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in lws_validator().iter_errors(sent)]
        assert errors == []
        spec = lws["spec"]
        template = spec["leaderWorkerTemplate"]
        assert (spec["replicas"], template["size"], template["restartPolicy"]) == (
            1, 2, "RecreateGroupOnPodRestart"
        )
        for role in ("leaderTemplate", "workerTemplate"):
            pod = template[role]
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": pod},
                "1.37.0", strict=True,
            )
            # The single-node workers' pods: PodSecurity restricted, read-only root, sized scratch volumes.
            assert restricted(pod["spec"], pod["metadata"]) == []
            (container,) = pod["spec"]["containers"]
            assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
            assert {"name": "group", "containerPort": 29500, "protocol": "TCP"} in container["ports"]
            assert {v["name"] for v in pod["spec"]["volumes"]} >= {"plan", "tmp", "model-cache"}
        leader, worker = template["leaderTemplate"], template["workerTemplate"]
        assert {k: v for k, v in leader["spec"].items() if k != "affinity"} == {
            k: v for k, v in worker["spec"].items() if k != "affinity"
        }

        def hosts(pod: dict[str, Any]) -> list[str]:
            terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            (term,) = terms["nodeSelectorTerms"]
            (expr,) = term["matchExpressions"]
            assert (expr["key"], expr["operator"]) == ("kubernetes.io/hostname", "In")
            return list(expr["values"])

        assert (hosts(leader), hosts(worker)) == (["gpu-h100-0"], ["gpu-h100-1"])
        assert worker["spec"]["affinity"]["podAntiAffinity"]  # one pod of the group per node

        # Every pod of the group reads one plan file: the layout and every rank's budget.
        key = container["args"][container["args"].index("--plan") + 1].rsplit("/", 1)[-1]
        cm = cluster.get("/api/v1/namespaces/default/configmaps/l405-plan")
        assert cm is not None
        plan = WorkerPlan.parse(json.loads(cm["data"][key]))
        group = plan.group
        assert group is not None and plan.deviceMap is None
        assert (group.size, group.gpusPerPod, group.tensorParallel, group.pipelineParallel) == (2, 8, 8, 2)
        assert [s.layers for s in group.stages] == [[0, 63], [63, 126]]
        assert len(group.ranks) == 16 and group.rank(1, 0).stage == 1

        # The API reaches the leaders only; the group's pods reach each other on every port.
        service = cluster.get("/api/v1/namespaces/default/services/l405")
        assert service is not None
        assert service["spec"]["selector"][render.LWS_WORKER_INDEX] == "0"
        policy = cluster.get("/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/l405-worker")
        assert policy is not None
        assert {"from": [{"podSelector": {"matchLabels": render.selector_labels("l405")}}]} in policy["spec"][
            "ingress"
        ]

        status = obj["status"]
        # What the API server keeps of the status: nothing the CRD's structural schema does not name.
        crd = yaml.safe_load((ROOT / "crds" / "llmdeployment.yaml").read_text(encoding="utf-8"))
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        checker = jsonschema.Draft4Validator(chart_module().openapi_to_jsonschema(copy.deepcopy(schema)))
        assert [e.message for e in checker.iter_errors(status)] == []
        (placement,) = status["placements"]
        assert [p["node"] for p in placement["pods"]] == ["gpu-h100-0", "gpu-h100-1"]
        assert conditions(obj)["Scheduled"]["reason"] == "AllPlaced"

        # The ledger holds every GPU of both nodes: the next deployment waits for a GPU.
        cluster.create_llmd(llm_deployment("q"))
        waiting = cluster.wait_for("q waiting", lambda: phase(cluster, "q", "Scheduling"))
        assert "every admitting GPU is taken" in conditions(waiting)["Scheduled"]["message"]
        # Deleting the group frees them.
        cluster.delete(cluster.llmd_path("l405"))
        cluster.wait_for("q Planned", lambda: phase(cluster, "q", "Planned"))
        assert cluster.leader_worker_sets() == []

    assert cluster.emulator is not None
    watched = cluster.call(lambda: set(cluster.emulator.watched))  # type: ignore[union-attr]
    assert denied(chart_rules(), cluster.requests(), watched) == []


def test_without_leader_worker_set_the_group_waits_and_a_condition_says_why(
    cluster: EmulatedCluster, operator: Any
) -> None:
    for i in range(2):
        cluster.add_node(gpu_node(f"gpu-h100-{i}", **H100))
    cluster.create_llmd(llm_deployment("l405", L405))
    obj = cluster.wait_for("l405 waiting", lambda: phase(cluster, "l405", "Scheduling"))
    scheduled = conditions(obj)["Scheduled"]
    assert (scheduled["status"], scheduled["reason"]) == ("False", "LeaderWorkerSetUnavailable")
    assert "group of 2 pods x 8 GPUs" in scheduled["message"]
    assert "leaderworkerset.x-k8s.io/v1" in scheduled["message"]
    # No workload, no placeholder (no node would make it runnable), no GPU held.
    assert cluster.deployments() == []
    cluster.create_llmd(llm_deployment("q"))
    cluster.wait_for("q Planned", lambda: phase(cluster, "q", "Planned"))
