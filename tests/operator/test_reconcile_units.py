"""Small pure pieces of the reconciliation: node-change detection, settings, hashes, merge patches."""

from __future__ import annotations

import copy
from typing import Any

from kubevram_emulator import gpu_node

from kubevram.api.load import parse_deployment
from kubevram.api.v1alpha1 import DEFAULT_WORKER_IMAGE, LLMDeployment
from kubevram.controller.adapter import _with_removals
from kubevram.controller.reconcile import Settings, gpu_node_changed, plan_input_hash, waiting_key


def deployment(**spec: object) -> LLMDeployment:
    return parse_deployment(
        {
            "apiVersion": "llm.kubevram.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": "qwen", "namespace": "ai"},
            "spec": {"model": {"id": "Qwen/Qwen2-7B-Instruct"}, **spec},
        }
    )


def test_gpu_node_changes_are_told_from_heartbeats() -> None:
    seen: dict[str, str] = {}
    node = gpu_node("gpu-0", gpus=2)
    assert gpu_node_changed("ADDED", node, seen)
    heartbeat = copy.deepcopy(node)
    heartbeat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-11-21T10:00:00Z"
    heartbeat["metadata"]["resourceVersion"] = "99"
    assert not gpu_node_changed("MODIFIED", heartbeat, seen)
    relabelled = copy.deepcopy(node)
    relabelled["metadata"]["labels"]["nvidia.com/gpu.count"] = "4"
    assert gpu_node_changed("MODIFIED", relabelled, seen)
    tainted = copy.deepcopy(relabelled)
    tainted["spec"] = {"taints": [{"key": "maintenance", "effect": "NoSchedule"}]}
    assert gpu_node_changed("MODIFIED", tainted, seen)
    assert not gpu_node_changed("DELETED", tainted, seen)
    assert "gpu-0" not in seen
    cpu_only = {"metadata": {"name": "cpu-0", "labels": {"kubernetes.io/hostname": "cpu-0"}}, "status": {}}
    assert not gpu_node_changed("ADDED", cpu_only, seen)


def test_waiting_key_only_for_pending_replicas() -> None:
    body = {
        "metadata": {"name": "qwen", "namespace": "ai"},
        "status": {"autoscaling": {"pendingReplicas": 2}},
    }
    assert waiting_key(body) == {("ai", "qwen"): 2}
    assert (
        waiting_key({"metadata": {"name": "qwen"}, "status": {"autoscaling": {"pendingReplicas": 0}}}) is None
    )
    assert waiting_key({"metadata": {"name": "qwen"}}) is None


def test_settings_from_the_environment_and_the_worker_image() -> None:
    settings = Settings.from_env(
        {"KUBEVRAM_WORKER_IMAGE": "registry.local/worker:2", "KUBEVRAM_RETRY_DELAY": "5",
         "KUBEVRAM_OPERATOR_NAMESPACE": "ops",
         "KUBEVRAM_OPERATOR_POD_LABELS": "app.kubernetes.io/name=kubevram, app.kubernetes.io/instance=k,junk"}
    )
    assert settings.retry_delay == 5.0 and settings.operator_namespace == "ops"
    assert settings.operator_labels == {
        "app.kubernetes.io/name": "kubevram", "app.kubernetes.io/instance": "k"
    }
    assert settings.image_for(deployment()) == "registry.local/worker:2"
    assert settings.image_for(deployment(worker={"image": "mine:1"})) == "mine:1"
    assert Settings.from_env({}).image_for(deployment()) == DEFAULT_WORKER_IMAGE


def test_plan_input_hash_ignores_only_the_replica_count() -> None:
    base = plan_input_hash(deployment(replicas=1), None)
    assert plan_input_hash(deployment(replicas=5), None) == base
    assert plan_input_hash(deployment(precision={"weights": "int8"}), None) != base
    assert plan_input_hash(deployment(), {"num_hidden_layers": 2}) != base


def test_merge_patches_remove_what_the_operator_no_longer_renders() -> None:
    existing_cm = {"data": {"plan.json": "{}", "plan-old.json": "{}", "plan-keep.json": "{}"}}
    desired_cm = {
        "kind": "ConfigMap",
        "data": {"plan.json": "{}", "plan-keep.json": "{}", "plan-new.json": "{}"},
    }
    patch = _with_removals(existing_cm, desired_cm)
    assert patch["data"] == {
        "plan.json": "{}",
        "plan-keep.json": "{}",
        "plan-new.json": "{}",
        "plan-old.json": None,
    }

    existing = {"spec": {"template": {"spec": {"nodeSelector": {"pool": "a"}, "dnsPolicy": "ClusterFirst"}}}}
    desired: dict[str, Any] = {
        "kind": "Deployment",
        "spec": {"replicas": 1, "template": {"spec": {"containers": []}}},
    }
    patch = _with_removals(existing, desired)
    # The dropped nodeSelector goes; what the API server defaulted (dnsPolicy) stays untouched.
    assert patch["spec"]["template"]["spec"] == {"containers": [], "nodeSelector": None}
    assert desired["spec"]["template"]["spec"] == {"containers": []}  # the manifest is not modified
