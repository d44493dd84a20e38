"""The placement ledger: its states, and a property over any interleaving of concurrent reconciliations.

The property drives the ledger exactly as ``Reconciler._plan_and_apply`` does (read the API outside
the lock; observe, snapshot, plan with the real planner and reserve inside ``deciding()``; write the
children; confirm, or abort when the write failed part-way), with the API's workloads as plain data
that changes only when a write lands. Hypothesis chooses which reconciliation advances when, and
mixes in scales, spec changes, deletions and nodes that come, go or are cordoned.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubevram_emulator import gpu_node

from kubevram.api.load import parse_deployment
from kubevram.controller.ledger import (
    APPLIED,
    ASSUMED,
    OBSERVED,
    Ledger,
    NotDeciding,
    reservations_of,
)
from kubevram.controller.reconcile import Reconciler, Settings
from kubevram.planner.inventory import Reservation, build_inventory

Key = tuple[str, str]


def reservation(owner: str, node: str, gpus: dict[int, int], sharing: str = "exclusive") -> Reservation:
    return Reservation.of("ai", owner, node, gpus, sharing)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


# ------------------------------------------------------------------------------------- the states


def test_an_assumed_decision_survives_older_and_newer_reads_until_confirmed() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    a = ("ai", "a")
    held = [reservation("a", "n0", {0: 1})]
    before = clock()  # a read that started before the decision
    with ledger.deciding():
        ledger.reserve(a, held)
    ledger.observe({}, before)
    ledger.observe({}, clock())  # even a newer read: the children are still being written
    assert ledger.snapshot() == held and ledger.stats()[ASSUMED]["deployments"] == 1

    ledger.confirm(a)
    ledger.observe({}, before)  # a read older than the writes cannot know them
    assert ledger.snapshot() == held and ledger.stats()[APPLIED]["reservations"] == 1
    ledger.observe({a: held}, clock())  # the API shows them: observed from now on
    assert ledger.snapshot() == held and ledger.stats()[OBSERVED]["deployments"] == 1
    ledger.observe({}, clock())  # someone deleted the workloads: the API wins
    assert ledger.snapshot() == []


def test_abort_holds_both_until_the_api_is_read_again() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    a = ("ai", "a")
    old = [reservation("a", "n0", {0: 100}, "shared")] * 2  # two equal slices are two reservations
    new = [reservation("a", "n1", {0: 100}, "shared")] * 2
    ledger.observe({a: old}, clock())
    with ledger.deciding():
        ledger.reserve(a, new)
    ledger.abort(a)
    assert Counter(ledger.snapshot()) == Counter(old + new)
    ledger.observe({a: [new[0], *old]}, clock())  # what the failed write left
    assert Counter(ledger.snapshot()) == Counter([new[0], *old])


def test_a_scale_down_holds_what_it_frees_until_its_deletes_are_written() -> None:
    """Found by the property below: a scale-down decided (nothing held any more) while its workload still
    runs must not hand that GPU to a deployment whose write lands before the delete does."""
    clock = Clock()
    ledger = Ledger(clock)
    small, seven = ("ai", "small"), ("ai", "seven")
    held = [reservation("small", "l4-a", {0: 1})]
    ledger.observe({small: held}, clock())
    with ledger.deciding():
        ledger.reserve(small, [])  # scaled to 0: its workload is being deleted
        assert ledger.snapshot(exclude=[seven]) == held  # another decision now still sees it taken
    ledger.confirm(small)  # the delete is written
    assert ledger.snapshot() == []


def test_forget_is_not_undone_by_an_older_read() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    a = ("ai", "a")
    held = [reservation("a", "n0", {0: 1})]
    ledger.observe({a: held}, clock())
    stale = clock()
    ledger.forget(a)
    ledger.observe({a: held}, stale)
    assert ledger.snapshot() == [] and ledger.holders("n0") == set()
    ledger.observe({a: held}, clock())  # recreated meanwhile: a newer read shows it
    assert ledger.holders("n0") == {a}


def test_reserve_outside_deciding_is_refused() -> None:
    with pytest.raises(NotDeciding, match="ai/a"):
        Ledger().reserve(("ai", "a"), [])


# ----------------------------------------------------------------------------------- the property

SPECS: dict[str, dict[str, Any]] = {
    "small": {"model": {"id": "Qwen/Qwen2-0.5B-Instruct"}},
    "seven": {"model": {"id": "Qwen/Qwen2-7B-Instruct"}},
    "shared": {"model": {"id": "Qwen/Qwen2-0.5B-Instruct"}, "placement": {"sharing": "shared"}},
    "two-gpu": {"model": {"id": "Qwen/Qwen2-7B-Instruct"}, "placement": {"gpusPerReplica": 2}},
}
NAMES = sorted(SPECS)


def nodes_of(present: dict[str, bool]) -> list[dict[str, Any]]:
    """The cluster's GPU nodes now: name -> cordoned, for those present."""
    shapes = {
        "l4-a": gpu_node("l4-a", gpus=4, memory_mib=23034, product="NVIDIA-L4"),
        "l4-b": gpu_node("l4-b", gpus=2, memory_mib=23034, product="NVIDIA-L4"),
        "a100": gpu_node("a100", gpus=2),
        "sliced": gpu_node(
            "sliced", gpus=2, memory_mib=23034, product="NVIDIA-L4-SHARED",
            labels={"nvidia.com/gpu.replicas": "4", "nvidia.com/gpu.sharing-strategy": "time-slicing"},
        ),
    }
    shapes["sliced"]["status"]["allocatable"]["nvidia.com/gpu"] = "8"
    out = []
    for name, cordoned in sorted(present.items()):
        node = shapes[name]
        if cordoned:
            node = {**node, "spec": {"unschedulable": True}}
        out.append(node)
    return out


