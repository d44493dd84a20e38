"""Kubernetes RBAC's authorizer, enough to tell whether a request log is allowed by some rules.

A request's attributes (API group, resource and subresource, verb, namespace, name) come from its
method and path as the API server derives them (k8s.io/apiserver ``RequestInfoFactory``): GET on an
object is ``get``, on a collection ``list`` (``watch`` with ``?watch=true``), POST ``create``, PATCH
``patch``, PUT ``update``, DELETE ``delete`` (``deletecollection`` on a collection). A rule allows a
request when its apiGroups, resources (``resource/subresource``) and verbs hold the request's and,
if it lists resourceNames, the request names one of them. Discovery paths (``/api``, ``/apis/g/v``)
are non-resource requests every authenticated user may make (``system:discovery``): left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update"}


@dataclass(frozen=True)
class Request:
    group: str
    resource: str  # "pods", "llmdeployments/status"
    verb: str
    namespace: str
    name: str

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.verb} {self.group or 'core'}/{self.resource} {self.name or '*'}{where}"


def attributes(method: str, path: str, *, watch: bool = False) -> list[Request]:
    """The RBAC attributes of one request (two for a GET on a collection that was also watched)."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) > 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) > 3:
        group, rest = parts[1], parts[3:]
    else:
        return []  # discovery
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource, name = rest[0], (rest[1] if len(rest) > 1 else "")
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    if method == "GET":
        verbs = ["get"] if name else (["list", "watch"] if watch else ["list"])
    elif method == "DELETE":
        verbs = ["delete" if name else "deletecollection"]
    else:
        verbs = [_VERBS[method]]
    return [Request(group, resource, verb, namespace, name) for verb in verbs]


def allows(rules: Iterable[Mapping[str, Any]], request: Request) -> bool:
    for rule in rules:
        if request.group not in rule.get("apiGroups", []) or request.resource not in rule.get(
            "resources", []
        ):
            continue
        if request.verb not in rule.get("verbs", []):
            continue
        names = rule.get("resourceNames")
        if names and request.name not in names:
            continue
        return True
    return False


def denied(
    rules: Iterable[Mapping[str, Any]], log: Iterable[tuple[str, str, int]], watched: Iterable[str] = ()
) -> list[str]:
    """The requests of ``log`` (method, path, status) that ``rules`` do not allow, once each."""
    rules = list(rules)
    watched = set(watched)
    out: dict[str, None] = {}
    for method, path, _status in log:
        for request in attributes(method, path, watch=path in watched):
            if not allows(rules, request):
                out[str(request)] = None
    return list(out)
