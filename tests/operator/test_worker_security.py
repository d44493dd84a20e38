"""Worker pods a PodSecurity `restricted` namespace admits, with weights out of the writable layer, a
memory limit, a NetworkPolicy and a Role limited to their own LLMDeployment's status."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pod_security import pod_template_violations, restricted
from test_render import ESTIMATE, PLAN, by_kind, children, replica

from kubevram.api.load import parse_deployment
from kubevram.api.workerplan import DEFAULT_OFFLOAD_FOLDER, WorkerPlan
from kubevram.controller import render

GiB = 2**30
MiB = 2**20

PLACED: dict[str, Any] = {**PLAN, "unscheduled": {"count": 0}}
VARIANTS = {
    "placed and pending": (PLAN, {}),
    "model volume": (
        PLACED,
        {"model": {"id": "qwen", "volume": {"persistentVolumeClaim": {"claimName": "m"}}}},
    ),
    "disk offload": (
        {
            **PLACED,
            "replicas": [replica("gpu-a", [0], 10 * GiB, maxMemory={"0": 10 * GiB, "disk": 40 * GiB})],
        },
        {"placement": {"offload": "disk"}},
    ),
    "cpu offload": (
        {**PLACED, "replicas": [replica("gpu-a", [0], 10 * GiB, maxMemory={"0": 10 * GiB, "cpu": 30 * GiB})]},
        {"placement": {"offload": "cpu"}},
    ),
    "MIG": ({**PLACED, "replicas": [replica("gpu-a", [0], resource="nvidia.com/mig-3g.40gb")]}, {}),
}


def pods(plan: dict[str, Any], spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in by_kind(children(plan, **spec), "Deployment")]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_worker_pods_pass_pod_security_restricted(variant: str) -> None:
    plan, spec = VARIANTS[variant]
    workloads = by_kind(children(plan, **spec), "Deployment")
    assert workloads
    for workload in workloads:
        assert pod_template_violations(workload) == [], workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 65532  # the image's user (Dockerfile)


def test_the_checks_refuse_what_restricted_refuses() -> None:
    """The helper is not a rubber stamp: yesterday's worker pod and a few classic mistakes fail it."""
    bare = {"containers": [{"name": "worker", "image": "w"}], "volumes": [{"name": "m", "emptyDir": {}}]}
    assert sorted(v.split(":")[0] for v in restricted(bare)) == [
        "allowPrivilegeEscalation",
        "capabilities_restricted",
        "runAsNonRoot",
        "seccompProfile_restricted",
    ]
    (pod,) = pods(PLACED, {})[:1]
    for mutate, check in [
        (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/models"}}), "hostPathVolumes"),
        (lambda p: p["containers"][0]["securityContext"].update(privileged=True), "privileged"),
        (
            lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
            "capabilities_baseline",
        ),
        (lambda p: p["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
        (lambda p: p["containers"][0]["securityContext"].update(runAsUser=0), "runAsUser"),
        (lambda p: p.update(hostNetwork=True), "hostNamespaces"),
        (
            lambda p: p["containers"][0]["readinessProbe"]["httpGet"].update(host="10.0.0.1"),
            "hostProbesAndHostLifecycle",
        ),
        (
            lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}),
            "restrictedVolumes",
        ),
    ]:
        bad = json.loads(json.dumps(pod))
        mutate(bad)
        assert any(v.startswith(check) for v in restricted(bad)), check


def writable_paths(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> volume of every writable mount of the worker container."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly")}


def under(path: str, mounts: dict[str, Any]) -> dict[str, Any] | None:
    """The volume a path lands on: the deepest mount above it, as the kernel resolves it."""
    roots = [root for root in mounts if path == root or path.startswith(root.rstrip("/") + "/")]
    return mounts[max(roots, key=len)] if roots else None


def quantity(text: str) -> int:
    assert text.endswith("Mi"), text
    return int(text[:-2]) * MiB


def test_weights_download_into_a_sized_volume_never_the_containers_layer() -> None:
    (pod,) = pods({**PLACED, "replicas": [replica("gpu-a", [0])]}, {})
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = writable_paths(pod)
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The Hugging Face cache (where from_pretrained downloads the weights), the home (CUDA's and
    # Triton's caches), /tmp and the worker's default offload folder are all on volumes.
    for path in (env["HF_HOME"], env["HOME"], "/tmp", DEFAULT_OFFLOAD_FOLDER):
        assert under(path, mounts) is not None, path
    cache = under(env["HF_HOME"], mounts)
    assert cache is not None and cache["name"] == "model-cache"
    # Qwen2-7B's checkpoint: 7.6e9 parameters in bfloat16, 15.2 GB (14.2 GiB), and some room.
    limit = quantity(cache["emptyDir"]["sizeLimit"])
    assert ESTIMATE["parameters"] * 2 < limit < ESTIMATE["parameters"] * 2 + 4 * GiB
    # The node must have that much disk free: the pod asks for every emptyDir's limit.
    scratch = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in pod["volumes"] if "emptyDir" in v)
    assert quantity(container["resources"]["requests"]["ephemeral-storage"]) == scratch


