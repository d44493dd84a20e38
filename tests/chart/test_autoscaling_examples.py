"""examples/autoscaling: the HorizontalPodAutoscaler (Kubernetes 1.34's schema, kubernetes-validate) and the
KEDA ScaledObject (KEDA's published CRD schema, tests/data/schemas) that scale an LLMDeployment on the queue
length its workers report, through the scale subresource the generated CRD declares."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, openapi_to_jsonschema

from kubevram.api.v1alpha1 import API_VERSION, KIND

EXAMPLES = ROOT / "examples" / "autoscaling"
QUEUE_GAUGE = "vllm:num_requests_waiting"  # the worker's gauge the Endpoint Picker reads too


def load(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((EXAMPLES / name).read_text(encoding="utf-8")) if d]
    return dict(doc)


def scaled_deployment() -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((ROOT / "examples" / "qwen2-7b.yaml").read_text()) if d]
    return dict(doc)


def keda_validator() -> jsonschema.Draft4Validator:
    crd = yaml.safe_load(
        (ROOT / "tests" / "data" / "schemas" / "keda-scaledobject-v1alpha1.yaml").read_text()
    )
    (version,) = crd["spec"]["versions"]
    schema = openapi_to_jsonschema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["apiVersion"] = {"enum": [f"{crd['spec']['group']}/{version['name']}"]}
    schema["properties"]["kind"] = {"enum": [crd["spec"]["names"]["kind"]]}
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def test_the_hpa_is_a_valid_autoscaling_v2_object_on_the_llmdeployments_scale_subresource(
    crd: dict[str, Any],
) -> None:
    hpa = load("hpa.yaml")
    kubernetes_validate.validate(hpa, "1.34", strict=True)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        API_VERSION,
        KIND,
        scaled_deployment()["metadata"]["name"],
    )
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served")]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == QUEUE_GAUGE


def test_the_keda_scaled_object_is_valid_against_kedas_schema_and_queries_the_queue() -> None:
    scaled = load("keda-scaledobject.yaml")
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in keda_validator().iter_errors(scaled)]
    assert errors == []
    assert scaled["spec"]["scaleTargetRef"]["kind"] == KIND
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and QUEUE_GAUGE in trigger["metadata"]["query"]
    assert f'service="{scaled_deployment()["metadata"]["name"]}"' in trigger["metadata"]["query"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["spec"].pop("triggers"), "'triggers' is a required property"),
        (lambda s: s["spec"]["triggers"][0]["metadata"].update(threshold=2), "is not of type 'string'"),
        (lambda s: s["spec"].update(maxReplicas=8), "Additional properties"),
    ],
)
def test_the_keda_check_can_fail(mutate: Any, message: str) -> None:
    scaled = load("keda-scaledobject.yaml")
    mutate(scaled)
    assert any(message in e.message for e in keda_validator().iter_errors(scaled))


def test_the_examples_are_listed_in_the_docs() -> None:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for path in sorted(Path(EXAMPLES).glob("*.yaml")):
        assert f"examples/autoscaling/{path.name}" in text
