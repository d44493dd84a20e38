"""One replica over several pods (a LeaderWorkerSet group): who this process is, the rendezvous, the
leader's broadcast of each step, and the watch that turns a lost rank into a failed engine.

LeaderWorkerSet starts every pod of a group with three variables: ``LWS_LEADER_ADDRESS`` (the leader
pod's address), ``LWS_GROUP_SIZE`` (pods) and ``LWS_WORKER_INDEX`` (0: the leader). The plan file
(``WorkerPlan.group``) says the rest: GPUs per pod, tensor-parallel and pipeline sizes, each stage's
layers, the rendezvous port. One process per GPU: the pod's ``kubevram worker`` process is its local
rank 0 and starts the others (:func:`start_local_ranks`); rank = pod x GPUs per pod + local rank, as
transformers' device mesh ``(pp, tp)`` numbers them.

**Control.** Rank 0 admits requests; every rank steps through the same batch. Before each step rank 0
broadcasts what it runs (the requests it takes from its queue), after each sampling what it drew (and
which rows were cancelled or failed meanwhile): :meth:`Group.share`, a ``broadcast_object_list`` over a
gloo group of its own (CPU, whatever carries the model's tensors), with no timeout to speak of, since
the followers wait on it while the leader idles.

**Health.** Each rank but 0 keeps one TCP connection to the leader (``port + 1``); a process that dies,
however it dies, closes it, and the leader's watch (:meth:`Group.watch`) fails the engine at once: the
requests in flight and every new one are answered 503 and ``/readyz`` turns 503. A rank that sees the
leader's connection close does the same, and its ``kubevram worker`` process ends with status 1, so its
pod restarts and LeaderWorkerSet recreates the group (``RecreateGroupOnPodRestart``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import os
import select
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.api.workerplan import GroupPlan

log = logging.getLogger(__name__)

LEADER_ADDRESS, GROUP_SIZE, WORKER_INDEX = "LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"
#: How long the ranks wait for each other to join (every pod of a group pulls its image and starts).
JOIN_TIMEOUT = datetime.timedelta(minutes=30)
#: The control group's timeout: followers wait on it for as long as the leader has nothing to do.
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Member:
    """This process's place in the group."""

    pod: int
    local: int
    plan: GroupPlan
    leader: str  # the leader pod's address

    @property
    def rank(self) -> int:
        return self.pod * self.plan.gpusPerPod + self.local

    @property
    def world(self) -> int:
        return self.plan.worldSize

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def stage(self) -> int:
        return self.rank // self.plan.tensorParallel

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world} (pod {self.pod}, GPU {self.local}, stage {self.stage})"


def member_from_env(plan: GroupPlan, env: Mapping[str, str] | None = None, local: int = 0) -> Member:
    """This pod's member from LeaderWorkerSet's variables; ``SpecError`` names a variable that is
    missing or disagrees with the plan."""
    env = os.environ if env is None else env
    values: dict[str, str] = {}
    for name in (LEADER_ADDRESS, GROUP_SIZE, WORKER_INDEX):
        value = env.get(name)
        if not value:
            raise SpecError(name, "is not set: a pod of a multi-node group runs under a LeaderWorkerSet, "
                            "which sets LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX")
        values[name] = value
    try:
        size, index = int(values[GROUP_SIZE]), int(values[WORKER_INDEX])
    except ValueError:
        raise SpecError(GROUP_SIZE, f"{values[GROUP_SIZE]!r} and {WORKER_INDEX} {values[WORKER_INDEX]!r} "
                        "must be integers") from None
    if size != plan.size:
        raise SpecError(GROUP_SIZE, f"{size} but the plan's group has {plan.size} pods")
    if not 0 <= index < size:
        raise SpecError(WORKER_INDEX, f"{index} is not a pod of a group of {size}")
    return Member(index, local, plan, values[LEADER_ADDRESS])


