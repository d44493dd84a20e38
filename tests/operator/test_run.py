"""``kubevram operator`` as a process: no cluster is one line and exit 2; with several replicas
(``--leader-elect``) only the one holding the Lease plans. The Lease is exercised over HTTP against
the emulator, which answers a stale ``resourceVersion`` with 409 as the API server does."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubevram_emulator import EmulatedCluster, gpu_node
from test_operator import L4, condition, llmd

from kubevram.controller.adapter import Cluster, api_client
from kubevram.controller.leader import LeaderElector, LeaseLock

LEASE = "/apis/coordination.k8s.io/v1/namespaces/default/leases/kubevram-operator"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def candidate(identity: str, clock: Clock) -> LeaseLock:
    cluster = Cluster(api_client())
    return LeaseLock(cluster, "default", "kubevram-operator", identity, duration=15, clock=clock)


def test_one_candidate_leads_until_it_stops_renewing_or_releases(cluster: EmulatedCluster) -> None:
    clock = Clock()
    a, b = candidate("a", clock), candidate("b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # held, and renewed just now
    clock.now = 10
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()  # renewals keep it
    clock.now = 24  # b saw the record change at 10: 14 s without a renewal is not yet 15
    assert not b.try_acquire_or_renew()
    clock.now = 26  # a stopped renewing 16 s ago (b's own clock): b takes over
    assert b.try_acquire_or_renew()
    lease = cluster.get(LEASE)
    assert lease is not None
    assert (lease["spec"]["holderIdentity"], lease["spec"]["leaseTransitions"]) == ("b", 1)
    assert not a.try_acquire_or_renew()  # a sees b's fresh record: it has lost the Lease
    b.release()
    assert a.try_acquire_or_renew()  # released: no need to wait it out
    assert cluster.get(LEASE)["spec"]["holderIdentity"] == "a"  # type: ignore[index]


def test_of_two_writes_from_the_same_read_one_loses(cluster: EmulatedCluster) -> None:
    clock = Clock()
    assert candidate("a", clock).try_acquire_or_renew()
    stale = cluster.get(LEASE)
    assert stale is not None
    clock.now = 100  # both b and c saw the record at 0: for both it has expired
    b, c = candidate("b", clock), candidate("c", clock)
    b._observed = c._observed = ("a", stale["spec"]["renewTime"], 0)
    assert b.try_acquire_or_renew()
    # c writes with the resourceVersion it read before b's write: 409, it does not lead.
    cluster_get = c.cluster._get
    c.cluster._get = lambda path: stale  # type: ignore[method-assign]
    try:
        assert not c.try_acquire_or_renew()
    finally:
        c.cluster._get = cluster_get  # type: ignore[method-assign]
    assert cluster.get(LEASE)["spec"]["holderIdentity"] == "b"  # type: ignore[index]


def partition(cluster: EmulatedCluster, first_only: bool = False) -> asyncio.Event:
    """Reads of the Lease get no answer (every one, or only the first) until the event returned is set
    (in the emulator's loop: ``cluster.call(answer.set)``); then a 503."""
    answer = asyncio.Event()

    async def hang() -> int:
        await answer.wait()
        return 503

    def cut() -> None:
        assert cluster.emulator is not None
        leases = cluster.emulator["get", kmock.resource("coordination.k8s.io/v1/leases")]
        (leases[:1] if first_only else leases) << hang

    cluster.call(cut)
    return answer


def test_a_leader_whose_api_server_stops_answering_gives_up_by_the_renew_deadline(
    cluster: EmulatedCluster,
) -> None:
    """A partition: the renewal's request hangs instead of failing. The leader must still stop by its
    renew deadline, before a standby takes the Lease over (``leaseDurationSeconds`` later)."""
    import threading

    elector = LeaderElector(candidate("a", Clock()), retry=0.1, renew_deadline=1.0)
    assert elector.acquire(threading.Event())
    answer = partition(cluster)
    lost = threading.Event()
    elector.keep(lost.set)
    try:
        cluster.wait_for("the leader to give the Lease up", lost.is_set, timeout=15)
    finally:
        cluster.call(answer.set)
        elector.stop(release=False)


def test_a_candidate_whose_first_request_never_comes_back_still_takes_the_free_lease(
    cluster: EmulatedCluster,
) -> None:
    """A read of the Lease lost in a partition (no answer, no error) must not keep a standby from leading
    once the API server answers again."""
    import threading

    answer = partition(cluster, first_only=True)
    elector = LeaderElector(candidate("a", Clock()), retry=0.1, renew_deadline=1.0)
    stop, leads = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: elector.acquire(stop) and leads.set(), daemon=True)
    thread.start()
    try:
        cluster.wait_for("the candidate to lead", leads.is_set, timeout=15)
    finally:
        stop.set()
        cluster.call(answer.set)
        thread.join(10)


