"""What the chart hands the operator must be what the operator reads, what the ServiceMonitor selects
must be what the operator renders, and the workers' NetworkPolicy must admit the operator's pods.
Checked against the real code on both sides."""

from __future__ import annotations

import json
from typing import Any

import yaml
from conftest import NAMESPACE, ROOT, one, render_chart

from kubevram.controller.reconcile import Settings
from kubevram.controller.render import API_PORT, render_network_policy, render_service
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
    operator = one(docs, "Deployment")
    settings = Settings.from_env({**operator_env(docs), "KUBEVRAM_OPERATOR_NAMESPACE": NAMESPACE})
    assert settings.worker_image == "registry.example.com/w:1.2.3"
    # The chart passes its namespace by the downward API...
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    (ns,) = [e for e in container["env"] if e["name"] == "KUBEVRAM_OPERATOR_NAMESPACE"]
    assert ns["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # ...and the operator pods' labels, which the workers' NetworkPolicy admits on the admin port.
    assert settings.operator_labels == operator["spec"]["selector"]["matchLabels"]
    policy = render_network_policy(an_llm_deployment(), settings.operator_namespace, settings.operator_labels)
    (admin,) = [rule for rule in policy["spec"]["ingress"] if "from" in rule]
    (peer,) = admin["from"]
    pod_labels = operator["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
    # The PriorityClass of the placeholders: the operator's fallback (what `kubevram operator` outside
    # the chart uses) names the one a default install creates.
    default_docs, _ = render_chart({})
    defaults = Settings.from_env(operator_env(default_docs))
    (priority,) = [d for d in default_docs if d["kind"] == "PriorityClass"]
    assert defaults.placeholder_priority_class == priority["metadata"]["name"]
    assert defaults.placeholder_priority_class == Settings().placeholder_priority_class
    assert defaults.placeholder_image == Settings().placeholder_image


def test_service_monitor_selects_the_worker_service() -> None:
    docs, _ = render_chart({"metrics": {"serviceMonitor": {"enabled": True}}})
    monitor = one(docs, "ServiceMonitor", "kubevram-workers")
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