class Group:
    """The process group of one replica: rendezvous, control broadcasts, the lost-rank watch."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self._control: Any = None
        self._listener: socket.socket | None = None
        self._links: dict[int, socket.socket] = {}  # leader: rank -> connection; others: {0: leader}
        self.lost: str | None = None
        self._on_lost: list[Callable[[str], None]] = []

    @property
    def rank(self) -> int:
        return self.member.rank

    # ---- joining --------------------------------------------------------------------------------

    def join(self) -> None:
        """Rendezvous with every rank (torch.distributed on the leader's port), then link to the leader."""
        import torch
        import torch.distributed as dist

        m = self.member
        port = m.plan.port
        os.environ["LOCAL_RANK"] = str(m.local)  # what transformers binds the device by
        if m.is_leader:
            self._listen(port + 1)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        log.info("%s: joining the group at %s:%d (%s)", m.describe(), m.leader, port, backend)
        dist.init_process_group(
            backend, init_method=f"tcp://{m.leader}:{port}", rank=m.rank, world_size=m.world,
            timeout=JOIN_TIMEOUT,
        )
        self._control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        if m.is_leader:
            self._accept(m.world - 1)
        else:
            self._connect(m.leader, port + 1)
        log.info("%s: joined", m.describe())

    def _listen(self, port: int) -> None:
        listener = socket.create_server(("", port), reuse_port=False)
        listener.settimeout(JOIN_TIMEOUT.total_seconds())
        self._listener = listener

    def _accept(self, count: int) -> None:
        assert self._listener is not None
        while len(self._links) < count:
            conn, _ = self._listener.accept()
            rank = int.from_bytes(_read(conn, 4), "big")
            self._links[rank] = conn

    def _connect(self, address: str, port: int) -> None:
        conn = socket.create_connection((address, port), timeout=JOIN_TIMEOUT.total_seconds())
        conn.sendall(self.rank.to_bytes(4, "big"))
        self._links[0] = conn

    # ---- control ----------------------------------------------------------------------------------

    def share(self, value: Any = None) -> Any:
        """Rank 0's ``value`` on every rank (the others pass nothing and get it)."""
        import torch.distributed as dist

        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, by rank, on rank 0 (None elsewhere)."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.member.world if self.rank == 0 else None
        dist.gather_object(value, out, dst=0, group=self._control)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self._control)

    # ---- health -----------------------------------------------------------------------------------

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call ``on_lost(why)`` once, from a thread, when a linked rank's process is gone (the leader
        watches every rank, the others the leader)."""
        self._on_lost.append(on_lost)
        thread = threading.Thread(target=self._watch, name="kubevram-group-watch", daemon=True)
        thread.start()

    def _watch(self) -> None:
        links = {conn: rank for rank, conn in self._links.items()}
        while links:
            readable, _, _ = select.select(list(links), [], [], 1.0)
            for conn in readable:
                try:
                    data = conn.recv(1)
                except OSError:
                    data = b""
                if not data:
                    rank = links.pop(conn)
                    pod = rank // self.member.plan.gpusPerPod
                    who = "the leader (rank 0)" if rank == 0 else f"rank {rank} (pod {pod})"
                    self.fail(f"{who} of the multi-node group is gone")
                    return

    def fail(self, why: str) -> None:
        """The group cannot step any more: say so once to whoever watches."""
        if self.lost is not None:
            return
        self.lost = why
        log.error("%s: %s", self.member.describe(), why)
        for callback in self._on_lost:
            callback(why)

    def close(self) -> None:
        for conn in self._links.values():
            with contextlib.suppress(OSError):
                conn.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed before it said its rank")
        data += chunk
    return data


# ------------------------------------------------------------------------------ local ranks


def start_local_ranks(
    model_id: str, plan_path: str, count: int, on_exit: Callable[[str], None]
) -> list[multiprocessing.process.BaseProcess]:
    """Start local ranks ``1..count-1`` of this pod (one process per GPU); ``on_exit(why)`` when one
    ends, whatever the reason."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    for local in range(1, count):
        name = f"kubevram-rank-{local}"
        proc = ctx.Process(target=local_rank_main, args=(model_id, plan_path, local), name=name)
        proc.start()
        procs.append(proc)

    def watch() -> None:
        from multiprocessing.connection import wait

        sentinels: dict[Any, multiprocessing.process.BaseProcess] = {p.sentinel: p for p in procs}
        while sentinels:
            for ready in wait(list(sentinels)):
                proc = sentinels.pop(ready)
                on_exit(f"local rank {proc.name.rsplit('-', 1)[-1]} ended (exit status {proc.exitcode})")
                return

    if procs:
        threading.Thread(target=watch, name="kubevram-local-ranks", daemon=True).start()
    return procs


def local_rank_main(model_id: str, plan_path: str, local: int) -> None:
    """A local rank other than 0: load its share of the model and step with the group until the leader
    stops it or goes; exit status 0 then, 1 if the group was lost."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kubevram.api.workerplan import WorkerPlan
    from kubevram.worker.engine import Engine
    from kubevram.worker.loader import load

    plan = WorkerPlan.from_file(plan_path)
    assert plan.group is not None
    group = Group(member_from_env(plan.group, local=local))
    group.join()
    loaded = load(model_id, plan, plan.generation.chinese, group=group)
    group.barrier()  # every rank has its share (as the pod's own process waits for)
    engine = Engine(
        loaded.model, loaded.tokenizer, max_batch_size=plan.serving.maxBatchSize,
        max_sequence_length=plan.serving.maxSequenceLength, token_classes=loaded.token_classes,
        eos_token_ids=loaded.eos_token_ids, group=group,
    )
    engine.run_follower()
    os._exit(1 if group.lost or engine.failure else 0)


__all__ = ["GROUP_SIZE", "LEADER_ADDRESS", "WORKER_INDEX", "Group", "Member", "member_from_env",
           "start_local_ranks"]
