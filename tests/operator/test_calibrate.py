"""status.calibration: the pure step from a body, and the operator end to end on kmock's emulator."""

from __future__ import annotations

from typing import Any

import pytest
from kubevram_emulator import EmulatedCluster, gpu_node

from kubevram.api.load import parse_deployment
from kubevram.controller.calibrate import calibration_status, with_calibration
from kubevram.planner.calibration import deployment_coefficient
from kubevram.planner.catalog import CONFIGS
from kubevram.planner.estimate import Workload, estimate, layer_activation_bytes
from kubevram.planner.facts import facts_from_config

LLAMA = facts_from_config(CONFIGS["meta-llama/llama-3.2-1b"])
MODEL = "meta-llama/Llama-3.2-1B"
NOW = "2025-01-01T00:00:00Z"


def true_line(workload: Workload, excess: float = 1.2) -> tuple[float, float, float]:
    """(slope, intercept, activation per token) of a model needing ``excess`` x the formula's activations."""
    e = estimate(LLAMA, workload)
    activation = excess * layer_activation_bytes(LLAMA, workload, tokens=1)
    return e.kvCacheBytesPerToken + activation, e.weightsBytes + 16 * 2**20, activation


def worker_entry(slope: float, base: float, sizes: tuple[int, ...] = (128, 512, 2048)) -> dict[str, Any]:
    return {
        "model": MODEL,
        "weights": "bfloat16",
        "devices": [{"index": 0, "allocatedBytes": int(base)}],
        "samples": [{"tokens": t, "batch": 1, "peakAllocatedBytes": int(slope * t + base)} for t in sizes],
    }


def body(
    workers: dict[str, Any], calibration: dict[str, Any] | None = None, **estimation: Any
) -> dict[str, Any]:
    workload = Workload(weights="bfloat16", max_sequence_length=2048)
    e = estimate(LLAMA, workload)
    status: dict[str, Any] = {
        "workers": workers,
        "estimate": {"weightsBytes": e.weightsBytes, "kvCacheBytesPerToken": e.kvCacheBytesPerToken,
                     "activationBytes": e.activationBytes},
    }
    if calibration is not None:
        status["calibration"] = calibration
    return {
        "metadata": {"name": "llama", "namespace": "default"},
        "spec": {"model": {"id": MODEL}, "serving": {"maxSequenceLength": 2048}, "estimation": estimation},
        "status": status,
    }


def test_calibration_status_from_a_body():
    slope, base, activation = true_line(Workload(weights="bfloat16", max_sequence_length=2048))
    result = calibration_status(body({"llama-a": worker_entry(slope, base)}), NOW)
    assert result is not None and result["time"] == NOW and result["inUse"] is False
    assert result["coefficient"]["bytesPerToken"] == pytest.approx(activation, rel=1e-3)
    (row,) = result["perGpu"]
    assert row["pod"] == "llama-a" and row["device"] == "0" and row["tokens"] == 2048
    assert row["errorPct"] < 0  # the formula is below a model that needs 20 % more activations
    # The same reports again: nothing to write.
    assert calibration_status(body({"llama-a": worker_entry(slope, base)}, calibration=result), NOW) is None
    # No workers and no calibration yet: nothing to write.
    assert calibration_status(body({}), NOW) is None
    # Bad spec: the reconcile handler reports it; calibration writes nothing.
    broken = body({"llama-a": worker_entry(slope, base)})
    broken["spec"]["precision"] = {"weights": "fp7"}
    assert calibration_status(broken, NOW) is None


def test_previous_coefficient_stays_when_the_new_reports_are_too_few():
    slope, base, _ = true_line(Workload(weights="bfloat16", max_sequence_length=2048))
    first = calibration_status(body({"llama-a": worker_entry(slope, base)}), NOW)
    assert first is not None
    after_rollout = body({"llama-b": worker_entry(slope, base, sizes=(512,))}, calibration=first)
    second = calibration_status(after_rollout, "2025-01-01T00:01:00Z")
    assert second is not None
    assert second["coefficient"] == first["coefficient"]
    assert second["reason"] == (
        "not enough samples: 1 (at least 3 prefills are needed); the previous coefficient stays"
    )
    assert [row["pod"] for row in second["perGpu"]] == ["llama-b"]


