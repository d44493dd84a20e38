"""Reading LLMDeployment documents from YAML text and plain dicts, with errors that name the field."""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import ValidationError

from kubevram.api.errors import SpecError, from_validation_error
from kubevram.api.v1alpha1 import API_VERSION, GROUP, KIND, LLMDeployment

# libyaml's safe loader when PyYAML was built with it (several times faster), else the pure-Python one.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_deployment(obj: Any, source: str = "") -> LLMDeployment:
    """Validate one object (as ``yaml.safe_load`` gives it) as an LLMDeployment."""
    if not isinstance(obj, dict):
        raise SpecError("", f"expected a mapping (an LLMDeployment), got {type(obj).__name__}", source=source)
    kind = obj.get("kind")
    api_version = str(obj.get("apiVersion", ""))
    if kind != KIND or not api_version.startswith(GROUP + "/"):
        raise SpecError(
            "kind",
            f"{kind!r} ({api_version or 'no apiVersion'}) is not an LLMDeployment ({API_VERSION})",
            source=source,
        )
    if api_version != API_VERSION:
        raise SpecError("apiVersion", f"{api_version!r} is not served; use {API_VERSION}", source=source)
    if not isinstance(obj.get("spec"), dict):
        raise SpecError("spec", f"{obj.get('spec')!r} is not a mapping", source=source)
    body = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "metadata", "spec", "status")}
    try:
        return LLMDeployment.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc, source=source) from None


def load_deployments(text: str, source: str = "") -> list[LLMDeployment]:
    """Every LLMDeployment in a YAML stream (several documents, or a ``List``); empty ones skipped."""
    try:
        docs = [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError("", f"malformed YAML at {where}: {problem}", source=source) from None
    items: list[Any] = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            items.extend(doc["items"])
        else:
            items.append(doc)
    if not items:
        raise SpecError("", "no LLMDeployment documents found", source=source)
    out = []
    for index, item in enumerate(items):
        where = f"{source}[{index}]" if len(items) > 1 and source else source
        out.append(parse_deployment(item, source=where))
    return out


def parse_config_json(text: str, what: str) -> dict[str, Any]:
    """A model's ``config.json`` text as a dict; ``ValueError`` names ``what`` and says why it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} holds {type(value).__name__}, not a JSON object")
    return value
