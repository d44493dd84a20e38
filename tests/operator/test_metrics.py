"""The operator's /metrics on kmock's emulator: several LLMDeployments, other pods holding GPUs, workers'
reports in status.workers; every value is checked against what the cluster shows (the workloads'
reservation annotations, the statuses the operator wrote, the reports the tests wrote)."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from kubevram_emulator import EmulatedCluster, gpu_node, llm_deployment
from prometheus_client.parser import text_string_to_metric_families
from test_calibrate import MODEL, true_line, worker_entry
from test_operator import L4, workloads

from kubevram.controller import metrics, render
from kubevram.planner.estimate import Workload

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
MiB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def scrape() -> Iterator[Any]:
    port = free_port()
    stop = metrics.serve(port, "127.0.0.1")

    def get() -> Samples:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        out: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    try:
        yield get
    finally:
        stop()


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(tuple(sorted(labels.items())))


def series(samples: Samples, name: str, **match: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {k: v for k, v in samples.get(name, {}).items() if set(match.items()) <= set(k)}


def worker_pod(workload: dict[str, Any], suffix: str) -> dict[str, Any]:
    """The pod the workload's ReplicaSet would make (no controller-manager here): its template's labels and
    reservation, on the node the reservation names."""
    template = workload["spec"]["template"]
    held = json.loads(template["metadata"]["annotations"][render.RESERVATION])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{workload['metadata']['name']}-{suffix}",
            "labels": template["metadata"]["labels"],
            "annotations": {render.RESERVATION: template["metadata"]["annotations"][render.RESERVATION]},
        },
        "spec": {"nodeName": held["node"], "containers": [{"name": "worker", "image": "w"}]},
    }


def held_by(workload: dict[str, Any]) -> dict[str, Any] | None:
    """The reservation annotation of a workload's pod template (None: a placeholder's)."""
    raw = (workload["spec"]["template"]["metadata"].get("annotations") or {}).get(render.RESERVATION)
    return json.loads(raw) if raw is not None else None


def report(pod: str, *, reserved: int, peak: int, **extra: Any) -> dict[str, Any]:
    return {pod: {"devices": [{"index": 0, "reservedBytes": reserved, "peakReservedBytes": peak}], **extra}}


def reserved_by_annotations(
    cluster: EmulatedCluster, names: Iterable[str]
) -> tuple[dict[tuple[str, int], int], dict[str, int]]:
    """What the workloads' reservation annotations hold: per (node, GPU index) and per deployment."""
    per_gpu: dict[tuple[str, int], int] = {}
    per_deployment: dict[str, int] = {}
    for name in names:
        for w in workloads(cluster, name).values():
            held = held_by(w)
            if held is None:
                continue  # the placeholder holds nothing
            for index, nbytes in held["gpus"].items():
                key = (held["node"], int(index))
                per_gpu[key] = per_gpu.get(key, 0) + nbytes * w["spec"]["replicas"]
                per_deployment[name] = per_deployment.get(name, 0) + nbytes * w["spec"]["replicas"]
    return per_gpu, per_deployment


def populate(cluster: EmulatedCluster) -> dict[str, dict[str, Any]]:
    """Two L4 nodes, another team's pod holding one GPU, three LLMDeployments (qwen: 2 replicas, llama: 1,
    extra: 1 that waits for the autoscaler), and the reports of their worker pods; returns the reports per
    deployment once the operator has calibrated llama from them."""
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.add_node(gpu_node("gpu-l4-1", **L4))
    # Another team's pod holds one GPU of gpu-l4-1 (which one, only the device plugin knows).
    cluster.create(
        "/api/v1/namespaces/default/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "notebook"},
            "spec": {
                "nodeName": "gpu-l4-1",
                "containers": [
                    {"name": "jupyter", "image": "j", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
                ],
            },
            "status": {"phase": "Running"},
        },
    )

    def status(name: str, phase: str) -> dict[str, Any] | None:
        st = (cluster.llmd(name) or {}).get("status") or {}
        return st if st.get("phase") == phase else None

    cluster.create_llmd(llm_deployment("qwen", replicas=2))
    cluster.wait_for("qwen planned", lambda: status("qwen", "Planned"))
    cluster.create_llmd(llm_deployment("llama", MODEL, serving={"maxSequenceLength": 2048}))
    cluster.wait_for("llama planned", lambda: status("llama", "Planned"))
    cluster.create_llmd(llm_deployment("extra"))  # no GPU left: it waits for the autoscaler
    cluster.wait_for("extra pending", lambda: status("extra", "Scheduling"))

    # The workers start and report (the operator drops the reports of pods that do not exist).
    reports: dict[str, dict[str, Any]] = {"qwen": {}, "llama": {}}
    slope, base, _ = true_line(Workload(weights="bfloat16", max_sequence_length=2048))
    for name in reports:
        for i, workload in enumerate(w for w in workloads(cluster, name).values() if held_by(w)):
            pod = worker_pod(workload, f"x{i}")
            cluster.create("/api/v1/namespaces/default/pods", pod)
            pod_name = pod["metadata"]["name"]
            entry = report(pod_name, reserved=(10 + i) * 1000 * MiB, peak=(12 + i) * 1000 * MiB)
            if name == "llama":  # prefill samples: the operator calibrates the estimate
                entry[pod_name]["samples"] = worker_entry(slope, base)["samples"]
                entry[pod_name].update(model=MODEL, weights="bfloat16")
            reports[name].update(entry)
        cluster.patch(cluster.llmd_path(name) + "/status", {"status": {"workers": reports[name]}})

    cluster.wait_for(
        "llama calibrated",
        lambda: ((cluster.llmd("llama") or {}).get("status") or {}).get("calibration", {}).get("perGpu"),
    )
    return reports


