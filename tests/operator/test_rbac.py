"""Least privilege, checked against what the code really calls: every request the operator makes in a
scenario of creates, a pending replica, a deletion and an upgrade from the shared workers' ClusterRole
is allowed by the chart's ClusterRoles; every request of the worker's status reporter is allowed by
the Role the operator renders for it, and a Role of another LLMDeployment allows none. The rendered
workers pass PodSecurity `restricted` there too."""

from __future__ import annotations

from typing import Any

import httpx
import kmock
import pytest
from crd_check import chart_module
from kubevram_emulator import EmulatedCluster, gpu_node, llm_deployment
from pod_security import pod_template_violations
from rbac_check import attributes, denied

from kubevram.controller import render

L4 = {"gpus": 1, "memory_mib": 23034, "product": "NVIDIA-L4"}


def chart_rules() -> list[dict[str, Any]]:
    """The rules the default chart grants the operator's ServiceAccount (all bound cluster-wide)."""
    docs, _ = chart_module().render_chart()
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    bound = [roles[b["roleRef"]["name"]] for b in docs if b["kind"] == "ClusterRoleBinding"]
    return [rule for role in bound for rule in role["rules"]]


def phase(cluster: EmulatedCluster, name: str, want: str) -> dict[str, Any] | None:
    obj = cluster.llmd(name)
    return obj if ((obj or {}).get("status") or {}).get("phase") == want else None


def test_the_chart_grants_every_request_the_operator_makes(cluster: EmulatedCluster, operator: Any) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.add_node(gpu_node("gpu-l4-1", **L4))
    # An older kubevram bound "b"'s workers to the shared ClusterRole: the binding must become the Role's.
    cluster.create(
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "b-worker", "namespace": "default"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "kubevram-worker",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "b-worker", "namespace": "default"}],
        },
    )
    cluster.create(
        "/api/v1/namespaces/default/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "qwen-config", "namespace": "default"},
            "data": {
                "config.json": '{"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, '
                '"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, '
                '"vocab_size": 152064, "max_position_embeddings": 32768}'
            },
        },
    )
    ref = {"configMapRef": {"name": "qwen-config", "key": "config.json"}}
    cluster.create_llmd(llm_deployment("a", model_extra=ref))
    cluster.wait_for("a Planned", lambda: phase(cluster, "a", "Planned"))
    cluster.create_llmd(llm_deployment("b", replicas=2))
    cluster.wait_for("b waiting for a GPU", lambda: phase(cluster, "b", "Scheduling"))
    cluster.delete(cluster.llmd_path("a"))
    cluster.wait_for("b Planned on the GPU a left", lambda: phase(cluster, "b", "Planned"))

    binding = cluster.get("/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings/b-worker")
    assert binding is not None
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "b-worker"}
    assert cluster.get("/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles/b-worker") is not None
    assert cluster.get("/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/b-worker") is not None
    for workload in cluster.deployments():
        assert pod_template_violations(workload) == [], workload["metadata"]["name"]

    assert cluster.emulator is not None
    log = cluster.requests()
    watched = cluster.call(lambda: set(cluster.emulator.watched))  # type: ignore[union-attr]
    assert len(log) > 50
    assert denied(chart_rules(), log, watched) == []
    # What the scenario used of Secrets: creating the admin tokens, nothing else.
    secrets = {r.verb for m, p, _ in log for r in attributes(m, p) if r.resource == "secrets"}
    assert secrets == {"create"}


def test_the_checker_denies_what_the_chart_does_not_grant() -> None:
    rules = chart_rules()
    assert denied(rules, [("GET", "/api/v1/namespaces/default/secrets/other", 200)]) == [
        "get core/secrets other in default"
    ]
    assert denied(rules, [("DELETE", "/api/v1/namespaces/default/secrets/x", 200)]) == [
        "delete core/secrets x in default"
    ]
    assert denied(rules, [("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", 201)]) != []
    assert denied(rules, [("GET", "/apis/apps/v1", 200), ("GET", "/api", 200)]) == []  # discovery