def test_a_float32_checkpoint_needs_twice_the_disk() -> None:
    config = {"model_type": "qwen2", "torch_dtype": "float32"}
    (pod,) = pods({**PLACED, "replicas": [replica("gpu-a", [0])]}, {"model": {"id": "q", "config": config}})
    limit = quantity(writable_paths(pod)["/home/kubevram"]["emptyDir"]["sizeLimit"])
    assert ESTIMATE["parameters"] * 4 < limit


def test_weights_on_a_model_volume_need_no_big_cache() -> None:
    plan, spec = VARIANTS["model volume"]
    for pod in pods(plan, spec):
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        cache = quantity(writable_paths(pod)["/home/kubevram"]["emptyDir"]["sizeLimit"])
        assert cache <= 2 * GiB


def test_disk_offload_gets_its_budget_on_a_volume() -> None:
    plan, spec = VARIANTS["disk offload"]
    b = {"metadata": {"name": "qwen", "namespace": "ai", "uid": "u"}, "spec": {"model": {"id": "q"}, **spec}}
    worker_plan = render.worker_plan(
        b,
        parse_deployment({"apiVersion": "llm.kubevram.io/v1alpha1", "kind": "LLMDeployment", **b}).spec,
        plan["replicas"][0],
    )
    assert isinstance(worker_plan, WorkerPlan) and worker_plan.offloadFolder is not None
    (pod,) = pods(plan, spec)
    volume = under(worker_plan.offloadFolder, writable_paths(pod))
    assert volume is not None and quantity(volume["emptyDir"]["sizeLimit"]) >= 40 * GiB


@pytest.mark.parametrize(
    ("variant", "resources", "memory"),
    [
        ("placed and pending", {}, 4 * GiB),
        ("cpu offload", {}, 34 * GiB),  # the CPU-offloaded layers live in the pod's memory
        ("placed and pending", {"limits": {"memory": "24Gi"}}, 24 * GiB),
        ("placed and pending", {"requests": {"memory": "10Gi"}}, 10 * GiB),
    ],
)
def test_memory_has_a_limit(variant: str, resources: dict[str, Any], memory: int) -> None:
    plan, spec = VARIANTS[variant]
    for pod in pods(plan, {**spec, "worker": {"resources": resources}}):
        got = pod["containers"][0]["resources"]
        for part in ("requests", "limits"):
            text = got[part]["memory"]
            assert (quantity(text) if text.endswith("Mi") else int(text[:-2]) * GiB) == memory, (part, got)


def test_network_policy_opens_the_api_to_clients_and_the_admin_port_to_the_operator_only() -> None:
    (policy,) = by_kind(children(), "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": render.selector_labels("qwen")}
    assert spec["policyTypes"] == ["Ingress"]
    api, admin = spec["ingress"]
    assert api == {"ports": [{"protocol": "TCP", "port": render.API_PORT}]}  # no "from": every client
    assert admin["ports"] == [{"protocol": "TCP", "port": render.ADMIN_PORT}]
    assert admin["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubevram-system"}},
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "kubevram",
                    "app.kubernetes.io/instance": "kubevram",
                }
            },
        }
    ]
    # The selector matches the worker pods, and the ports are the container's.
    (workload, *_) = by_kind(children(), "Deployment")
    template = workload["spec"]["template"]
    assert all(template["metadata"]["labels"][k] == v for k, v in spec["podSelector"]["matchLabels"].items())
    ports = {p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    assert ports == {render.API_PORT, render.ADMIN_PORT}


def test_without_the_operators_identity_the_admin_port_stays_closed() -> None:
    policy = render.render_network_policy(
        {"metadata": {"name": "qwen", "namespace": "ai", "uid": "u"}},
        operator_namespace="",
        operator_labels={},
    )
    # An ingress rule without "from" admits everyone: the admin port gets no rule at all.
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": render.API_PORT}]}]


def test_workers_may_patch_only_their_own_llmdeployments_status() -> None:
    objs = children()
    (role,) = by_kind(objs, "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["llm.kubevram.io"],
            "resources": ["llmdeployments/status"],
            "resourceNames": ["qwen"],
            "verbs": ["get", "patch"],
        }
    ]
    (binding,) = by_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    (account,) = by_kind(objs, "ServiceAccount")
    for workload in by_kind(children(PLAN), "Deployment"):
        pod = workload["spec"]["template"]["spec"]
        if workload["metadata"]["labels"][render.LABEL_SHAPE] == render.PLACEHOLDER:
            assert "serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False
        else:
            assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_limits_the_spec_sets_without_requests_are_the_requests() -> None:
    """A request above its limit is refused by the API server: the spec's limits bound the defaults."""
    resources = {"limits": {"cpu": "500m", "ephemeral-storage": "1Gi", "memory": "2Gi"}}
    for pod in pods(PLACED, {"worker": {"resources": resources}}):
        got = pod["containers"][0]["resources"]
        for key, value in resources["limits"].items():
            assert got["requests"][key] == got["limits"][key] == value, (key, got)
