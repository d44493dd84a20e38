"""The generated CRD: the checked-in files match the generator, and the schema is structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubevram.api.crd import CRD_NAME, render_crd, render_crd_yaml
from kubevram.api.v1alpha1 import LLMDeploymentSpec

ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = [
    ROOT / "crds" / "llmdeployment.yaml",
    ROOT / "charts" / "kubevram" / "crds" / "llmdeployment.yaml",
]
REGENERATE = "kubevram crd --write crds/llmdeployment.yaml charts/kubevram/crds/llmdeployment.yaml"


def _schema() -> dict[str, Any]:
    return render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its path: the node, its properties, additionalProperties and items."""
    out = [(path or "<root>", node)]
    for name, sub in node.get("properties", {}).items():
        out += _nodes(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        out += _nodes(node["additionalProperties"], f"{path}.<value>")
    if "items" in node:
        out += _nodes(node["items"], f"{path}[]")
    return out


def _apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Defaulting as the API server does it: fill missing fields with ``default``, then recurse."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for name, sub in schema["properties"].items():
        if name not in out and "default" in sub:
            out[name] = sub["default"]
        if name in out:
            out[name] = _apply_defaults(sub, out[name])
    return out


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_checked_in_crd_matches_the_generator(path: Path) -> None:
    assert path.exists(), f"{path} is missing; run: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == render_crd_yaml(), f"{path} drifted; run: {REGENERATE}"


def test_crd_identity_and_subresources() -> None:
    crd = render_crd()
    assert crd["metadata"]["name"] == CRD_NAME == "llmdeployments.llm.kubevram.io"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("llm.kubevram.io", "Namespaced")
    assert spec["names"]["kind"] == "LLMDeployment"
    assert spec["names"]["shortNames"] == ["llmd"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Model": ".spec.model.id",
        "Replicas": ".spec.replicas",
        "Ready": ".status.readyReplicas",
        "VRAM": ".status.vramPerReplica",
        "Phase": ".status.phase",
        "Age": ".metadata.creationTimestamp",
    }


def test_crd_validates_against_the_kubernetes_schema() -> None:
    # Raises kubernetes_validate.ValidationError (naming the path) when the object is malformed.
    kubernetes_validate.validate(yaml.safe_load(render_crd_yaml()), "1.37.0", strict=True)


def test_schema_is_structural() -> None:
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "definitions", "const"}
    problems = []
    for path, node in _nodes(_schema()):
        if not node.get("type") and not (
            node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        ):
            problems.append(f"{path}: no type")
        if forbidden & node.keys():
            problems.append(f"{path}: {sorted(forbidden & node.keys())}")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        if isinstance(node.get("additionalProperties"), bool):
            problems.append(f"{path}: boolean additionalProperties")
        if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
            problems.append(f"{path}: JSON Schema 2020 exclusiveMinimum (OpenAPI 3.0 wants a boolean)")
        if node.get("x-kubernetes-int-or-string") and "type" in node:
            problems.append(f"{path}: int-or-string with a type")
    assert problems == []


def test_every_spec_field_is_described_for_kubectl_explain() -> None:
    spec = _schema()["properties"]["spec"]
    missing = [
        path
        for path, node in _nodes(spec, "spec")
        if not node.get("description") and not path.endswith(("[]", "<value>"))
    ]
    assert missing == []


def test_schema_carries_enums_bounds_and_required_fields() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert _schema()["required"] == ["spec"]
    assert _schema()["properties"]["spec"]["required"] == ["model"]
    assert spec["model"]["required"] == ["id"]
    weights = spec["precision"]["properties"]["weights"]
    assert weights["enum"] == ["float32", "float16", "bfloat16", "int8", "int4"]
    assert spec["placement"]["properties"]["offload"]["enum"] == ["none", "cpu", "disk"]
    assert spec["placement"]["properties"]["strategy"]["enum"] == ["balanced", "balanced_low_0", "sequential"]
    assert (spec["replicas"]["minimum"], spec["replicas"]["maximum"]) == (0, 1000)
    top_p = spec["generation"]["properties"]["defaults"]["properties"]["topP"]
    assert (top_p["minimum"], top_p["exclusiveMinimum"], top_p["maximum"]) == (0, True, 1)
    overhead = spec["estimation"]["properties"]["overheadPerGPU"]
    assert overhead["x-kubernetes-int-or-string"] is True and overhead["nullable"] is True
    assert spec["model"]["properties"]["config"]["x-kubernetes-preserve-unknown-fields"] is True


def test_crd_defaults_equal_the_pydantic_defaults() -> None:
    """What the API server stores for a minimal spec is what the operator's models assume."""
    minimal = {"model": {"id": "Qwen/Qwen2-0.5B"}}
    defaulted = _apply_defaults(_schema()["properties"]["spec"], minimal)
    expected = LLMDeploymentSpec.model_validate(minimal).model_dump(mode="json", exclude_none=True)
    # Lists built by a default_factory (ranges, tolerations, env) and dicts are not defaulted by the
    # schema: an absent list and the factory's value mean the same to the operator.
    expected["generation"]["chinese"].pop("ranges")
    for key in ("nodeSelector", "tolerations"):
        expected["placement"].pop(key)
    for key in ("resources", "env"):
        expected["worker"].pop(key)
    assert defaulted == expected
    assert LLMDeploymentSpec.model_validate(defaulted) == LLMDeploymentSpec.model_validate(minimal)
