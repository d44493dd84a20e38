"""``kubevram operator``: run the kopf operator against the cluster in ``KUBECONFIG`` (or in-cluster)."""

from __future__ import annotations

import logging
from collections.abc import Sequence


def run_operator(
    namespaces: Sequence[str] = (),
    all_namespaces: bool = False,
    liveness: str | None = None,
    verbose: bool = False,
) -> int:
    """Watch the given namespaces (or every namespace) until interrupted; 0 on a clean stop.

    Standalone (no peering objects needed): run one replica of the operator, as the chart does.
    """
    import kopf

    import kubevram.controller.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=verbose)
    logging.getLogger("kubevram").setLevel(logging.DEBUG if verbose else logging.INFO)
    clusterwide = all_namespaces or not namespaces
    kopf.run(
        standalone=True,
        clusterwide=clusterwide,
        namespaces=() if clusterwide else list(namespaces),
        liveness_endpoint=liveness,
    )
    return 0
