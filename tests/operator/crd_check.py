"""Validate an object against a published CRD's schema as the API server does: defaults applied, the
structural schema checked (jsonschema, unknown fields refused), then every ``x-kubernetes-validations``
rule evaluated with CEL (cel-python) on the defaulted value, ``self`` bound to the field it is written on."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "data" / "schemas"


def chart_module() -> Any:
    """tests/chart/conftest.py (the chart's renderer and the CRD schema helpers) as a module."""
    spec = importlib.util.spec_from_file_location("chart_conftest", ROOT / "tests" / "chart" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_crd(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((SCHEMAS / name).read_text(encoding="utf-8")) if d]
    (crd,) = docs
    assert crd["kind"] == "CustomResourceDefinition"
    return dict(crd)


def _version_schema(crd: dict[str, Any], api_version: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    assert group == crd["spec"]["group"], api_version
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return dict(found["schema"]["openAPIV3Schema"])


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's ``default``s filled in, as the API server does before validating."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for key, sub in schema["properties"].items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = with_defaults(sub, out[key])
        return out
    if isinstance(value, list) and "items" in schema:
        return [with_defaults(schema["items"], item) for item in value]
    return value


def _rules(schema: dict[str, Any], value: Any, path: str, out: list[str]) -> None:
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations") or []:
        result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        if not bool(result):
            out.append(f"{path or '<root>'}: {rule.get('message') or rule['rule']}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                _rules(sub, value[key], f"{path}.{key}" if path else key, out)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _rules(schema["items"], item, f"{path}[{i}]", out)


def crd_errors(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """What the API server would refuse in ``obj`` (an object of ``crd``'s kind), in words."""
    schema = _version_schema(crd, obj.get("apiVersion", ""))
    if obj.get("kind") != crd["spec"]["names"]["kind"]:
        return [f"kind {obj.get('kind')!r} is not {crd['spec']['names']['kind']}"]
    defaulted = with_defaults(schema, obj)
    structural = chart_module().openapi_to_jsonschema(copy.deepcopy(schema))
    structural["properties"]["metadata"] = {"type": "object"}
    validator = jsonschema.Draft4Validator(structural)
    errors = [
        f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator.iter_errors(defaulted)
    ]
    if not errors:
        _rules(schema, defaulted, "", errors)
    return errors