def test_metrics_match_the_plans_and_the_reports(
    cluster: EmulatedCluster, operator: Any, scrape: Any
) -> None:
    reports = populate(cluster)

    def settled() -> Samples | None:
        samples = scrape()
        ready = (
            value(
                samples, "kubevram_deployment_estimate_error_ratio", namespace="default", deployment="llama"
            )
            is not None
        )
        used = len(series(samples, "kubevram_gpu_memory_used_bytes")) == 3
        return samples if ready and used else None

    samples = cluster.wait_for("the reports in /metrics", settled, timeout=30)
    objs = {n: cluster.llmd(n) or {} for n in ("qwen", "llama", "extra")}

    # Per node and GPU: capacity, kubevram's reservations as the workloads' annotations say, free.
    reserved, by_deployment = reserved_by_annotations(cluster, objs)
    assert len(reserved) == 3  # two qwen replicas and one llama, one L4 each
    capacity = 23034 * MiB
    for node in ("gpu-l4-0", "gpu-l4-1"):
        for gpu in ("0", "1"):
            labels = {"node": node, "gpu": gpu, "product": "NVIDIA-L4"}
            held = reserved.get((node, int(gpu)), 0)
            assert value(samples, "kubevram_gpu_memory_capacity_bytes", **labels) == capacity
            assert value(samples, "kubevram_gpu_memory_reserved_bytes", **labels) == min(held, capacity)
            assert value(samples, "kubevram_gpu_memory_free_bytes", **labels) == (0 if held else capacity)
    node_labels = {"node": "gpu-l4-1", "product": "NVIDIA-L4"}
    assert value(samples, "kubevram_node_gpu_memory_other_pods_bytes", **node_labels) == capacity
    assert (
        value(samples, "kubevram_node_gpu_memory_free_bytes", **node_labels) == 0
    )  # 1 held, 1 the notebook's

    # What the workers report, on the GPU their pod's reservation names.
    pods = {p["metadata"]["name"]: p for p in cluster.items("/api/v1/namespaces/default/pods")}
    for entries in reports.values():
        for pod, entry in entries.items():
            held = json.loads(pods[pod]["metadata"]["annotations"][render.RESERVATION])
            (index,) = held["gpus"]
            labels = {"node": held["node"], "gpu": index, "product": "NVIDIA-L4"}
            assert (
                value(samples, "kubevram_gpu_memory_used_bytes", **labels)
                == entry["devices"][0]["reservedBytes"]
            )

    # Per deployment: the estimate, replicas, reservations, use, peak and the estimate's error.
    for name, obj in objs.items():
        st, d = obj["status"], {"namespace": "default", "deployment": name}
        parts = {
            "weights": "weightsBytes",
            "kv_cache": "kvCacheBytes",
            "activations": "activationBytes",
            "overhead_per_gpu": "overheadBytesPerGPU",
            "total": "totalBytes",
        }
        for part, key in parts.items():
            assert value(samples, "kubevram_deployment_estimate_bytes", **d, part=part) == st["estimate"][key]
        assert value(samples, "kubevram_deployment_replicas_desired", **d) == obj["spec"]["replicas"]
        assert value(samples, "kubevram_deployment_replicas_placed", **d) == len(st["placements"])
        assert value(samples, "kubevram_deployment_reserved_bytes", **d) == by_deployment.get(name, 0)
        pending = series(samples, "kubevram_deployment_replicas_pending", **d)
        if name == "extra":
            assert pending == {
                tuple(
                    sorted(
                        {
                            **d,
                            "reason": "InsufficientGPUMemory",
                            "gpu_class": st["autoscaling"]["gpuClass"],
                        }.items()
                    )
                ): 1
            }
            assert value(samples, "kubevram_deployment_used_bytes", **d) is None  # no worker reports
            continue
        assert list(pending.values()) == [0]
        devices = [e["devices"][0] for e in reports[name].values()]
        assert value(samples, "kubevram_deployment_used_bytes", **d) == sum(
            x["reservedBytes"] for x in devices
        )
        assert value(samples, "kubevram_deployment_measured_peak_bytes", **d) == max(
            x["peakReservedBytes"] for x in devices
        )
    (row,) = objs["llama"]["status"]["calibration"]["perGpu"]
    assert value(
        samples, "kubevram_deployment_estimate_error_ratio", namespace="default", deployment="llama"
    ) == pytest.approx(row["errorPct"] / 100)
    assert (
        value(samples, "kubevram_deployment_estimate_error_ratio", namespace="default", deployment="qwen")
        is None
    )

    # The operator's own work: the ledger, reconciles by outcome, latencies, API errors.
    assert sum(series(samples, "kubevram_ledger_reservations").values()) == 3
    assert value(samples, "kubevram_reconciles_total", outcome="planned") >= 2  # type: ignore[operator]
    assert value(samples, "kubevram_reconciles_total", outcome="pending") >= 1  # type: ignore[operator]
    assert value(samples, "kubevram_reconcile_duration_seconds_count") >= 3  # type: ignore[operator]
    assert value(samples, "kubevram_planning_duration_seconds_count") >= 3  # type: ignore[operator]
    # API errors: test_api_errors_count_only_answers_the_operator_did_not_expect.

    # Every series metrics.SERIES declares (the Grafana dashboard queries only those) is exported.
    # (API errors have a sample once one happened: the test below makes one.)
    declared = {name for series_ in metrics.SERIES for name in series_.sample_names()}
    assert declared - {"kubevram_api_errors_total"} <= set(samples)

    # A deleted deployment's series go; the waiting one takes its GPU.
    cluster.delete(cluster.llmd_path("llama"))

    def llama_gone() -> Samples | None:
        s = scrape()
        gone = not series(s, "kubevram_deployment_replicas_desired", deployment="llama")
        placed = value(s, "kubevram_deployment_replicas_placed", namespace="default", deployment="extra") == 1
        return s if gone and placed else None

    samples = cluster.wait_for("llama's series to go and extra to be placed", llama_gone)
    extra = {"namespace": "default", "deployment": "extra"}
    assert list(series(samples, "kubevram_deployment_replicas_pending", **extra).values()) == [0]
    assert sum(series(samples, "kubevram_ledger_reservations").values()) == 3