@pytest.fixture
async def api() -> Any:
    """kmock's emulator serving LLMDeployments with their status subresource, for the reporter."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        info = emulator.resources["llm.kubevram.io/v1alpha1/llmdeployments"]
        info.kind = "LLMDeployment"
        info.namespaced = True
        info.verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
        info.subresources = {"status"}
        yield emulator, str(server.url).rstrip("/")


async def test_the_workers_role_grants_every_request_of_the_reporter_and_nothing_of_others(api: Any) -> None:
    from kubevram.worker.memory import MemoryMonitor
    from kubevram.worker.reporter import KubeAPI, StatusReporter

    emulator, url = api
    collection = "/apis/llm.kubevram.io/v1alpha1/namespaces/ai/llmdeployments"
    async with httpx.AsyncClient() as client:
        for name in ("qwen", "other"):
            body = {
                "apiVersion": "llm.kubevram.io/v1alpha1",
                "kind": "LLMDeployment",
                "metadata": {"name": name, "namespace": "ai"},
                "spec": {"model": {"id": "q"}},
            }
            (await client.post(url + collection, json=body)).raise_for_status()
    reporter = StatusReporter(MemoryMonitor(), KubeAPI(url, token="t"), "ai", "qwen", "qwen-0", node="n")
    async with reporter.api.client() as client:
        assert await reporter.report_once(client)
        await reporter._remove(client)  # what a worker does on shutdown
    log = [
        (str(r.method.value).upper(), r.url.path, 200) for r in emulator if r.url.path.startswith("/apis/")
    ]
    log = [entry for entry in log if entry[0] != "POST"]  # the test's own creates
    assert [m for m, _, _ in log] == ["PATCH", "PATCH"]
    assert {r.namespace for m, p, _ in log for r in attributes(m, p)} == {"ai"}  # the Role's namespace

    def role_rules(name: str) -> list[dict[str, Any]]:
        role = render.render_role({"metadata": {"name": name, "namespace": "ai", "uid": "u"}})
        assert role["metadata"]["namespace"] == "ai"
        return list(role["rules"])

    assert denied(role_rules("qwen"), log) == []
    assert denied(role_rules("other"), log) == ["patch llm.kubevram.io/llmdeployments/status qwen in ai"]


def test_the_chart_grants_every_request_of_dra_mode_and_the_inference_pool(
    cluster: EmulatedCluster, operator: Any
) -> None:
    from test_dra_operator import dra_cluster

    dra_cluster(cluster)
    serving = {"maxSequenceLength": 4096, "maxBatchSize": 1, "inferencePool": {"enabled": True}}
    cluster.create_llmd(llm_deployment("qwen", replicas=4, serving=serving))
    cluster.wait_for("qwen waiting for a GPU", lambda: phase(cluster, "qwen", "Scheduling"))
    off = {"spec": {"replicas": 1, "serving": {"inferencePool": {"enabled": False}}}}
    cluster.patch(cluster.llmd_path("qwen"), off)
    cluster.wait_for("qwen planned", lambda: phase(cluster, "qwen", "Planned"))
    pools = "/apis/inference.networking.k8s.io/v1/namespaces/default/inferencepools"
    cluster.wait_for("the pool deleted", lambda: not cluster.items(pools))
    log = cluster.requests()
    verbs = {(r.resource, r.verb) for m, p, _ in log for r in attributes(m, p)}
    assert {
        ("resourceslices", "list"), ("resourceclaims", "list"), ("resourceclaimtemplates", "create"),
        ("resourceclaimtemplates", "delete"), ("inferencepools", "create"), ("inferencepools", "delete"),
    } <= verbs
    watched = cluster.call(lambda: set(cluster.emulator.watched))  # type: ignore[union-attr]
    assert denied(chart_rules(), log, watched) == []
