"""Shared fixtures of the chart, Dockerfile and examples tests: paths, rendering, the CRD's schema."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubevram"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30"
RELEASE = "kubevram"
NAMESPACE = "kubevram-system"

Rendered = list[dict[str, Any]]


def render_chart(
    values: dict[str, Any] | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE
) -> tuple[Rendered, str]:
    """Render the chart offline as `helm template` would: the manifests (as dicts) and NOTES.txt."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:  # rendering checks the values against values.schema.json
        files = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    docs: Rendered = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source__"] = path
                docs.append(doc)
    return docs, notes


def strip_source(doc: dict[str, Any]) -> dict[str, Any]:
    """The manifest without the test's bookkeeping key (the template it came from)."""
    return {k: v for k, v in doc.items() if k != "__source__"}


def find(docs: Rendered, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: Rendered, kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    names = [d["metadata"]["name"] for d in found]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {names}"
    return found[0]


@pytest.fixture(scope="session")
def render() -> Callable[..., tuple[Rendered, str]]:
    return render_chart


@pytest.fixture(scope="session")
def default_render() -> tuple[Rendered, str]:
    return render_chart()


# ------------------------------------------------------------------------------ the CRD's schema


def openapi_to_jsonschema(node: Any) -> Any:
    """Turn a CRD's structural OpenAPI v3.0 schema into a JSON Schema (draft 4) the API server's
    checks agree with: ``nullable`` becomes a ``null`` type, ``x-kubernetes-int-or-string`` an
    integer-or-string, and objects that list their properties reject unknown fields (what
    ``kubectl apply`` does with server-side strict field validation) unless they preserve them."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: openapi_to_jsonschema(value) for key, value in node.items() if key != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], **out}
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if node.get("nullable"):
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    path = ROOT / "crds" / "llmdeployment.yaml"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `kubevram crd --write crds/llmdeployment.yaml "
                    "charts/kubevram/crds/llmdeployment.yaml`")
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert len(docs) == 1 and docs[0]["kind"] == "CustomResourceDefinition"
    return docs[0]


@pytest.fixture(scope="session")
def crd_validator(crd: dict[str, Any]) -> Any:
    """A jsonschema validator of whole LLMDeployment objects, from the served version's schema."""
    import jsonschema

    (version,) = [v for v in crd["spec"]["versions"] if v.get("served")]
    schema = openapi_to_jsonschema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # apiVersion, kind and metadata are checked by the API server itself, not by the CRD's schema.
    schema["additionalProperties"] = False
    schema.setdefault("properties", {})
    schema["properties"]["apiVersion"] = {"enum": [f"{crd['spec']['group']}/{version['name']}"]}
    schema["properties"]["kind"] = {"enum": [crd["spec"]["names"]["kind"]]}
    schema["properties"]["metadata"] = {"type": "object"}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)
