"""A Kubernetes API over HTTP for the operator tests and the benchmark: kmock's emulator, mended.

kmock's ``KubernetesEmulator`` keeps objects in memory and serves list, watch, get, create,
merge-patch and delete over real HTTP. The operator talks to it exactly as to a cluster: kopf's
watches and the ``kubernetes`` client both read the kubeconfig this module writes.

It runs in its own thread and event loop, so tests stay synchronous and kopf runs in
``kopf.testing.KopfRunner``'s thread, as it would in a pod. What this module adds to kmock 0.8
(the API server's own bookkeeping, which the operator relies on):

* ``metadata.uid``, ``creationTimestamp``, ``resourceVersion`` and a name from ``generateName``
  (events) on create; ``generation`` starting
  at 1 and growing by one on every change of ``spec`` (what ``observedGeneration`` is compared with);
* ``/api/v1/namespaces`` parsed as the Namespace resource (kmock 0.8 fails on it), so kopf can run
  namespaced;
* the discovery of the resources involved (LLMDeployment with its status and scale subresources;
  LeaderWorkerSet when the emulated cluster has it installed);
* a RoleBinding's ``roleRef`` that cannot change (422, as the API server answers);
* optimistic concurrency: a patch that names a ``metadata.resourceVersion`` other than the stored
  one is answered 409 (what the leader election's Lease writes rely on);
* a log ``(method, path, status)`` of the requests the operator made (the tests' own, sent with
  the User-Agent ``kubevram-tests``, stay out of it), and (for the benchmark) forgetting kmock's own request
  history, which kmock matches every new request against.

There is no controller-manager: Deployments get no pods and ownerReferences are not
garbage-collected. Tests read the objects over HTTP, like ``kubectl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
from kmock._internal import enums, parsing
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from kubevram.api.v1alpha1 import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION

LLMD = f"{GROUP}/{VERSION}/{PLURAL}"
TEST_AGENT = "kubevram-tests"
LLMD_PATH = f"/apis/{GROUP}/{VERSION}"


_parse_path = parsing.parse_path


def _mended_parse_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads ``/api/v1/namespaces[/NAME]`` as a namespace with no plural (and fails on the
    list): parse it as the cluster-scoped ``namespaces`` resource, as Kubernetes does."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4):
        return parsing.ParsedPath(
            group="", version="v1", plural="namespaces", name=parts[3] if len(parts) == 4 else None
        )
    return _parse_path(path)


parsing.parse_path = _mended_parse_path


class MendedEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata a real API server fills in."""

    _versions = itertools.count(1000)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        #: Every request served: (method, path, status), for assertions on what the operator did.
        self.log: list[tuple[str, str, int]] = []
        #: The paths of the collections watched (``?watch=true``), which the log does not tell from lists.
        self.watched: set[str] = set()
        #: kmock keeps every request and matches each new one against that history (slices such as
        #: ``[:1]`` count earlier matches), which is quadratic; the benchmark turns this off.
        self.keep_requests = True

    async def _handle(self, request: Any) -> Any:
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None:
            meta = (
                data.setdefault("metadata", {})
                if request.action in (enums.action.CREATE, enums.action.UPDATE)
                else None
            )
            if request.action == enums.action.CREATE and meta is not None:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault(
                    "creationTimestamp", datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                )
                meta["generation"] = 1
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
                if request.namespace and not meta.get("namespace"):
                    meta["namespace"] = request.namespace
            elif request.action == enums.action.UPDATE and meta is not None and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                current_obj = self.objects[key] if key in self.objects else None  # noqa: SIM401 (no .get)
                if (
                    "roleRef" in data and current_obj is not None and not current_obj.deleted
                    and current_obj.get("roleRef") != data["roleRef"]
                ):  # as the API server: a binding's roleRef cannot change
                    method = str(getattr(request.method, "value", request.method)).upper()
                    self.log.append((method, request.url.path, 422))
                    raise kmock.KubernetesError(422, "Invalid", "cannot change roleRef")
                sent = meta.get("resourceVersion")
                if sent and key in self.objects and not self.objects[key].deleted:
                    current = str(self.objects[key].get("metadata", {}).get("resourceVersion"))
                    if sent != current:  # optimistic concurrency, as the API server does it
                        self.log.append(("PATCH", request.url.path, 409))
                        raise kmock.KubernetesError(status=409, reason="Conflict", message=(
                            f"the object has been modified: resourceVersion {sent} is not {current}"))
                if "spec" in data and request.subresource is None and key in self.objects:
                    current = self.objects[key]
                    if not current.deleted and current.get("spec") != _merged(
                        current.get("spec"), data["spec"]
                    ):
                        meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
            if meta is not None:
                meta["resourceVersion"] = str(next(self._versions))
        method = str(getattr(request.method, "value", request.method)).upper()
        if request.headers.get("User-Agent") == TEST_AGENT:  # kubectl's part, played by the tests
            try:
                return await super()._handle(request)
            finally:
                if not self.keep_requests:
                    self._requests.clear()
        if request.url.query.get("watch") in ("true", "1"):
            self.watched.add(request.url.path)
        try:
            response = await super()._handle(request)
        except kmock.KubernetesError as exc:  # 404, 409 raised by the emulator itself
            self.log.append((method, request.url.path, int(exc.status)))
            raise
        finally:
            if not self.keep_requests:
                self._requests.clear()
        self.log.append((method, request.url.path, int(response.status)))
        return response


