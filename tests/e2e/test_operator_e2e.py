"""The operator against a real cluster (opt-in): ``KUBEVRAM_E2E=1`` and ``KUBECONFIG`` pointing at it.

The same flow as ``tests/operator/test_operator.py`` where a real API server allows it: the CRD is
applied from ``crds/llmdeployment.yaml`` (the API server validates the generated schema), the
operator runs in-process (``kopf.testing.KopfRunner``), and everything is created in a throw-away
namespace that is deleted at the end. No GPU is needed: without GPU nodes the deployment is
unschedulable, which exercises the autoscaling path; with GPU nodes it is placed.

    KUBEVRAM_E2E=1 KUBECONFIG=~/.kube/kind-config pytest tests/e2e -q

A context whose name looks like production (``prod``) is refused.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("KUBEVRAM_E2E") != "1" or not os.environ.get("KUBECONFIG"),
        reason="opt-in: set KUBEVRAM_E2E=1 and KUBECONFIG to a test cluster",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/llm.kubevram.io/v1alpha1"


class Api:
    """kubectl over the kubernetes client's HTTP layer (what the operator's adapter uses too)."""

    def __init__(self) -> None:
        from kubevram.controller.adapter import Cluster, api_client

        self.cluster = Cluster(api_client())

    def get(self, path: str) -> dict[str, Any] | None:
        return self.cluster._get(path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.cluster._raw("POST", path, body)

    def delete(self, path: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.cluster._raw("DELETE", path)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    from kubernetes import config

    _, context = config.list_kube_config_contexts()
    if "prod" in (context or {}).get("name", ""):
        pytest.skip(f"refusing to run against context {context['name']!r}")
    api = Api()
    crd = yaml.safe_load((ROOT / "crds" / "llmdeployment.yaml").read_text(encoding="utf-8"))
    if api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}") is None:
        api.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        api.wait_for("the CRD to be served", lambda: api.get(f"{GROUP_PATH}/llmdeployments"))
    yield api


@pytest.fixture()
def namespace(api: Api) -> Iterator[str]:
    name = f"kubevram-e2e-{uuid.uuid4().hex[:6]}"
    api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        yield name
    finally:
        api.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture()
def operator(api: Api, namespace: str) -> Iterator[Any]:
    import kopf
    from kopf.testing import KopfRunner

    settings = kopf.OperatorSettings()
    args = ["run", "--standalone", "--namespace", namespace, "-m", "kubevram.controller.handlers"]
    with KopfRunner(args, settings=settings, timeout=60) as runner:
        try:
            yield runner
        finally:
            # Delete the LLMDeployments while the operator still runs: it removes their finalizer
            # (after deleting the workloads). Stopped first, it would leave the namespace Terminating.
            collection = f"{GROUP_PATH}/namespaces/{namespace}/llmdeployments"
            for item in (api.get(collection) or {}).get("items", []):
                api.delete(f"{collection}/{item['metadata']['name']}")
            api.wait_for(
                "the LLMDeployments to be gone", lambda: not (api.get(collection) or {}).get("items")
            )
    assert runner.exception is None, runner.output


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item["type"] == type_:
            return dict(item)
    return {}


def test_create_plans_and_makes_owned_children(api: Api, namespace: str, operator: Any) -> None:
    api.post(
        f"{GROUP_PATH}/namespaces/{namespace}/llmdeployments",
        {
            "apiVersion": "llm.kubevram.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": "qwen"},
            "spec": {"replicas": 1, "model": {"id": "Qwen/Qwen2-0.5B-Instruct"}},
        },
    )
    path = f"{GROUP_PATH}/namespaces/{namespace}/llmdeployments/qwen"
    obj = api.wait_for(
        "Planned=True", lambda: condition(o := api.get(path), "Planned").get("status") == "True" and o
    )
    uid = obj["metadata"]["uid"]
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert obj["status"]["estimate"]["totalBytes"] > 0
    # The API server applied the CRD's defaults.
    assert obj["spec"]["precision"]["weights"] == "bfloat16"
    deployments = api.get(f"/apis/apps/v1/namespaces/{namespace}/deployments") or {}
    owned = [d for d in deployments.get("items", []) if d["metadata"]["ownerReferences"][0]["uid"] == uid]
    assert owned
    for workload in owned:
        json.loads(workload["spec"]["template"]["metadata"]["annotations"]["llm.kubevram.io/reservation"])
    for child in (
        "configmaps/qwen-plan",
        "services/qwen",
        "secrets/qwen-admin",
        "serviceaccounts/qwen-worker",
    ):
        found = api.get(f"/api/v1/namespaces/{namespace}/{child}")
        assert found is not None and found["metadata"]["ownerReferences"][0]["uid"] == uid, child
    if condition(obj, "Scheduled").get("status") == "False":  # no GPU node in this cluster
        assert obj["status"]["autoscaling"]["pendingReplicas"] == 1
        assert any(d["metadata"]["name"] == "qwen-placeholder" for d in owned)


def test_bad_input_becomes_a_condition(api: Api, namespace: str, operator: Any) -> None:
    api.post(
        f"{GROUP_PATH}/namespaces/{namespace}/llmdeployments",
        {
            "apiVersion": "llm.kubevram.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": "bad"},
            "spec": {"model": {"id": "my/model", "configMapRef": {"name": "no-such-config"}}},
        },
    )
    path = f"{GROUP_PATH}/namespaces/{namespace}/llmdeployments/bad"
    obj = api.wait_for(
        "phase Failed", lambda: ((o := api.get(path)) or {}).get("status", {}).get("phase") == "Failed" and o
    )
    planned = condition(obj, "Planned")
    assert planned["reason"] == "InvalidSpec" and "spec.model.configMapRef" in planned["message"]
    assert api.get(f"/api/v1/namespaces/{namespace}/configmaps/bad-plan") is None
