"""DRA mode without the API server: the inventory read from ResourceSlices and ResourceClaims as NVIDIA's
driver publishes them, the plan made on it, and the ResourceClaimTemplates rendered for it, whose every CEL
selector is evaluated (cel-python, with Kubernetes' quantity library) against every device of the slices:
each request must select exactly the devices that could hold its GPU's budget."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from dra_cluster import (
    A100_80,
    DEVICE_CLASSES,
    H100,
    L4,
    MiB,
    allocated_claim,
    dra_node,
    evaluate,
    gpu_device,
    mig_device,
    resource_slice,
    selects,
)

from kubevram.api.load import parse_deployment
from kubevram.controller import claims as claims_module
from kubevram.controller import render
from kubevram.planner.catalog import known_config
from kubevram.planner.dra import build_dra_inventory
from kubevram.planner.inventory import Reservation
from kubevram.planner.placement import DraInput, plan_cluster

KUBE_VERSION = "1.34"
# The models' published config.json files, as the planner's catalogue holds them.
QWEN_7B = dict(known_config("Qwen/Qwen2-7B-Instruct") or {})
QWEN_05B = dict(known_config("Qwen/Qwen2-0.5B-Instruct") or {})
LLAMA_70B = dict(known_config("meta-llama/Meta-Llama-3-70B-Instruct") or {})


def body(name: str, config: dict[str, Any], *, replicas: int = 1, **placement: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llm.kubevram.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"},
        "spec": {
            "replicas": replicas,
            "model": {"id": f"org/{name}", "config": config},
            "serving": {"maxSequenceLength": 4096, "maxBatchSize": 1},
            "placement": placement,
        },
    }


NODES = [dra_node("a100-0"), dra_node("mixed-0"), dra_node("l4-shared-0")]
SLICES = [
    resource_slice("a100-0", [gpu_device(i, A100_80) for i in range(4)]),
    # A node whose first A100 runs MIG (two 3g.40gb instances), beside a whole H100.
    resource_slice(
        "mixed-0",
        [
            mig_device(0, A100_80, "3g.40gb", 9, 0, 40192),
            mig_device(0, A100_80, "3g.40gb", 9, 4, 40192),
            gpu_device(1, H100),
        ],
    ),
    resource_slice("l4-shared-0", [gpu_device(0, L4, shares="memory"), gpu_device(1, L4, shares="memory")]),
]
ALL_DEVICES = [(s["spec"]["nodeName"], d) for s in SLICES for d in s["spec"]["devices"]]


def plan(
    bodies: list[dict[str, Any]],
    claims: list[dict[str, Any]] = (),
    slices: list[dict[str, Any]] = SLICES,
    reservations: list[Reservation] = (),
) -> list[dict[str, Any]]:
    deployments = [parse_deployment(b) for b in bodies]
    result = plan_cluster(
        deployments, NODES, [], dra=DraInput(slices, list(claims)), reservations=reservations
    )
    return result.to_json()


def templates(b: dict[str, Any], p: dict[str, Any]) -> list[dict[str, Any]]:
    return render.render_claim_templates(b, parse_deployment(b).spec, p)


# ------------------------------------------------------------------------------------------ inventory


def test_the_inventory_reads_whole_gpus_mig_devices_and_shareable_ones_as_the_driver_publishes_them() -> None:
    inventory = build_dra_inventory(NODES, SLICES)
    assert inventory.warnings == []
    by_name = inventory.by_name()
    a100 = by_name["a100-0"]
    assert [(d.name, d.kind, d.resource, d.memory_bytes) for d in a100.devices] == [
        (f"gpu-{i}", "gpu", "gpu.nvidia.com", 81920 * MiB) for i in range(4)
    ]
    assert a100.product == "NVIDIA A100-SXM4-80GB" and a100.allocatable == {"gpu.nvidia.com": 4}
    mixed = by_name["mixed-0"]
    assert [(d.kind, d.resource, d.memory_bytes // MiB) for d in mixed.devices] == [
        ("mig", "mig.nvidia.com", 40192),
        ("mig", "mig.nvidia.com", 40192),
        ("gpu", "gpu.nvidia.com", 81559),
    ]
    shared = by_name["l4-shared-0"]
    assert {(d.kind, d.step, d.memory_bytes) for d in shared.devices} == {("timeslice", MiB, 23034 * MiB)}


def test_claims_hold_devices_whole_or_their_consumed_memory_and_kubevrams_own_are_the_ledgers() -> None:
    claims = [
        allocated_claim("training", "a100-0", ["gpu-1", "gpu-3"]),
        allocated_claim("notebook", "l4-shared-0", ["gpu-0"], consumed={"gpu-0": "6Gi"}),
        # A kubevram worker's claim: the placement ledger counts it, not the claims.
        allocated_claim("qwen-x", "a100-0", ["gpu-0"], labels={"llm.kubevram.io/deployment": "qwen"}),
    ]
    inventory = build_dra_inventory(NODES, SLICES, claims).by_name()
    assert inventory["a100-0"].held_whole == {1, 3}
    assert inventory["l4-shared-0"].committed == {0: 6 * 2**30}
    assert inventory["l4-shared-0"].free_bytes(0) == 23034 * MiB - 6 * 2**30


def test_old_generations_partitionable_devices_and_unknown_nodes_are_left_out_with_warnings() -> None:
    stale = resource_slice("a100-0", [gpu_device(i, A100_80) for i in range(8)], generation=0)
    partitionable = resource_slice(
        "mixed-0", [{**gpu_device(0, H100), "consumesCounters": [{"counterSet": "x"}]}]
    )
    partitionable["spec"]["pool"]["generation"] = 2
    ghost = resource_slice("gone-0", [gpu_device(0, L4)])
    inventory = build_dra_inventory(NODES, [*SLICES, stale, partitionable, ghost])
    assert len(inventory.by_name()["a100-0"].devices) == 4  # generation 1 only
    assert "mixed-0" not in inventory.by_name()  # its newest generation publishes no plannable device
    assert any("consumes shared counters" in w for w in inventory.warnings)
    assert any("gone-0" in w and "no such Node" in w for w in inventory.warnings)


# ------------------------------------------------------------------------------- claims and their CEL


def _requests(template: dict[str, Any]) -> list[dict[str, Any]]:
    return list(template["spec"]["spec"]["devices"]["requests"])


def _budget(replica: dict[str, Any], pod_index: int) -> int:
    """What the GPU at ``pod_index`` must hold: the plan's per-GPU total (weights, KV, activations, ...)."""
    return int(replica["perGpu"][pod_index]["total"])


