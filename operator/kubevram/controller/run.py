"""``kubevram operator``: run the kopf operator against the cluster in ``KUBECONFIG`` (or in-cluster).

Before kopf starts, one request to the API server checks that there is a cluster to talk to; if
not, :class:`NoCluster` says in one line what is missing (the CLI prints it and exits 2). With
``leader_election`` the process first waits for the Lease (``kubevram.controller.leader``), serving
its liveness endpoint meanwhile, and plans only while it holds it. With ``metrics_port`` the operator's
Prometheus metrics (``kubevram.controller.metrics``) are served at ``/metrics`` on that port from the
start, standing by or not.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: Lost the Lease: the process exits with this status so that its pod restarts as a candidate.
EXIT_LOST_LEASE = 1


class NoCluster(Exception):
    """There is no cluster to run against: the message says what is missing, in one line."""


def check_cluster() -> None:
    """One ``GET /version``: ``NoCluster`` naming the kubeconfig or the server when it fails."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
    from urllib3.exceptions import HTTPError

    from kubevram.controller.adapter import api_client

    where = os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        api = api_client()
    except ConfigException as exc:
        why = f"no cluster: not running in a pod, and no usable kubeconfig at {where} ({exc})"
        raise NoCluster(why) from None
    except OSError as exc:
        why = f"no cluster: cannot read the kubeconfig at {where} ({exc.strerror or exc})"
        raise NoCluster(why) from None
    host = api.configuration.host
    quiet = logging.getLogger("urllib3")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its retry warnings: the one line below says it all
    try:
        response = api.call_api("GET", f"{host}/version", header_params={"Accept": "application/json"},
                                _request_timeout=10)
        response.read()
    except (HTTPError, ApiException) as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split()).split("): ", 1)[-1]
        raise NoCluster(f"cannot reach the cluster at {host} (from {where}): {reason}") from None
    finally:
        quiet.setLevel(level)
    if response.status in (401, 403):
        raise NoCluster(f"the cluster at {host} refuses the credentials of {where}: HTTP {response.status}")


def default_namespace() -> str:
    """Where the Lease lives: ``KUBEVRAM_OPERATOR_NAMESPACE`` (the chart sets it), the pod's own
    namespace, else ``default``."""
    if os.environ.get("KUBEVRAM_OPERATOR_NAMESPACE"):
        return os.environ["KUBEVRAM_OPERATOR_NAMESPACE"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"


@contextmanager
def standby_health(endpoint: str | None) -> Iterator[None]:
    """Answer the liveness endpoint (``http://host:port/path``) while standing by, so that the
    probes of a standby replica pass; kopf serves it once this replica leads."""
    if not endpoint:
        yield
        return
    url = urlsplit(endpoint)
    path = url.path or "/"

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            ok = self.path.split("?")[0] == path
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"standby": true}' if ok else b"{}")

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 80), Health)
    thread = threading.Thread(target=server.serve_forever, name="kubevram-standby-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def run_operator(
    namespaces: Sequence[str] = (),
    all_namespaces: bool = False,
    liveness: str | None = None,
    verbose: bool = False,
    leader_election: bool = False,
    lease_name: str = "kubevram-operator",
    lease_namespace: str | None = None,
    metrics_port: int | None = None,
) -> int:
    """Watch the given namespaces (or every namespace) until interrupted; 0 on a clean stop.

    kopf runs standalone (no kopf peering objects): with ``leader_election`` a Lease decides which
    replica runs it; without it, run one replica.
    """
    import kopf

    import kubevram.controller.handlers  # noqa: F401  (registers the handlers)

    check_cluster()
    if metrics_port:
        from kubevram.controller.metrics import serve

        serve(metrics_port)
    kopf.configure(verbose=verbose)
    logging.getLogger("kubevram").setLevel(logging.DEBUG if verbose else logging.INFO)
    clusterwide = all_namespaces or not namespaces
    stop = threading.Event()  # ends the wait for the Lease
    elector = None
    if leader_election:
        from kubevram.controller.adapter import Cluster
        from kubevram.controller.leader import LeaderElector, LeaseLock

        identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        lock = LeaseLock(Cluster(), lease_namespace or default_namespace(), lease_name, identity)
        elector = LeaderElector(lock)
        with standby_health(liveness):
            try:
                if not elector.acquire(stop):
                    return 0
            except KeyboardInterrupt:
                return 130

        def on_lost() -> None:
            # Another replica may be planning already: stop this one now, mid-handler or not (what
            # client-go's controllers do). Its pod restarts and stands by.
            logging.getLogger("kubevram").critical("lost the lease: exiting")
            os._exit(EXIT_LOST_LEASE)

        elector.keep(on_lost)
    try:
        kopf.run(
            standalone=True,
            clusterwide=clusterwide,
            namespaces=() if clusterwide else list(namespaces),
            liveness_endpoint=liveness,
        )
    finally:
        if elector is not None:
            elector.stop()
    return 0
