"""GPU inventory from Node objects and what pods hold: GFD labels, sharing, MIG, taints, bad input."""

from __future__ import annotations

import copy

import pytest
import yaml
from gpu_nodes import A100_80, L4, MiB, gfd_node, kubevram_pod, other_pod

from kubevram.planner.inventory import Taint, admits, build_inventory, tolerates
from kubevram.planner.plan_cli import sample_cluster_text


def test_plain_gpu_node() -> None:
    inv = build_inventory([gfd_node("a", A100_80, 8)])
    assert inv.warnings == []
    (node,) = inv.nodes
    assert node.name == "a" and node.product == "NVIDIA-A100-SXM4-80GB"
    assert node.sharing == "none" and not node.shares
    assert [d.index for d in node.devices] == list(range(8))
    assert {d.kind for d in node.devices} == {"gpu"}
    assert node.devices[0].memory_bytes == 81920 * MiB
    assert node.allocatable == {"nvidia.com/gpu": 8}
    assert node.ready and not node.unschedulable
    assert node.cpu_memory_bytes == 512 * 2**30


def test_time_sliced_node_offers_slots() -> None:
    (node,) = build_inventory([gfd_node("ts", L4, 2, replicas=4)]).nodes
    assert node.sharing == "time-slicing"
    assert [(d.kind, d.slots) for d in node.devices] == [("timeslice", 4), ("timeslice", 4)]
    assert node.requestable("nvidia.com/gpu") == 8