def _could_hold(device: dict[str, Any], nbytes: int, product: str, device_class: str) -> bool:
    """Ground truth from the slice itself: the device's class, product and memory."""
    kind = device["attributes"]["type"]["string"]
    return (
        kind == {"gpu.nvidia.com": "gpu", "mig.nvidia.com": "mig"}[device_class]
        and device["attributes"]["productName"]["string"] == product
        and int(device["capacity"]["memory"]["value"]) >= nbytes
    )


@pytest.mark.parametrize(
    ("name", "config", "placement", "replicas"),
    [
        ("qwen-7b", QWEN_7B, {}, 3),  # one A100 or MIG each
        ("llama-70b", LLAMA_70B, {"gpusPerReplica": 4, "strategy": "balanced_low_0"}, 1),  # uneven budgets
        ("qwen-small", QWEN_05B, {"sharing": "shared"}, 3),  # slices of shareable L4s
    ],
)
def test_every_request_selects_exactly_the_devices_that_could_hold_its_gpus_budget(
    name: str, config: dict[str, Any], placement: dict[str, Any], replicas: int
) -> None:
    b = body(name, config, replicas=replicas, **placement)
    (p,) = plan([b])
    assert p["resourceAPI"] == "dra" and p["replicas"], p["unscheduled"]
    for replica, template in zip(p["replicas"], templates(b, p), strict=False):
        requests = _requests(template)
        gpus = len(replica["gpus"])
        assert sum(r["exactly"]["count"] for r in requests) == gpus
        pod_indices = (
            [[i] for i in range(gpus)] if len(requests) == gpus else [list(range(gpus))]  # per GPU, or count
        )
        for request, indices in zip(requests, pod_indices, strict=True):
            exactly = request["exactly"]
            sliced = replica["deviceKind"] == "timeslice"
            need = max(
                replica["reservation"][str(replica["gpus"][i])] if sliced else _budget(replica, i)
                for i in indices
            )
            chosen = {(node, d["name"]) for node, d in ALL_DEVICES if selects(exactly, d)}
            truth = {
                (node, d["name"])
                for node, d in ALL_DEVICES
                if _could_hold(d, need, replica["gpuProduct"], exactly["deviceClassName"])
            }
            assert chosen == truth, (request, sorted(chosen), sorted(truth))
            assert any(n == replica["node"] for n, _ in chosen)  # its own node has such a device
            if sliced:  # a VRAM slice: exactly the planned one, on a device that takes several
                assert exactly["capacity"] == {"requests": {"memory": str(need)}}
            else:
                assert "capacity" not in exactly


