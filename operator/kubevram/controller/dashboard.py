"""The Grafana dashboard of the operator's metrics, generated here so that its queries and the series
``kubevram.controller.metrics`` exports share one source (the ``Series`` constants).

``kubevram dashboard`` prints it; the chart ships the same JSON (``charts/kubevram/dashboards/kubevram.json``,
written by ``kubevram dashboard --write``) in a ConfigMap that Grafana's dashboard sidecar loads
(``metrics.dashboard.enabled``). Panels: cluster VRAM by GPU class (capacity, reserved, used, free), a
heat map per node and GPU, the deployments that reserve most beyond what they use, pending replicas
with their reasons, estimate vs measured, and the operator's own work (reconciles, latencies, the
ledger, API errors). Pure: builds plain dicts.
"""

from __future__ import annotations

import json
from typing import Any

from kubevram.controller.metrics import (
    API_ERRORS_SERIES,
    DEPLOYMENT_ERROR,
    DEPLOYMENT_ESTIMATE,
    DEPLOYMENT_PEAK,
    DEPLOYMENT_RESERVED,
    DEPLOYMENT_USED,
    GPU_CAPACITY,
    GPU_RESERVED,
    GPU_USED,
    LEDGER_RESERVATIONS,
    NODE_FREE,
    NODE_OTHER,
    PLANNING_SECONDS_SERIES,
    RECONCILE_SECONDS_SERIES,
    RECONCILES_SERIES,
    REPLICAS_PENDING,
)

UID = "kubevram-vram"
TITLE = "kubevram: GPU memory"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PRODUCT = '{product=~"$product"}'  # the GPU class variable
DEPLOYMENT = "namespace, deployment"


def _target(ref: str, expr: str, legend: str = "", *, instant: bool = False) -> dict[str, Any]:
    target: dict[str, Any] = {"refId": ref, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
    if instant:
        target.update(instant=True, range=False, format="table")
    return target


def _panel(
    kind: str,
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    unit: str = "bytes",
    **extra: Any,
) -> dict[str, Any]:
    x, y, w, h = grid
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": targets,
        **extra,
    }


def _by_class(series: str) -> str:
    return f"sum by (product) ({series}{PRODUCT})"


def _heatmap(title: str, description: str, series: str, x: int, scheme: str) -> dict[str, Any]:
    """``series`` over each GPU's capacity, one row per node and GPU."""
    share = f"{series}{PRODUCT} / {GPU_CAPACITY.name}{PRODUCT}"
    return _panel(
        "heatmap",
        title,
        description,
        [_target("A", share, "{{node}} GPU {{gpu}}")],
        (x, 12, 12, 10),
        unit="percentunit",
        options={
            "calculate": False,
            "yAxis": {"unit": "short"},
            "color": {"scheme": scheme},
            "cellValues": {"unit": "percentunit"},
        },
    )


def _quantiles(series: str, what: str) -> list[dict[str, Any]]:
    rate = f"sum by (le) (rate({series}_bucket[$__rate_interval]))"
    return [
        _target(ref, f"histogram_quantile({q}, {rate})", f"{what} p{int(q * 100)}")
        for ref, q in (("A", 0.5), ("B", 0.99))
    ]