ALL_NODES = ("a100", "l4-a", "l4-b", "sliced")


def assert_no_gpu_overbooked(reservations: list[Reservation], where: str) -> None:
    """Per node GPU: one exclusive holder, or shared slices within its memory and time-slices."""
    inventory = {n.name: n for n in build_inventory(nodes_of(dict.fromkeys(ALL_NODES, False))).nodes}
    exclusive: Counter[tuple[str, int]] = Counter()
    sliced: dict[tuple[str, int], list[int]] = defaultdict(list)
    for r in reservations:
        for index, nbytes in r.gpus:
            if r.sharing == "shared" and inventory[r.node].devices[index].kind == "timeslice":
                sliced[(r.node, index)].append(nbytes)
            else:
                exclusive[(r.node, index)] += 1
    twice = {gpu: n for gpu, n in exclusive.items() if n > 1 or gpu in sliced}
    assert not twice, f"{where}: exclusive GPUs given twice: {twice}"
    for (node, index), slices in sliced.items():
        device = inventory[node].devices[index]
        assert sum(slices) <= device.memory_bytes, f"{where}: {node} GPU {index} over its memory: {slices}"
        assert len(slices) <= device.slots, f"{where}: {node} GPU {index}: {len(slices)} slices"


class Model:
    """The API as data, the real ledger and planner, reconciliations as resumable steps."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.ledger = Ledger(self.clock)
        self.reconciler = Reconciler(None, Settings(), ledger=self.ledger)  # type: ignore[arg-type]
        self.api: dict[Key, list[Reservation]] = {}  # the workloads' reservations, per deployment
        self.plans: dict[Key, tuple[str, dict[str, Any]]] = {}  # the plan ConfigMaps: (input, plan)
        self.present: dict[str, bool] = {"l4-a": False, "sliced": False}
        self.flight: dict[Key, dict[str, Any]] = {}  # one reconciliation per deployment (its lock)

    def start(self, name: str, replicas: int, precision: str) -> None:
        key = ("ai", name)
        if key in self.flight:
            return
        spec = {**SPECS[name], "replicas": replicas, "precision": {"weights": precision}}
        deployment = parse_deployment(
            {"apiVersion": "llm.kubevram.io/v1alpha1", "kind": "LLMDeployment",
             "metadata": {"name": name, "namespace": "ai"}, "spec": spec}
        )
        # The reads, outside the lock: they may be stale by the time the decision is made.
        self.flight[key] = {
            "deployment": deployment,
            "input": precision,
            "read_started": self.clock(),
            "view": {k: list(v) for k, v in self.api.items()},
            "nodes": nodes_of(self.present),
            "previous": self.plans.get(key),
            "stage": "read",
        }

    def advance(self, index: int, fail: bool) -> None:
        if not self.flight:
            return
        key = sorted(self.flight)[index % len(self.flight)]
        job = self.flight[key]
        if job["stage"] == "read":
            with self.ledger.deciding():
                self.ledger.observe(job["view"], job["read_started"])
                previous = job["previous"]
                plan, _, _ = self.reconciler._plan(
                    job["deployment"], None, job["nodes"], [], self.ledger.snapshot(exclude=[key]),
                    previous[1] if previous and previous[0] == job["input"] else None,
                )
                decided = reservations_of(key, plan, str(job["deployment"].spec.placement.sharing))
                self.ledger.reserve(key, decided)
            job.update(stage="decided", plan=plan, decided=decided)
            return
        del self.flight[key]
        if fail and not self.api.get(key):
            # The write failed part-way: some of the new workloads exist, the status is not written.
            self.api[key] = job["decided"][: len(job["decided"]) // 2]
            self.ledger.abort(key)
            return
        self.api[key] = job["decided"]  # new workloads created, those of the old plan deleted
        self.plans[key] = (job["input"], job["plan"])
        self.ledger.confirm(key)

    def delete(self, name: str) -> None:
        key = ("ai", name)
        if key in self.flight:
            return  # the deletion waits for the deployment's lock
        self.api.pop(key, None)
        self.plans.pop(key, None)
        self.ledger.forget(key)

    def node(self, name: str, action: str) -> None:
        if action == "remove":
            self.present.pop(name, None)
        elif action == "add":
            self.present.setdefault(name, False)
        elif name in self.present:
            self.present[name] = action == "cordon"

    def check(self, where: str) -> None:
        assert_no_gpu_overbooked(list(itertools.chain.from_iterable(self.api.values())), f"API {where}")
        assert_no_gpu_overbooked(self.ledger.snapshot(), f"ledger {where}")


OPS = st.one_of(
    st.tuples(
        st.just("start"), st.sampled_from(NAMES), st.integers(0, 4), st.sampled_from(["bfloat16", "int8"])
    ),
    st.tuples(st.just("advance"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("advance"), st.integers(0, 7), st.just(False)),
    st.tuples(st.just("delete"), st.sampled_from(NAMES)),
    st.tuples(
        st.just("node"), st.sampled_from(ALL_NODES), st.sampled_from(["add", "remove", "cordon", "uncordon"])
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=40))
def test_no_interleaving_overbooks_a_gpu(ops: list[tuple[Any, ...]]) -> None:
    model = Model()
    for step, op in enumerate(ops):
        getattr(model, op[0])(*op[1:])
        model.check(f"after step {step} {op}")
    while model.flight:  # let every reconciliation finish
        model.advance(0, False)
        model.check("at the end")