def test_with_calibration_hands_the_coefficient_to_the_planner_only_on_opt_in():
    status = {"calibration": {"coefficient": {"bytesPerToken": 81234}}, "workers": {"x": {}}}
    base = {"apiVersion": "llm.kubevram.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "l"}}
    off = parse_deployment({**base, "spec": {"model": {"id": MODEL}}})
    on = parse_deployment({**base, "spec": {"model": {"id": MODEL}, "estimation": {"useCalibration": True}}})
    assert with_calibration(off, status) is off
    assert with_calibration(on, {}) is on
    handed = with_calibration(on, status)
    assert handed.status is not None and handed.status.workers == {}  # only the calibration travels
    assert deployment_coefficient(handed) == 81234.0
    workload = Workload.from_spec(handed.spec, deployment_coefficient(handed))
    assert workload.activation_bytes_per_token == 81234.0


def test_operator_calibrates_from_worker_reports_and_plans_with_the_coefficient(
    cluster: EmulatedCluster, operator: Any
) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", gpus=2, memory_mib=23034, product="NVIDIA-L4"))
    spec = {"replicas": 1, "model": {"id": MODEL}, "serving": {"maxSequenceLength": 2048},
            "estimation": {"useCalibration": True}}
    cluster.create_llmd({"apiVersion": "llm.kubevram.io/v1alpha1", "kind": "LLMDeployment",
                         "metadata": {"name": "llama", "namespace": "default"}, "spec": spec})
    planned = cluster.wait_for(
        "a plan", lambda: ((cluster.llmd("llama") or {}).get("status") or {}).get("estimate")
    )
    formula = Workload(weights="bfloat16", max_sequence_length=2048)
    assert planned["activationBytes"] == estimate(LLAMA, formula).activationBytes

    # A worker pod (the operator drops the reports of pods that do not exist) reports its prefill
    # peaks, as kubevram.worker.reporter does (merge patch on /status).
    labels = {"app.kubernetes.io/managed-by": "kubevram", "llm.kubevram.io/deployment": "llama"}
    cluster.create("/api/v1/namespaces/default/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "llama-abc", "labels": labels},
        "spec": {"containers": [{"name": "worker", "image": "kubevram-worker"}]},
    })
    slope, base, activation = true_line(formula)
    cluster.patch(cluster.llmd_path("llama") + "/status",
                  {"status": {"workers": {"llama-abc": worker_entry(slope, base)}}})

    def calibrated() -> dict[str, Any] | None:
        calibration = ((cluster.llmd("llama") or {}).get("status") or {}).get("calibration") or {}
        return calibration if calibration.get("coefficient") else None

    calibration = cluster.wait_for("status.calibration", calibrated)
    coefficient = calibration["coefficient"]["bytesPerToken"]
    assert coefficient == pytest.approx(activation, rel=1e-3)
    assert calibration["perGpu"][0]["pod"] == "llama-abc"

    # The next plan (here: a spec change) uses the refitted coefficient.
    cluster.patch(cluster.llmd_path("llama"), {"spec": {"serving": {"maxBatchSize": 2}}})
    two = Workload(weights="bfloat16", max_sequence_length=2048, max_batch_size=2,
                   activation_bytes_per_token=coefficient)
    expected = estimate(LLAMA, two).activationBytes

    def replanned() -> int | None:
        st = (cluster.llmd("llama") or {}).get("status") or {}
        value = (st.get("estimate") or {}).get("activationBytes")
        return value if st.get("observedGeneration") == 2 and value == expected else None

    cluster.wait_for("a plan with the calibrated activations", replanned)
    # the calibrated term, and the padded batch's attention mask that no linear fit holds
    assert expected == layer_activation_bytes(LLAMA, two) == int(coefficient * 4096) + 2 * 2048 * 2048
    uncalibrated = Workload(weights="bfloat16", max_sequence_length=2048, max_batch_size=2)
    assert expected > estimate(LLAMA, uncalibrated).activationBytes