def api_errors(samples: Samples) -> dict[str, float]:
    return {dict(k)["status"]: v for k, v in series(samples, "kubevram_api_errors_total").items()}


def test_api_errors_count_only_answers_the_operator_did_not_expect(
    cluster: EmulatedCluster, operator: Any, scrape: Any
) -> None:
    """A 404 for a plan not written yet, a 409 for an object someone created first: the answers every
    reconcile meets on a healthy cluster are no errors, or an alert on the series' rate would always
    fire. A 503 from the API server is one."""
    import kmock

    before = api_errors(scrape())
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    cluster.create_llmd(llm_deployment("qwen"))
    cluster.wait_for("qwen Planned", lambda: ((cluster.llmd("qwen") or {}).get("status") or {}).get("phase")
                     == "Planned")
    after = api_errors(scrape())
    assert {s: after[s] - before.get(s, 0) for s in after if after[s] != before.get(s, 0)} == {}

    def unavailable() -> None:
        assert cluster.emulator is not None
        cluster.emulator["get", kmock.resource("v1", "nodes")] << 503

    cluster.call(unavailable)
    cluster.patch(cluster.llmd_path("qwen"), {"spec": {"replicas": 2}})
    cluster.wait_for("the 503 counted", lambda: api_errors(scrape()).get("503", 0) > before.get("503", 0))