def _panels() -> list[dict[str, Any]]:
    capacity, reserved, used = GPU_CAPACITY.name, GPU_RESERVED.name, GPU_USED.name
    free = NODE_FREE.name
    totals = [
        ("Capacity", capacity, "GPU memory of every GPU node kubevram sees."),
        (
            "Reserved by kubevram",
            reserved,
            "What kubevram's plans reserve (an exclusive replica: its whole GPUs).",
        ),
        ("Used by workers", used, "What the workers' torch allocators hold, as they report it."),
        ("Free", free, "What a new plan could still take, less what other pods request."),
    ]
    panels = [
        _panel(
            "stat",
            title,
            description,
            [_target("A", f"sum({series}{PRODUCT})")],
            (6 * i, 0, 6, 4),
            options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
        )
        for i, (title, series, description) in enumerate(totals)
    ]
    panels += [
        _panel(
            "timeseries",
            "Cluster VRAM by GPU class",
            "Per GPU product: capacity, what kubevram reserves, what its workers use, what is free.",
            [
                _target("A", _by_class(capacity), "{{product}} capacity"),
                _target("B", _by_class(reserved), "{{product}} reserved"),
                _target("C", _by_class(used), "{{product}} used"),
                _target("D", _by_class(free), "{{product}} free"),
                _target("E", _by_class(NODE_OTHER.name), "{{product}} other pods"),
            ],
            (0, 4, 24, 8),
        ),
        _heatmap(
            "Reserved share per node and GPU",
            "kubevram's reservations over each GPU's memory: one row per node and GPU.",
            reserved,
            0,
            "Oranges",
        ),
        _heatmap(
            "Used share per node and GPU",
            "What the workers' allocators hold over each GPU's memory: how close each GPU is to OOM.",
            used,
            12,
            "Reds",
        ),
        _panel(
            "bargauge",
            "Top deployments by reserved minus used",
            "GPU memory each LLMDeployment reserves beyond what its workers use (all of it until they do).",
            [
                _target(
                    "A",
                    f"topk(10, {DEPLOYMENT_RESERVED.name} - on({DEPLOYMENT}) "
                    f"({DEPLOYMENT_USED.name} or on({DEPLOYMENT}) {DEPLOYMENT_RESERVED.name} * 0))",
                    "{{namespace}}/{{deployment}}",
                    instant=True,
                )
            ],
            (0, 22, 12, 9),
            options={"orientation": "horizontal", "displayMode": "gradient"},
        ),
        _panel(
            "table",
            "Pending replicas",
            "Replicas no node can hold now: the Scheduled condition's reason and the GPU node class the "
            "autoscaling signal asks for (kubectl describe llmd NAME says the numbers).",
            [
                _target(
                    "A",
                    f"sum by ({DEPLOYMENT}, reason, gpu_class) ({REPLICAS_PENDING.name}) > 0",
                    instant=True,
                )
            ],
            (12, 22, 12, 9),
            unit="short",
            transformations=[
                {
                    "id": "organize",
                    "options": {"excludeByName": {"Time": True}, "renameByName": {"Value": "pending"}},
                }
            ],
        ),
        _panel(
            "timeseries",
            "Estimate vs measured peak",
            "The estimate of one replica against the largest allocator peak one of its workers reported.",
            [
                _target(
                    "A",
                    f'{DEPLOYMENT_ESTIMATE.name}{{part="total"}}',
                    "{{namespace}}/{{deployment}} estimate",
                ),
                _target("B", DEPLOYMENT_PEAK.name, "{{namespace}}/{{deployment}} measured peak"),
            ],
            (0, 31, 12, 8),
        ),
        _panel(
            "timeseries",
            "Estimate error",
            "(estimate - measured) / measured allocator peak at the largest prefill measured "
            "(status.calibration); positive: the estimate is above.",
            [_target("A", DEPLOYMENT_ERROR.name, "{{namespace}}/{{deployment}}")],
            (12, 31, 12, 8),
            unit="percentunit",
        ),
        _panel(
            "timeseries",
            "Reconciles by outcome",
            "Reconciliations per second: planned, pending, invalid, retry, error.",
            [
                _target(
                    "A", f"sum by (outcome) (rate({RECONCILES_SERIES.name}[$__rate_interval]))", "{{outcome}}"
                )
            ],
            (0, 39, 6, 8),
            unit="ops",
        ),
        *(
            _panel("timeseries", title, description, _quantiles(series.name, what), (x, 39, 6, 8), unit="s")
            for title, description, series, what, x in (
                ("Reconcile latency", "Read, plan, apply, report.", RECONCILE_SECONDS_SERIES, "reconcile", 6),
                ("Planning latency", "The planner, in the ledger lock.", PLANNING_SECONDS_SERIES, "plan", 12),
            )
        ),
        _panel(
            "timeseries",
            "Ledger and API errors",
            "Reservations in the placement ledger by state; API errors per second by HTTP status.",
            [
                _target("A", f"sum by (state) ({LEDGER_RESERVATIONS.name})", "ledger {{state}}"),
                _target(
                    "B",
                    f"sum by (status) (rate({API_ERRORS_SERIES.name}[$__rate_interval]))",
                    "HTTP {{status}}",
                ),
            ],
            (18, 39, 6, 8),
            unit="short",
        ),
    ]
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return panels


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    return {
        "uid": UID,
        "title": TITLE,
        "description": "Where GPU memory is promised and used: kubevram's operator metrics.",
        "tags": ["kubevram", "gpu"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
                {
                    "name": "product",
                    "label": "GPU class",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": f"label_values({GPU_CAPACITY.name}, product)", "refId": "product"},
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": _panels(),
    }


def dashboard_json() -> str:
    """The dashboard as the file the chart ships (sorted keys, two-space indent, final newline)."""
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


__all__ = ["TITLE", "UID", "dashboard", "dashboard_json"]