def test_mig_single_devices() -> None:
    node = gfd_node("mig", ("NVIDIA-A100-SXM4-40GB-MIG-3g.20gb", 20096), 4)
    node["metadata"]["labels"]["nvidia.com/mig.strategy"] = "single"
    (inv,) = build_inventory([node]).nodes
    assert inv.sharing == "mig-single"
    assert [(d.kind, d.memory_bytes // MiB) for d in inv.devices] == [("mig", 20096)] * 4


def test_mig_mixed_profiles_and_full_gpus() -> None:
    node = gfd_node("mixed", A100_80, 1, allocatable=1)
    labels = node["metadata"]["labels"]
    labels.update({
        "nvidia.com/mig.strategy": "mixed",
        "nvidia.com/mig-3g.40gb.count": "2",
        "nvidia.com/mig-3g.40gb.memory": "40192",
        "nvidia.com/mig-1g.10gb.count": "3",
        "nvidia.com/mig-1g.10gb.memory": "9856",
    })
    node["status"]["allocatable"].update({"nvidia.com/mig-3g.40gb": "2", "nvidia.com/mig-1g.10gb": "3"})
    (inv,) = build_inventory([node]).nodes
    assert inv.sharing == "mig-mixed"
    kinds = [(d.kind, d.resource, d.memory_bytes // MiB) for d in inv.devices]
    assert kinds == [
        *[("mig", "nvidia.com/mig-1g.10gb", 9856)] * 3,
        *[("mig", "nvidia.com/mig-3g.40gb", 40192)] * 2,
        ("gpu", "nvidia.com/gpu", 81920),
    ]
    assert inv.requestable("nvidia.com/mig-3g.40gb") == 2


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda n: n["metadata"]["labels"].pop("nvidia.com/gpu.memory"),
         "label nvidia.com/gpu.memory is missing"),
        (lambda n: n["metadata"]["labels"].update({"nvidia.com/gpu.memory": "80GB"}),
         "label nvidia.com/gpu.memory='80GB' is not an integer"),
        (lambda n: (n["metadata"]["labels"].update({"nvidia.com/gpu.count": "eight"}),
                    n["status"]["allocatable"].pop("nvidia.com/gpu")),
         "label nvidia.com/gpu.count='eight' is not an integer"),
        (lambda n: n["metadata"]["labels"].update({"nvidia.com/gpu.replicas": "-1"}),
         "label nvidia.com/gpu.replicas='-1' must be >= 0"),
        (lambda n: n["metadata"]["labels"].update({"nvidia.com/gpu.replicas": "4",
                                                   "nvidia.com/gpu.sharing-strategy": "magic"}),
         "label nvidia.com/gpu.sharing-strategy='magic' is not none, time-slicing or mps"),
        (lambda n: n["status"]["allocatable"].update({"nvidia.com/gpu": "lots"}),
         "allocatable nvidia.com/gpu='lots' is not a count"),
    ],
)
def test_malformed_labels_skip_the_node_with_a_warning(mutate, expected) -> None:
    bad = gfd_node("gpu-bad", L4, 4)
    mutate(bad)
    inv = build_inventory([bad, gfd_node("gpu-good", L4, 4)])
    assert [n.name for n in inv.nodes] == ["gpu-good"]
    assert len(inv.warnings) == 1
    assert "node gpu-bad" in inv.warnings[0] and expected in inv.warnings[0]


def test_count_falls_back_to_allocatable() -> None:
    (node,) = build_inventory([gfd_node("a", L4, 4, drop=("nvidia.com/gpu.count",))]).nodes
    assert len(node.devices) == 4


def test_cpu_nodes_and_junk_are_skipped_without_crashing() -> None:
    cpu = {"kind": "Node", "metadata": {"name": "cpu-0", "labels": {"kubernetes.io/os": "linux"}},
           "status": {"allocatable": {"cpu": "8"}}}
    junk = ["not a node", 42, None, {"kind": "Pod", "metadata": {"name": "p"}},
            {"kind": "Node", "metadata": {}},
            {"kind": "Node", "metadata": {"name": "weird", "labels": "x"}, "spec": [], "status": 3}]
    inv = build_inventory([cpu, *junk, gfd_node("gpu", L4, 1)])
    assert [n.name for n in inv.nodes] == ["gpu"]
    assert not any("cpu-0" in w for w in inv.warnings)  # not a GPU node: not worth a warning
    assert any("not a Node" in w for w in inv.warnings)
    assert any("without metadata.name" in w for w in inv.warnings)


def test_duplicate_node_names_keep_one_whatever_the_order() -> None:
    a, b = gfd_node("dup", L4, 1), gfd_node("dup", L4, 2)
    first, second = build_inventory([a, b]), build_inventory([b, a])
    assert len(first.nodes) == len(second.nodes) == 1
    assert len(first.nodes[0].devices) == len(second.nodes[0].devices)
    assert any("listed 2 times" in w for w in first.warnings)


def test_readiness_cordon_selector_and_taints() -> None:
    nodes = build_inventory([
        gfd_node("down", ready=False),
        gfd_node("cordoned", unschedulable=True),
        gfd_node("tainted", taints=[{"key": "dedicated", "value": "infer", "effect": "NoSchedule"}]),
        gfd_node("soft", labels={"pool": "a"},
                 taints=[{"key": "x", "value": "", "effect": "PreferNoSchedule"}]),
    ]).by_name()
    assert admits(nodes["down"], {}, []) == "not Ready"
    assert admits(nodes["cordoned"], {}, []) == "cordoned"
    assert admits(nodes["tainted"], {}, []) == "taint dedicated=infer:NoSchedule not tolerated"
    assert admits(nodes["tainted"], {}, [{"key": "dedicated", "operator": "Equal", "value": "infer"}]) == ""
    assert admits(nodes["soft"], {}, []) == ""  # PreferNoSchedule does not exclude
    assert admits(nodes["soft"], {"pool": "b"}, []) == "nodeSelector pool=b does not match"
    assert admits(nodes["soft"], {"pool": "a"}, []) == ""


@pytest.mark.parametrize(
    ("toleration", "ok"),
    [
        ({"operator": "Exists"}, True),  # empty key + Exists tolerates everything
        ({"key": "k", "operator": "Exists"}, True),
        ({"key": "k", "value": "v"}, True),  # Equal is the default operator
        ({"key": "k", "value": "w"}, False),
        ({"key": "k", "value": "v", "effect": "NoExecute"}, False),
        ({"key": "k", "value": "v", "effect": "NoSchedule"}, True),
        ({"key": "other", "operator": "Exists"}, False),
        ({"value": "v"}, False),  # empty key needs Exists
    ],
)
def test_toleration_rules(toleration, ok) -> None:
    assert tolerates(Taint("k", "v", "NoSchedule"), [toleration]) is ok


def test_reservations_of_running_pods_are_subtracted() -> None:
    nodes = [gfd_node("x", L4, 4), gfd_node("ts", L4, 1, replicas=4)]
    pods = [
        kubevram_pod("a-0", "a", "x", {0: 20 * 2**30}),
        kubevram_pod("b-0", "b", "ts", {0: 5 * 2**30}, sharing="shared"),
        kubevram_pod("b-1", "b", "ts", {0: 3 * 2**30}, sharing="shared"),
        kubevram_pod("done", "c", "x", {1: 1}, phase="Succeeded"),
        other_pod("training", "x", 2),
    ]
    inv = build_inventory(nodes, pods).by_name()
    x, ts = inv["x"], inv["ts"]
    assert x.held_whole == {0} and x.free_bytes(0) == 0 and x.free_bytes(1) == 23034 * MiB
    assert x.requestable("nvidia.com/gpu") == 4 - 1 - 2  # one reserved, two taken by another pod
    assert ts.committed == {0: 8 * 2**30} and ts.slots_used == {0: 2}
    assert ts.free_bytes(0) == 23034 * MiB - 8 * 2**30
    assert ts.requestable("nvidia.com/gpu") == 2


def test_pods_of_replanned_deployments_do_not_count() -> None:
    pods = [kubevram_pod("a-0", "a", "x", {0: 1}), kubevram_pod("b-0", "b", "x", {1: 1}),
            kubevram_pod("a-0", "a", "x", {2: 1}, namespace="other")]
    (x,) = build_inventory([gfd_node("x", L4, 4)], pods, replanned=[("default", "a")]).nodes
    assert x.held_whole == {1, 2}


def test_reservation_node_falls_back_to_the_annotation_and_bad_annotations_warn() -> None:
    unbound = kubevram_pod("a-0", "a", "x", {3: 1}, bound=False)
    bad = kubevram_pod("b-0", "b", "x", {0: 1})
    bad["metadata"]["annotations"]["llm.kubevram.io/reservation"] = "{not json"
    off = kubevram_pod("c-0", "c", "x", {9: 1})
    inv = build_inventory([gfd_node("x", L4, 4)], [unbound, bad, off])
    assert inv.nodes[0].held_whole == {3}
    assert any("default/b-0" in w and "malformed" in w for w in inv.warnings)
    assert any("default/c-0" in w and "GPU 9" in w for w in inv.warnings)


def test_input_is_not_modified() -> None:
    nodes = [gfd_node("x", L4, 4)]
    pods = [kubevram_pod("a-0", "a", "x", {0: 1})]
    before = copy.deepcopy((nodes, pods))
    build_inventory(nodes, pods)
    assert (nodes, pods) == before


def test_sample_cluster_is_clean() -> None:
    doc = yaml.safe_load(sample_cluster_text())
    inv = build_inventory(doc["items"])
    assert inv.warnings == []
    assert [n.name for n in inv.nodes] == [
        "gpu-a100-0", "gpu-a100-1", "gpu-h100-0", "gpu-l4-0", "gpu-l4-1", "gpu-l4-shared-0"
    ]
    assert inv.by_name()["gpu-l4-shared-0"].shares