def _merged(base: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386), to tell whether a patch changes ``spec``."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(base.get(key), value)
    return out


#: Kubernetes' DRA kinds (resource.k8s.io/v1, 1.34+): served unless a test says otherwise.
DRA_RESOURCES = [
    ("resource.k8s.io/v1/resourceslices", "ResourceSlice", False),
    ("resource.k8s.io/v1/resourceclaims", "ResourceClaim", True),
    ("resource.k8s.io/v1/resourceclaimtemplates", "ResourceClaimTemplate", True),
    ("resource.k8s.io/v1/deviceclasses", "DeviceClass", False),
]
#: The Gateway API Inference Extension's InferencePool: served unless a test says otherwise.
INFERENCE_POOL_RESOURCES = [("inference.networking.k8s.io/v1/inferencepools", "InferencePool", True)]


#: LeaderWorkerSet (kubernetes-sigs/lws): served only where a test installs it.
LWS_RESOURCES = [("leaderworkerset.x-k8s.io/v1/leaderworkersets", "LeaderWorkerSet", True)]


def declare_resources(
    emulator: kmock.KubernetesEmulator, *, dra: bool = True, inference_pool: bool = True,
    leader_worker_sets: bool = False,
) -> None:
    """The resources the operator discovers, watches and writes; ``dra``, ``inference_pool`` and
    ``leader_worker_sets`` serve those APIs too (a cluster without them answers 404 to their discovery and
    paths)."""
    info = emulator.resources[LLMD]
    info.kind = KIND
    info.singular = SINGULAR
    info.namespaced = True
    info.shortnames = set(SHORT_NAMES)
    info.verbs = {"list", "watch", "get", "patch", "create", "delete", "update"}
    info.subresources = {"status", "scale"}
    for resource, kind, namespaced in [
        ("v1/nodes", "Node", False),
        ("v1/namespaces", "Namespace", False),
        ("v1/pods", "Pod", True),
        ("v1/configmaps", "ConfigMap", True),
        ("v1/secrets", "Secret", True),
        ("v1/services", "Service", True),
        ("v1/serviceaccounts", "ServiceAccount", True),
        ("v1/events", "Event", True),
        ("apps/v1/deployments", "Deployment", True),
        ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True),
        ("rbac.authorization.k8s.io/v1/roles", "Role", True),
        ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy", True),
        ("coordination.k8s.io/v1/leases", "Lease", True),
        *(DRA_RESOURCES if dra else []),
        *(INFERENCE_POOL_RESOURCES if inference_pool else []),
        *(LWS_RESOURCES if leader_worker_sets else []),
    ]:
        info = emulator.resources[resource]
        info.kind = kind
        info.namespaced = namespaced
        info.verbs = {"list", "watch", "get", "patch", "create", "delete"}