def operator_process(kubeconfig: Path | str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kubevram.cli", "operator", *args],
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "KUBEVRAM_OPERATOR_NAMESPACE": "default"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_standby_replica_plans_nothing_until_the_lease_is_free(cluster: EmulatedCluster) -> None:
    cluster.add_node(gpu_node("gpu-l4-0", **L4))
    # Another replica leads: it renewed just now and lets the Lease go after 3 s without renewals.
    cluster.create("/apis/coordination.k8s.io/v1/namespaces/default/leases", {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "kubevram-operator"},
        "spec": {"holderIdentity": "kubevram-7c9d-other", "leaseDurationSeconds": 3,
                 "renewTime": "2026-11-26T10:00:00.000000Z", "leaseTransitions": 4},
    })
    cluster.create_llmd(llmd(replicas=1))
    process = operator_process(cluster.kubeconfig, "--leader-elect", "--liveness", "http://127.0.0.1:18099/healthz")
    try:
        health = cluster.wait_for("the standby's liveness endpoint", lambda: _get("http://127.0.0.1:18099/healthz"))
        assert health == b'{"standby": true}'
        assert condition(cluster.llmd("qwen"), "Planned") == {}  # the standby plans nothing
        # The other replica is gone (no renewal for 3 s): this one takes the Lease and plans.
        try:
            cluster.wait_for(
                "the new leader to plan",
                lambda: condition(cluster.llmd("qwen"), "Scheduled").get("status") == "True",
                timeout=40,
            )
        except AssertionError as exc:  # seen once under a load average of 7: keep what the process said
            process.kill()
            raise AssertionError(f"{exc}; lease: {cluster.get(LEASE)}; operator log: "
                                 f"{process.communicate(timeout=30)[1][-4000:]}") from None
        lease = cluster.get(LEASE)
        assert lease is not None and lease["spec"]["leaseTransitions"] == 5
        assert lease["spec"]["holderIdentity"] != "kubevram-7c9d-other"
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-3000:]
    assert "standing by: lease default/kubevram-operator is held by another replica" in stderr
    assert cluster.get(LEASE)["spec"].get("holderIdentity") is None  # type: ignore[index]  # released


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bytes(response.read())
    except OSError:
        return None


@pytest.mark.parametrize(
    ("kubeconfig", "message"),
    [
        ("/nonexistent/kubeconfig", "kubevram operator: no cluster: not running in a pod, and no usable "
                                    "kubeconfig at /nonexistent/kubeconfig"),
        ("unreachable", "kubevram operator: cannot reach the cluster at https://127.0.0.1:9 (from "),
    ],
    ids=["no-kubeconfig", "unreachable"],
)
def test_no_cluster_is_one_line_and_exit_2(tmp_path: Path, kubeconfig: str, message: str) -> None:
    if kubeconfig == "unreachable":
        path = tmp_path / "kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
            "clusters: [{name: x, cluster: {server: 'https://127.0.0.1:9'}}]\n"
            "users: [{name: x, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: x, user: x}}]\n",
            encoding="utf-8",
        )
        kubeconfig = str(path)
    process = operator_process(kubeconfig)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out: Any = process.communicate()
        pytest.fail(f"still running after 60 s: {out[1][-2000:]}")
    assert process.returncode == 2, stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), stderr
