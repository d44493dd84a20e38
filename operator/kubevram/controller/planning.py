"""The operator's one door into the pure planner: one deployment in, its plan JSON out.

``kubevram.planner.placement.plan_cluster`` plans many deployments jointly; a reconciliation plans
one, against the nodes, the GPU requests of other pods and the reservations the placement ledger
(``kubevram.controller.ledger``) holds for every other LLMDeployment. A deployment the
planner cannot plan at all (its model facts cannot be had) raises the planner's ``SpecError``,
which names the field and the value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.api.v1alpha1 import LLMDeployment
from kubevram.planner.inventory import Reservation
from kubevram.planner.placement import DraInput


@lru_cache(maxsize=4)
def _node_classes(path: str) -> tuple[Mapping[str, Any], ...] | None:
    """GPU node classes for the autoscaling signal (the chart mounts them; env KUBEVRAM_NODE_CLASSES)."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return tuple(value) if isinstance(value, list) else None


def node_classes() -> Sequence[Mapping[str, Any]] | None:
    path = os.environ.get("KUBEVRAM_NODE_CLASSES")
    return _node_classes(path) if path else None


def plan_deployment(
    deployment: LLMDeployment,
    nodes: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    model_config: dict[str, Any] | None,
    reservations: Sequence[Reservation] = (),
    *,
    dra: DraInput | None = None,
) -> dict[str, Any]:
    """The plan of ``deployment`` (``kubevram plan -o json`` form) given ``nodes`` and what ``pods`` (other
    pods' GPU requests) and ``reservations`` (kubevram's, from the placement ledger) hold; with ``dra``, the
    GPUs its ResourceSlices publish minus what its ResourceClaims hold."""
    from kubevram.planner.placement import plan_cluster

    configs = {(deployment.namespace, deployment.name): model_config} if model_config is not None else None
    result = plan_cluster(
        [deployment], nodes, pods, configs=configs, node_classes=node_classes(), reservations=reservations,
        dra=dra,
    )
    (plan,) = result.deployments
    if plan.error is not None:
        raise plan.error if isinstance(plan.error, SpecError) else SpecError("spec", str(plan.error))
    return plan.to_json()
