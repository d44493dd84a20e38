"""The InferencePool kubevram renders, checked against the published CRD (tests/data/schemas, with its
CEL rules), and the engine-type label its worker pods carry for the Endpoint Picker."""

from __future__ import annotations

from typing import Any

import pytest
from crd_check import crd_errors, load_crd

from kubevram.api.load import parse_deployment
from kubevram.controller import render

CRD = load_crd("inferencepool-v1.yaml")


def assert_valid_inference_pool(pool: dict[str, Any]) -> None:
    assert crd_errors(CRD, pool) == []


def body(**serving: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llm.kubevram.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "qwen", "namespace": "ai", "uid": "u"},
        "spec": {"model": {"id": "Qwen/Qwen2-7B-Instruct"}, "serving": serving},
    }


@pytest.mark.parametrize(
    "pool_spec",
    [{}, {"endpointPickerRef": {"name": "shared-epp", "port": 9003, "failureMode": "FailOpen"}}],
)
def test_the_rendered_inference_pool_is_valid_against_the_published_schema(pool_spec: dict[str, Any]) -> None:
    b = body(inferencePool={"enabled": True, **pool_spec})
    pool = render.render_inference_pool(b, parse_deployment(b).spec)
    assert_valid_inference_pool(pool)
    assert pool["spec"]["selector"]["matchLabels"] == render.selector_labels("qwen")  # no placeholders
    assert pool["spec"]["targetPorts"] == [{"number": render.API_PORT}]
    assert pool["spec"]["endpointPickerRef"]["name"] == pool_spec.get("endpointPickerRef", {}).get(
        "name", "qwen-epp"
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["endpointPickerRef"].pop("port"), "port is required"),
        (lambda s: s.update(targetPorts=[{"number": 8000}, {"number": 8000}]), "must be unique"),
        (lambda s: s["endpointPickerRef"].update(failureMode="Retry"), "is not one of"),
        (lambda s: s.pop("selector"), "'selector' is a required property"),
        (lambda s: s.update(extra=1), "Additional properties"),
    ],
)
def test_the_schema_check_refuses_what_the_api_server_would(mutate: Any, message: str) -> None:
    b = body(inferencePool={"enabled": True})
    pool = render.render_inference_pool(b, parse_deployment(b).spec)
    mutate(pool["spec"])
    errors = crd_errors(CRD, pool)
    assert any(message in e for e in errors), errors


def test_worker_pods_carry_the_engine_type_the_endpoint_picker_maps_to_vllm_metric_names() -> None:
    b = body()
    spec = parse_deployment(b).spec
    plan = {
        "replicas": [{"node": "n", "gpus": [0], "maxMemory": {"0": 1}, "deviceMap": {"": 0}}],
        "unscheduled": {"count": 1, "autoscaling": {"gpuCount": 1, "minGpuMemoryMiB": 1}},
    }
    worker, placeholder = render.render_workloads(b, spec, plan, image="w")
    assert worker["spec"]["template"]["metadata"]["labels"][render.LABEL_ENGINE_TYPE] == "vllm"
    # Not part of the (immutable) selector, and never on placeholders, which serve nothing.
    assert render.LABEL_ENGINE_TYPE not in worker["spec"]["selector"]["matchLabels"]
    assert render.LABEL_ENGINE_TYPE not in placeholder["spec"]["template"]["metadata"]["labels"]