def test_uneven_budgets_get_one_request_each_and_equal_ones_one_request_with_count() -> None:
    b = body("llama-70b", LLAMA_70B, gpusPerReplica=4, strategy="balanced_low_0")
    (p,) = plan([b])
    (replica,) = p["replicas"]
    requests = _requests(templates(b, p)[0])
    assert [r["name"] for r in requests] == ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]  # the pod's own indices
    assert [int(r["exactly"]["selectors"][0]["cel"]["expression"].split('"')[-2]) for r in requests] == [
        _budget(replica, i) for i in range(4)
    ]
    single = {**replica, "perGpu": [replica["perGpu"][1]] * 4}
    (one,) = claims_module.replica_requests(single)
    assert one["name"] == "gpus" and one["exactly"]["count"] == 4


def test_shared_replicas_request_exactly_their_slice_and_never_overcommit_a_device() -> None:
    a = body("small-a", QWEN_05B, replicas=4, sharing="shared")
    c = body("small-c", QWEN_05B | {"num_hidden_layers": 12}, replicas=4, sharing="shared")
    notebook = allocated_claim("notebook", "l4-shared-0", ["gpu-0"], consumed={"gpu-0": "12Gi"})
    plans = plan([a, c], [notebook])
    booked: dict[tuple[str, int], int] = {("l4-shared-0", 0): 12 * 2**30}
    for p, b in zip(plans, [a, c], strict=True):
        for replica, template in zip(p["replicas"], templates(b, p), strict=False):
            (request,) = _requests(template)
            (node_index,) = replica["gpus"]
            piece = replica["reservation"][str(node_index)]
            assert piece % MiB == 0  # the driver's step: what the scheduler books is what the plan booked
            assert request["exactly"]["capacity"]["requests"]["memory"] == str(piece)
            key = (replica["node"], node_index)
            booked[key] = booked.get(key, 0) + piece
    assert booked and all(total <= 23034 * MiB for total in booked.values()), booked


def test_the_pending_claim_asks_a_new_node_for_the_per_gpu_need_and_the_pinned_product() -> None:
    b = body(
        "llama-70b",
        LLAMA_70B,
        replicas=2,
        gpusPerReplica=2,
        nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    )
    # Only mixed-0 (one H100) carries the label; two GPUs of it are needed.
    nodes = [dra_node("mixed-0", labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}), *NODES[::2]]
    deployment = parse_deployment(b)
    p = plan_cluster([deployment], nodes, [], dra=DraInput(SLICES)).to_json()[0]
    assert p["unscheduled"]["count"] == 2 and not p["replicas"]
    (template,) = render.render_claim_templates(b, deployment.spec, p)
    (request,) = _requests(template)
    mib = p["unscheduled"]["autoscaling"]["minGpuMemoryMiB"]
    assert request["exactly"]["count"] == 2
    h100_node_template = gpu_device(0, H100)  # what a node group's template lists
    assert selects(request["exactly"], h100_node_template) == (mib <= 81559)
    assert not selects(request["exactly"], gpu_device(0, A100_80))  # the product the spec pins
    assert not selects(request["exactly"], gpu_device(0, {**H100, "memory": (mib - 1) * MiB}))
    placeholder = render.render_placeholder(b, deployment.spec, p, count=2)
    pod = placeholder["spec"]["template"]["spec"]
    assert pod["resourceClaims"] == [
        {"name": "gpus", "resourceClaimTemplateName": template["metadata"]["name"]}
    ]
    assert "affinity" not in pod and "nvidia.com/gpu" not in pod["containers"][0]["resources"]["requests"]


