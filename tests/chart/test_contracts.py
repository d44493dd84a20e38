"""What the chart hands the operator must be what the operator reads, and what the ServiceMonitor
selects must be what the operator renders. Checked against the real code on both sides."""

from __future__ import annotations

import json
from typing import Any

import yaml
from conftest import ROOT, one, render_chart

from kubevram.controller.reconcile import Settings
from kubevram.controller.render import API_PORT, render_role_binding, render_service
from kubevram.planner.placement import KNOWN_PRODUCTS, parse_node_classes


def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def an_llm_deployment() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "qwen2-7b.yaml").read_text(encoding="utf-8"))
    body["metadata"].update(namespace="ai", uid="0b5c3e0e-1f4c-4a39-9d0a-7f1f0f6d2a11")
    return body


def test_operator_settings_come_from_the_chart() -> None:
    docs, _ = render_chart({"workerImage": {"repository": "registry.example.com/w", "tag": "1.2.3"}})
    settings = Settings.from_env(operator_env(docs))
    assert settings.worker_image == "registry.example.com/w:1.2.3"
    roles = [r for r in docs if r["kind"] == "ClusterRole"]
    (worker_role,) = [r for r in roles if r["metadata"]["name"].endswith("-worker")]
    assert settings.worker_cluster_role == worker_role["metadata"]["name"]
    # The operator's fallback names the role a default install creates.
    default_docs, _ = render_chart({})
    assert Settings().worker_cluster_role == Settings.from_env(operator_env(default_docs)).worker_cluster_role


def test_the_operators_role_binding_names_a_role_the_operator_may_bind() -> None:
    docs, _ = render_chart({})
    settings = Settings.from_env(operator_env(docs))
    binding = render_role_binding(an_llm_deployment(), settings.worker_cluster_role)
    (bind_rule,) = [r for r in one(docs, "ClusterRole", "kubevram")["rules"] if "bind" in r["verbs"]]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": bind_rule["resourceNames"][0]}


def test_service_monitor_selects_the_worker_service() -> None:
    docs, _ = render_chart({"metrics": {"serviceMonitor": {"enabled": True}}})
    monitor = one(docs, "ServiceMonitor")
    service = render_service(an_llm_deployment())
    labels = service["metadata"]["labels"]
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert labels.get(key) == value, (key, labels)
    (endpoint,) = monitor["spec"]["endpoints"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {endpoint["port"]: API_PORT}  # the admin port stays out of the Service


def test_node_classes_parse_with_the_planner() -> None:
    docs, _ = render_chart({})
    raw = json.loads(one(docs, "ConfigMap")["data"]["node-classes.json"])
    warnings: list[str] = []
    classes = parse_node_classes(raw, warnings)
    assert warnings == []
    assert [c.name for c in classes] == [item["name"] for item in raw]
    # The chart's GPU memory figures agree with the planner's table of GPU Feature Discovery labels.
    known = {p.gpu_product: p.gpu_memory_mib for p in KNOWN_PRODUCTS}
    for node_class in classes:
        assert known[node_class.gpu_product] == node_class.gpu_memory_mib, node_class
