"""The Helm chart: lint, render (defaults and ci/*-values.yaml), Kubernetes 1.30 schemas, RBAC, hardening.

Rendering uses Helm 4's own Go code (helm-python-sdk), offline, exactly as `helm template` does, and
every manifest is checked strictly against the Kubernetes 1.30 OpenAPI schemas (kubernetes-validate).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from conftest import (
    CHART,
    CI_VALUES,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    ROOT,
    Rendered,
    find,
    one,
    render_chart,
    strip_source,
)

from kubevram.api.v1alpha1 import DEFAULT_WORKER_IMAGE, GROUP, PLURAL
from kubevram.cli import build_parser
from kubevram.controller import render

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    **{p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text()) for p in CI_VALUES},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS), ids=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], Rendered, str]:
    values = VARIANTS[request.param]
    docs, notes = render_chart(values)
    return request.param, values, docs, notes


def operator_container(docs: Rendered) -> dict[str, Any]:
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ------------------------------------------------------------------------------------- metadata


def test_ci_values_files_exist() -> None:
    assert len(CI_VALUES) >= 3, [p.name for p in CI_VALUES]


def test_chart_metadata_matches_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "kubevram"
    assert chart["type"] == "application"
    assert chart["appVersion"] == project["version"]


def test_crds_dir_holds_exactly_the_generated_crd() -> None:
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["llmdeployment.yaml"]
    generated = (ROOT / "crds" / "llmdeployment.yaml").read_bytes()
    assert (CHART / "crds" / "llmdeployment.yaml").read_bytes() == generated
    with helm.Chart.load(CHART) as chart:
        crds = chart.crds
    assert [c["filename"] for c in crds] == ["kubevram/crds/llmdeployment.yaml"]
    (crd,) = [d for d in yaml.safe_load_all(crds[0]["data"]) if d]
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)


# ------------------------------------------------------------------------------- lint and render


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, VARIANTS[name], strict=True, kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == []
    # Severity 1 (info) is "icon is recommended"; warnings (2) and errors (3) fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_manifest_validates_strictly_against_kubernetes(variant: Any) -> None:
    name, _values, docs, _notes = variant
    kinds = set()
    for doc in docs:
        manifest = strip_source(doc)
        kinds.add(manifest["kind"])
        if manifest["kind"] == "ServiceMonitor":
            continue  # a prometheus-operator CRD: no Kubernetes schema; checked in test_service_monitor
        try:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['__source__']} {manifest['kind']}/{manifest['metadata']['name']}: "
                        f"{path}: {exc.message}")
    assert {"Deployment", "ConfigMap"} <= kinds


def test_default_render_objects(default_render: tuple[Rendered, str]) -> None:
    docs, _ = default_render
    names = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert names == [
        ("ClusterRole", "kubevram"),
        ("ClusterRole", "kubevram-cluster"),
        ("ClusterRoleBinding", "kubevram"),
        ("ClusterRoleBinding", "kubevram-cluster"),
        ("ConfigMap", "kubevram-node-classes"),
        ("Deployment", "kubevram"),
        ("PriorityClass", "kubevram-placeholder"),
        ("Role", "kubevram-leader"),
        ("RoleBinding", "kubevram-leader"),
        ("Service", "kubevram-metrics"),
        ("ServiceAccount", "kubevram"),
    ]
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "PriorityClass"):
            assert doc["metadata"]["namespace"] == NAMESPACE


def test_names_and_labels_fit_63_characters() -> None:
    long_release = "release-" + "x" * 45  # 53 characters, Helm's maximum
    helm.validate_release_name(long_release)
    docs, _ = render_chart({"nameOverride": "llm-vram-operator"}, name=long_release)
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == f"{long_release}-llm-vram-operator"[:63].rstrip("-")
    assert deployment["metadata"]["name"].endswith("x-llm-vram")  # 63 characters, then the "-" trimmed
    for doc in docs:
        for value in doc["metadata"]["labels"].values():
            assert len(value) <= 63, value
            assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", value), value
    docs, _ = render_chart({"fullnameOverride": "x" * 63})
    assert one(docs, "Deployment")["metadata"]["name"] == "x" * 63


def test_release_named_like_the_chart_is_not_doubled() -> None:
    docs, _ = render_chart({}, name="kubevram-prod")
    assert one(docs, "Deployment")["metadata"]["name"] == "kubevram-prod"


# ------------------------------------------------------------------------------ operator container


def test_operator_arguments_parse_with_the_real_cli(variant: Any) -> None:
    _name, values, docs, _notes = variant
    container = operator_container(docs)
    assert container["command"] == ["kubevram"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "operator"
    watched = values.get("watchNamespaces", [])
    if watched:
        assert args.namespace == watched and not args.all_namespaces
    else:
        assert args.all_namespaces and args.namespace is None
    liveness = urlsplit(args.liveness)
    assert (liveness.scheme, liveness.hostname, liveness.path) == ("http", "0.0.0.0", "/healthz")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert liveness.port == ports["health"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": liveness.path, "port": "health"}
    assert args.metrics_port == ports.get("metrics")
    assert set(ports) == {"health", "metrics"} if args.metrics_port else {"health"}


def test_images_default_to_the_app_version(default_render: tuple[Rendered, str]) -> None:
    docs, _ = default_render
    container = operator_container(docs)
    assert container["image"] == "ghcr.io/kubevram/operator:0.1.0"
    assert env_of(container)["KUBEVRAM_WORKER_IMAGE"] == DEFAULT_WORKER_IMAGE


def test_images_by_digest_and_tag() -> None:
    docs, _ = render_chart(VARIANTS["production"])
    container = operator_container(docs)
    digest = VARIANTS["production"]["image"]["digest"]
    assert container["image"] == f"registry.example.com/kubevram/operator@{digest}"
    assert container["imagePullPolicy"] == "Always"
    assert env_of(container)["KUBEVRAM_WORKER_IMAGE"] == "registry.example.com/kubevram/worker:0.1.0-cu128"


def test_node_classes_reach_the_operator_as_a_json_file(variant: Any) -> None:
    _name, values, docs, _notes = variant
    expected = values.get("nodeClasses") or yaml.safe_load((CHART / "values.yaml").read_text())["nodeClasses"]
    (config_map,) = [c for c in find(docs, "ConfigMap") if "node-classes.json" in c["data"]]
    assert json.loads(config_map["data"]["node-classes.json"]) == expected
    for item in expected:
        assert set(item) == {"name", "gpuProduct", "gpuMemoryMiB", "gpusPerNode"}
    deployment = one(docs, "Deployment")
    container = operator_container(docs)
    path = Path(env_of(container)["KUBEVRAM_NODE_CLASSES"])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert volume["configMap"]["items"] == [{"key": "node-classes.json", "path": path.name}]
    # The pod rolls when the classes change.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/node-classes"])


def test_node_class_checksum_follows_the_classes() -> None:
    base, _ = render_chart({})
    changed, _ = render_chart({"nodeClasses": [{"name": "t4", "gpuProduct": "Tesla-T4", "gpuMemoryMiB": 15360,
                                               "gpusPerNode": 1}]})

    def checksum(docs: Rendered) -> str:
        annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/node-classes"])

    assert checksum(base) != checksum(changed)


# ------------------------------------------------------------------------------------ hardening


def test_container_hardening(variant: Any) -> None:
    _name, _values, docs, _notes = variant
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(docs)
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    # The read-only root needs a writable /tmp, and only that.
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    assert [m["mountPath"] for m in writable] == ["/tmp"]
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]
    assert container["resources"]["limits"]["memory"]
    assert "livenessProbe" in container and "readinessProbe" in container


def test_the_image_user_is_the_pod_user() -> None:
    """The chart runs as the user the Dockerfile creates (65532), so runAsNonRoot and file ownership agree."""
    docs, _ = render_chart({})
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER 65532:65532" in dockerfile
    assert operator_container(docs)["securityContext"]["runAsUser"] == 65532


# ----------------------------------------------------------------------------------------- RBAC

OPERATOR_RULES = {
    # (apiGroup, resource, verb)
    *((GROUP, PLURAL, v) for v in ("get", "list", "watch", "patch", "update")),
    *((GROUP, f"{PLURAL}/status", v) for v in ("get", "patch", "update")),
    (GROUP, f"{PLURAL}/finalizers", "update"),
    *(("", r, v) for r in ("configmaps", "services", "serviceaccounts")
      for v in ("get", "list", "watch", "create", "patch", "update", "delete")),
    ("", "secrets", "create"),
    *(("apps", "deployments", v) for v in ("get", "list", "watch", "create", "patch", "update", "delete")),
    *(("leaderworkerset.x-k8s.io", "leaderworkersets", v)
      for v in ("get", "list", "create", "patch", "delete")),
    *(("rbac.authorization.k8s.io", "roles", v) for v in ("get", "create", "patch")),
    *(("rbac.authorization.k8s.io", "rolebindings", v) for v in ("get", "create", "patch", "delete")),
    *(("networking.k8s.io", "networkpolicies", v) for v in ("get", "create", "patch")),
    *(("", "pods", v) for v in ("get", "list", "watch")),
    ("", "events", "create"), ("", "events", "patch"),
    ("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch"),
    *(("", "nodes", v) for v in ("get", "list", "watch")),
    ("", "namespaces", "list"), ("", "namespaces", "watch"),
    *(("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")),
    # DRA mode: the devices and their allocations (read), the workers' claim templates (written).
    ("resource.k8s.io", "resourceslices", "list"), ("resource.k8s.io", "resourceclaims", "list"),
    *(("resource.k8s.io", "resourceclaimtemplates", v) for v in ("list", "create", "delete")),
    *(("inference.networking.k8s.io", "inferencepools", v) for v in ("get", "create", "patch", "delete")),
}


def rule_triples(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_no_wildcards_anywhere(variant: Any) -> None:
    _name, _values, docs, _notes = variant
    for role in find(docs, "ClusterRole") + find(docs, "Role"):
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                for item in rule.get(key, []):
                    assert "*" not in item, f"{role['metadata']['name']}: {key} {item!r}"


def test_operator_permissions_are_exactly_the_listed_ones(default_render: tuple[Rendered, str]) -> None:
    docs, _ = default_render
    granted = rule_triples(one(docs, "ClusterRole", "kubevram")) | rule_triples(
        one(docs, "ClusterRole", "kubevram-cluster")
    )
    assert granted == OPERATOR_RULES
    # Nothing that lets the operator grant itself more.
    assert not {v for _, _, v in granted} & {"escalate", "impersonate", "deletecollection"}
    assert ("", "secrets", "deletecollection") not in granted


def test_operator_may_bind_no_role_and_touch_no_secret_it_did_not_create(
    default_render: tuple[Rendered, str]
) -> None:
    docs, _ = default_render
    granted = rule_triples(one(docs, "ClusterRole", "kubevram")) | rule_triples(
        one(docs, "ClusterRole", "kubevram-cluster")
    )
    # The workers' Roles hold only rights the operator holds itself: no "bind" or "escalate" needed.
    assert not [t for t in granted if t[2] in ("bind", "escalate")]
    # The admin-token Secret is created once: no Secret can be read, listed, changed or deleted.
    assert {t for t in granted if t[1] == "secrets"} == {("", "secrets", "create")}
    assert "KUBEVRAM_WORKER_CLUSTERROLE" not in env_of(operator_container(docs))


def test_the_chart_makes_no_role_for_the_workers(variant: Any) -> None:
    _name, _values, docs, _notes = variant
    # The operator gives each LLMDeployment's workers their own Role, limited to that resource.
    names = [r["metadata"]["name"] for r in find(docs, "ClusterRole")]
    assert [n for n in names if n.endswith("-worker")] == []


def test_bindings_name_the_operator_service_account(variant: Any) -> None:
    _name, values, docs, _notes = variant
    if not values.get("rbac", {}).get("create", True):
        return
    fullname = one(docs, "Deployment")["metadata"]["name"]
    account = one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = find(docs, "ClusterRoleBinding") + find(docs, "RoleBinding")
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        leader = binding["metadata"]["name"] == f"{fullname}-leader"
        assert binding["roleRef"]["kind"] == ("Role" if leader else "ClusterRole")
    watched = values.get("watchNamespaces", [])
    cluster_wide = {b["roleRef"]["name"] for b in find(docs, "ClusterRoleBinding")}
    per_namespace = {(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in find(docs, "RoleBinding")
                     if b["roleRef"]["kind"] == "ClusterRole"}
    if watched:
        assert cluster_wide == {f"{fullname}-cluster"}
        assert per_namespace == {(ns, fullname) for ns in watched}
    else:
        assert cluster_wide == {fullname, f"{fullname}-cluster"}
        assert per_namespace == set()


def test_cluster_wide_reads_survive_namespaced_mode(variant: Any) -> None:
    """GPUs are shared by every namespace: even an operator that watches a few namespaces must list
    nodes, pods and Deployments cluster-wide to know what is free (kubevram.controller.adapter does)."""
    _name, values, docs, _notes = variant
    if not values.get("rbac", {}).get("create", True):
        return
    roles = {r["metadata"]["name"]: r for r in find(docs, "ClusterRole")}
    bound = [roles[b["roleRef"]["name"]] for b in find(docs, "ClusterRoleBinding")]
    cluster_wide = set().union(*(rule_triples(role) for role in bound))
    for needed in [("", "nodes", "list"), ("", "pods", "list"), ("", "pods", "watch"),
                   ("apps", "deployments", "list"),
                   ("apiextensions.k8s.io", "customresourcedefinitions", "list")]:
        assert needed in cluster_wide, needed
    # ... but no write anywhere beyond the watched namespaces.
    writes = {"create", "patch", "update", "delete"}
    if values.get("watchNamespaces"):
        assert not {v for _, _, v in cluster_wide} & writes


def test_leader_election_may_touch_one_lease_and_nothing_else(variant: Any) -> None:
    """What ``kubevram.controller.leader`` calls: GET and PATCH its Lease, POST the first one."""
    _name, values, docs, _notes = variant
    if not values.get("rbac", {}).get("create", True):
        return
    fullname = one(docs, "Deployment")["metadata"]["name"]
    role = one(docs, "Role", f"{fullname}-leader")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [fullname],
         "verbs": ["get", "patch"]},
    ]
    args = operator_container(docs)["args"]
    assert "--leader-elect" in args and args[args.index("--lease-name") + 1] == fullname
    parsed = build_parser().parse_args(args)
    assert parsed.leader_elect and parsed.lease_name == fullname
    env = env_of(operator_container(docs))
    assert env["KUBEVRAM_OPERATOR_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_several_replicas_need_leader_election() -> None:
    docs, _ = render_chart({"replicaCount": 3})
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    docs, _ = render_chart({"leaderElection": {"enabled": False}})
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert "--leader-elect" not in operator_container(docs)["args"]
    assert find(docs, "Role") == []


def test_placeholders_priority_class_yields_but_still_scales_the_cluster(variant: Any) -> None:
    _name, values, docs, _notes = variant
    env = env_of(operator_container(docs))
    existing = values.get("placeholders", {}).get("priorityClass", {})
    if existing.get("create") is False:
        assert find(docs, "PriorityClass") == []
        assert env["KUBEVRAM_PLACEHOLDER_PRIORITY_CLASS"] == existing["name"]
        return
    (priority,) = find(docs, "PriorityClass")
    assert -10 <= priority["value"] < 0  # any pod preempts it; above the autoscaler's expendable cutoff
    assert priority["preemptionPolicy"] == "Never" and priority["globalDefault"] is False
    assert env["KUBEVRAM_PLACEHOLDER_PRIORITY_CLASS"] == priority["metadata"]["name"]
    assert env["KUBEVRAM_PLACEHOLDER_IMAGE"] == "registry.k8s.io/pause:3.10"


def test_existing_rbac_and_service_account_are_used() -> None:
    values = VARIANTS["existing-rbac"]
    docs, _ = render_chart(values)
    assert find(docs, "ServiceAccount") == []
    assert {d["kind"] for d in docs} == {"Deployment", "ConfigMap", "Service"}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubevram-operator"


# ------------------------------------------------------------------------------ ServiceMonitor


def test_service_monitor_is_off_by_default(default_render: tuple[Rendered, str]) -> None:
    assert find(default_render[0], "ServiceMonitor") == []


def test_service_monitor_scrapes_the_workers_services() -> None:
    values = VARIANTS["servicemonitor"]
    docs, _ = render_chart(values)
    monitor = one(docs, "ServiceMonitor", "kubevram-workers")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    spec = monitor["spec"]
    assert spec["selector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "kubevram"}}
    assert spec["namespaceSelector"] == {"any": True}
    (endpoint,) = spec["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"], endpoint["scrapeTimeout"]) == (
        "http", "/metrics", "15s", "5s")
    assert endpoint["relabelings"] == values["metrics"]["serviceMonitor"]["relabelings"]
    assert endpoint["metricRelabelings"][0]["action"] == "drop"
    # Only the watched namespaces when the operator watches some.
    docs, _ = render_chart({**values, "watchNamespaces": ["ai"]})
    workers = one(docs, "ServiceMonitor", "kubevram-workers")
    assert workers["spec"]["namespaceSelector"] == {"matchNames": ["ai"]}


def test_the_operator_metrics_service_and_its_monitor_reach_the_metrics_port() -> None:
    values = VARIANTS["servicemonitor"]
    docs, _ = render_chart(values)
    pod = one(docs, "Deployment")["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in operator_container(docs)["ports"]}
    service = one(docs, "Service", "kubevram-metrics")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("metrics", ports["metrics"], "metrics")
    monitor = one(docs, "ServiceMonitor", "kubevram-operator")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "15s")
    # The workers' monitor does not select the operator's Service, nor the operator's a worker's.
    workers = one(docs, "ServiceMonitor", "kubevram-workers")["spec"]["selector"]["matchLabels"]
    assert not workers.items() <= service["metadata"]["labels"].items()
    assert render.LABEL_MANAGED_BY in workers
    # metricsPort 0: no flag, no port, no Service, no operator monitor.
    docs, _ = render_chart({**values, "operator": {"healthPort": 8080, "metricsPort": 0}})
    assert find(docs, "Service") == [] and [m["metadata"]["name"] for m in find(docs, "ServiceMonitor")] == [
        "kubevram-workers"]
    assert "--metrics-port" not in operator_container(docs)["args"]


# --------------------------------------------------------------------------- values and schema


def _documented_leaves(text: str) -> tuple[list[str], list[str]]:
    """Every value's key path in values.yaml (scalars, lists and empty maps), split into documented (a
    `# --` comment directly above the key or above one of its ancestors) and undocumented ones."""
    documented: list[str] = []
    undocumented: list[str] = []
    stack: list[tuple[int, str, bool, bool]] = []  # (indent, key, documented, holds a list)
    comment = False
    lines = text.splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = True
            continue
        if stripped.startswith("#"):
            continue  # continuation of a comment, or a plain one
        if not stripped:
            comment = False
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9_]*):(.*)$", line)
        if not match or any(is_list for *_, is_list in stack):
            comment = False
            continue  # list items and their fields are part of the list's value
        key, rest = match.group(2), match.group(3).strip()
        is_documented = comment or any(d for _, _, d, _ in stack)
        comment = False
        path = ".".join([k for _, k, _, _ in stack] + [key])
        nxt = next((n for n in lines[index + 1:] if n.strip() and not n.strip().startswith("#")), "")
        nested = rest == "" and len(nxt) - len(nxt.lstrip()) > indent
        is_list = nested and nxt.strip().startswith("- ")
        if nested:
            stack.append((indent, key, is_documented, is_list))
        if not nested or is_list:
            (documented if is_documented else undocumented).append(path)
    return documented, undocumented


def test_every_value_is_documented() -> None:
    documented, undocumented = _documented_leaves((CHART / "values.yaml").read_text())
    assert undocumented == []
    assert len(documented) > 40


def test_documentation_check_finds_an_undocumented_value() -> None:
    text = (
        "# -- documented\na: 1\nimage:\n  # -- the tag\n  tag: x\n  repository: y\n"
        "items:\n  - name: n\n    size: 1\n# -- a map\nmap:\n  inner: 1\n"
    )
    assert _documented_leaves(text) == (["a", "image.tag", "map.inner"], ["image.repository", "items"])


def test_schema_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]) - {"global"}
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": -1}, "/replicaCount"),
        ({"placeholders": {"priorityClass": {"value": -11}}}, "/placeholders/priorityClass/value"),
        ({"placeholders": {"priorityClass": {"value": 0}}}, "/placeholders/priorityClass/value"),
        ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"repository": "x", "pullPolicy": "Always", "digest": "sha256:abc"}}, "/image/digest"),
        ({"nodeClasses": [{"name": "a", "gpuProduct": "X", "gpuMemoryMiB": 0, "gpusPerNode": 1}]},
         "/nodeClasses/0/gpuMemoryMiB"),
        ({"nodeClasses": [{"name": "A_B", "gpuProduct": "X", "gpuMemoryMiB": 1, "gpusPerNode": 1}]},
         "/nodeClasses/0/name"),
        ({"nodeClasses": [{"name": "a", "gpuProduct": "X", "gpuMemoryMiB": 1}]}, "/nodeClasses/0"),
        ({"watchNamespaces": ["ai", "ai"]}, "/watchNamespaces"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "/watchNamespaces/0"),
        ({"operator": {"healthPort": 80}}, "/operator/healthPort"),
        ({"operator": {"healthPort": 8080, "metricsPort": 81}}, "/operator/metricsPort"),
        ({"metrics": {"dashboard": {"enabled": True, "labels": {"grafana_dashboard": 1}}}},
         "/metrics/dashboard/labels/grafana_dashboard"),
        ({"metrics": {"serviceMonitor": {"enabled": True, "interval": "often"}}},
         "/metrics/serviceMonitor/interval"),
        ({"resources": {"requests": {"memory": "lots"}}}, "/resources/requests/memory"),
        ({"replicas": 1}, "additional properties 'replicas'"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as info:
        render_chart(values)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"serviceAccount": {"create": False}}, "serviceAccount.name: must name an existing ServiceAccount"),
        ({"nodeClasses": [{"name": "l4", "gpuProduct": "NVIDIA-L4", "gpuMemoryMiB": 23034,
                           "gpusPerNode": 1}] * 2},
         'nodeClasses: the name "l4" appears more than once'),
        ({"replicaCount": 2, "leaderElection": {"enabled": False}},
         "replicaCount: more than 1 needs leaderElection.enabled"),
        ({"placeholders": {"priorityClass": {"create": False}}},
         "placeholders.priorityClass.name: must name an existing PriorityClass"),
    ],
)
def test_cross_field_checks_fail_with_the_reason(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as info:
        render_chart(values)
    assert message in str(info.value)


# ----------------------------------------------------------------------------------------- NOTES


def test_notes_give_the_next_steps(variant: Any) -> None:
    _name, values, docs, notes = variant
    fullname = one(docs, "Deployment")["metadata"]["name"]
    assert f"rollout status deployment/{fullname}" in notes
    assert "kubectl -n ai apply -f examples/qwen2-7b.yaml" in notes
    assert "port-forward service/qwen2-7b 8000:8000" in notes
    assert "curl -s http://127.0.0.1:8000/v1/chat/completions" in notes
    assert "nvidia.com/gpu.memory" in notes
    for namespace in values.get("watchNamespaces", []):
        assert namespace in notes
    if not values.get("watchNamespaces"):
        assert "every namespace" in notes
    assert (RELEASE in notes) and ("{{" not in notes)