def test_the_ledger_and_foreign_claims_keep_deployments_off_each_others_devices() -> None:
    training = [allocated_claim("training", "mixed-0", ["gpu-1"])]  # the H100, device index 2 of mixed-0
    a = body("qwen-a", QWEN_7B, replicas=4)
    (first,) = plan([a], training)
    held = [Reservation.of("default", "qwen-a", r["node"], r["reservation"]) for r in first["replicas"]]
    b = body("qwen-b", QWEN_7B, replicas=4)
    (second,) = plan([b], training, reservations=held)
    taken = [(r["node"], g) for p in (first, second) for r in p["replicas"] for g in r["gpus"]]
    assert len(taken) == len(set(taken))
    assert ("mixed-0", 2) not in taken  # the H100 a training job holds
    assert len(taken) == 6  # 4 A100s and 2 MIG devices: no more
    assert second["unscheduled"]["count"] == 2


# ------------------------------------------------------------------------------- Kubernetes schemas


def test_rendered_claim_templates_and_workloads_are_valid_kubernetes_1_34_objects() -> None:
    for b in (body("qwen-7b", QWEN_7B, replicas=5), body("small", QWEN_05B, replicas=2, sharing="shared")):
        deployment = parse_deployment(b)
        (p,) = plan([b])
        children = render.render_children(b, deployment.spec, p, image="ghcr.io/kubevram/worker:0.1.0")
        kinds = {c["kind"] for c in children}
        assert "ResourceClaimTemplate" in kinds
        for child in children:
            kubernetes_validate.validate(child, KUBE_VERSION, strict=True)
        workloads = [c for c in children if c["kind"] == "Deployment"]
        named = {c["metadata"]["name"] for c in children if c["kind"] == "ResourceClaimTemplate"}
        for workload in workloads:
            pod = workload["spec"]["template"]["spec"]
            (claim,) = pod["resourceClaims"]
            assert claim["resourceClaimTemplateName"] in named
            resources = pod["containers"][0]["resources"]
            assert resources["claims"] == [{"name": claim["name"]}]
            assert not [k for k in resources["requests"] if k.startswith("nvidia.com/")]


def test_the_selectors_are_errors_where_kubernetes_cel_would_fail() -> None:
    device = gpu_device(0, L4)
    assert evaluate(claims_module.memory_selector(L4["memory"])["cel"]["expression"], device)
    assert not evaluate(claims_module.memory_selector(L4["memory"] + 1)["cel"]["expression"], device)
    with pytest.raises(Exception, match="overload"):  # a Quantity is no number: >= on it fails
        evaluate('device.capacity["gpu.nvidia.com"].memory >= 1', device)
    for cls in DEVICE_CLASSES:
        kubernetes_validate.validate(cls, KUBE_VERSION, strict=True)


def test_every_pod_template_of_a_group_names_a_rendered_template_of_the_operators_driver() -> None:
    b = body("qwen-group", QWEN_7B, multiNode="always")
    deployment = parse_deployment(b)
    nodes = [dra_node(f"h100-{i}") for i in range(2)]
    slices = [resource_slice(f"h100-{i}", [gpu_device(j, H100) for j in range(8)]) for i in range(2)]
    (p,) = plan_cluster([deployment], nodes, [], dra=DraInput(slices)).to_json()
    assert p["replicas"][0]["group"]["size"] == 2
    driver = "gpu.example.com"  # the chart's gpus.draDriver
    children = render.render_children(b, deployment.spec, p, image="w", dra_driver=driver)
    named = {c["metadata"]["name"]: c for c in children if c["kind"] == "ResourceClaimTemplate"}
    (lws,) = [c for c in children if c["kind"] == render.LWS_KIND]
    pods = [lws["spec"]["leaderWorkerTemplate"][role] for role in ("leaderTemplate", "workerTemplate")]
    used = {claim["resourceClaimTemplateName"] for pod in pods for claim in pod["spec"]["resourceClaims"]}
    assert used == set(named)  # each one rendered, none left over
    for template in named.values():
        kubernetes_validate.validate(template, KUBE_VERSION, strict=True)
        for request in _requests(template):
            for selector in request["exactly"]["selectors"]:
                assert f'device.capacity["{driver}"]' in selector["cel"]["expression"] or (
                    f'device.attributes["{driver}"]' in selector["cel"]["expression"]
                )