class EmulatedCluster:
    """The emulator on a local port, in a background thread, with a kubeconfig pointing at it."""

    def __init__(
        self, directory: Path, *, keep_requests: bool = True, dra: bool = True, inference_pool: bool = True,
        leader_worker_sets: bool = False,
    ) -> None:
        self.directory = directory
        self.keep_requests = keep_requests
        self.serves = {"dra": dra, "inference_pool": inference_pool, "leader_worker_sets": leader_worker_sets}
        self.kubeconfig = directory / "kubeconfig"
        self.emulator: MendedEmulator | None = None
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._api: k8s_client.ApiClient | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with MendedEmulator() as emulator, kmock.Server(emulator) as server:
            declare_resources(emulator, **self.serves)
            emulator.keep_requests = self.keep_requests
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> EmulatedCluster:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the kmock emulator did not start")
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "kmock",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "kmock", "user": {"token": "kmock"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
                }
            ),
            encoding="utf-8",
        )
        configuration = k8s_client.Configuration()
        configuration.host = self.url
        self._api = k8s_client.ApiClient(configuration)
        self.create(
            "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}
        )
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, coro_fn: Callable[[], Any]) -> Any:
        """Run ``coro_fn()`` in the emulator's loop (to touch kmock's DSL or objects safely)."""

        async def wrapper() -> Any:
            return coro_fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    # ---------------------------------------------------------------------- kubectl over HTTP

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        assert self._api is not None
        headers = {"Accept": "application/json", "User-Agent": TEST_AGENT}
        if body is not None:
            headers["Content-Type"] = content_type
        response = self._api.call_api(method, self.url + path, header_params=headers, body=body)
        response.read()
        text = response.data.decode("utf-8") if response.data else ""
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason, body=text)
        return json.loads(text) if text else None

    def create(self, collection: str, obj: dict[str, Any]) -> Any:
        return self.request("POST", collection, obj)

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)  # type: ignore[no-any-return]
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch(self, path: str, patch: dict[str, Any]) -> Any:
        return self.request("PATCH", path, patch, "application/merge-patch+json")

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def items(self, collection: str) -> list[dict[str, Any]]:
        return list((self.get(collection) or {}).get("items") or [])

    # ------------------------------------------------------------------------- conveniences

    def add_node(self, node: dict[str, Any]) -> None:
        self.create("/api/v1/nodes", node)

    def create_llmd(self, obj: dict[str, Any], namespace: str = "default") -> Any:
        return self.create(f"{LLMD_PATH}/namespaces/{namespace}/{PLURAL}", obj)

    def requests(self) -> list[tuple[str, str, int]]:
        """A copy of the emulator's request log: ``(method, path, status)``."""
        assert self.emulator is not None
        return self.call(lambda: list(self.emulator.log))  # type: ignore[union-attr]

    def llmd_path(self, name: str, namespace: str = "default") -> str:
        return f"{LLMD_PATH}/namespaces/{namespace}/{PLURAL}/{name}"

    def llmd(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.get(self.llmd_path(name, namespace))

    def deployments(self, namespace: str = "default") -> list[dict[str, Any]]:
        return self.items(f"/apis/apps/v1/namespaces/{namespace}/deployments")

    def leader_worker_sets(self, namespace: str = "default") -> list[dict[str, Any]]:
        return self.items(f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{namespace}/leaderworkersets")

    def wait_for(
        self, what: str, probe: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1
    ) -> Any:
        """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@contextlib.contextmanager
def emulated_cluster(tmp_path: Path, monkeypatch: Any, **options: Any) -> Iterator[EmulatedCluster]:
    """An emulated API server (``options``: which APIs it serves) that KUBECONFIG points at, for kopf
    and for the operator's client; stopped at the end."""
    import kubernetes.config.kube_config

    emulated = EmulatedCluster(tmp_path, **options).start()
    monkeypatch.setenv("KUBECONFIG", str(emulated.kubeconfig))
    # The kubernetes package reads KUBECONFIG once, at import; kopf's login uses that default.
    monkeypatch.setattr(
        kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(emulated.kubeconfig)
    )
    monkeypatch.setenv("KUBEVRAM_RETRY_DELAY", "1")
    monkeypatch.delenv("KUBEVRAM_NODE_CLASSES", raising=False)
    try:
        yield emulated
    finally:
        emulated.stop()


@contextlib.contextmanager
def running_operator(*extra_args: str) -> Iterator[Any]:
    """``kubevram``'s kopf handlers in KopfRunner (a thread), cluster-wide, standalone."""
    import kopf
    from kopf.testing import KopfRunner

    settings = kopf.OperatorSettings()
    # kmock 0.8 cannot list /api/v1/namespaces; cluster-wide watching needs no namespace scan.
    settings.scanning.disabled = True
    args = ["run", "--all-namespaces", "--standalone", "-m", "kubevram.controller.handlers", *extra_args]
    with KopfRunner(args, settings=settings, timeout=30) as runner:
        yield runner
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


def llm_deployment(
    name: str, model: str = "Qwen/Qwen2-7B-Instruct", *, replicas: int = 1, namespace: str = "default",
    **spec: Any,
) -> dict[str, Any]:
    """An LLMDeployment as kubectl would create it; ``spec`` keys (``placement``, ...) go under spec and
    ``model`` keys other than the id under ``model_extra``."""
    model_extra = spec.pop("model_extra", {})
    return {
        "apiVersion": "llm.kubevram.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "model": {"id": model, **model_extra},
            "serving": {"maxSequenceLength": 4096, "maxBatchSize": 1},
            **spec,
        },
    }


def gpu_node(
    name: str,
    *,
    gpus: int = 4,
    memory_mib: int = 81920,
    product: str = "NVIDIA-A100-SXM4-80GB",
    cpu: str = "64",
    memory: str = "512Gi",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Node as the API returns it on a GPU node: GFD labels and the device plugin's allocatable."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.memory": str(memory_mib),
                "nvidia.com/gpu.product": product,
                **(labels or {}),
            },
        },
        "status": {
            "capacity": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus)},
            "allocatable": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
