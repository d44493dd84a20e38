"""The WorkerPlan JSON the operator writes and the worker reads."""

from __future__ import annotations

import json

import pytest

from kubevram.api.errors import SpecError
from kubevram.api.workerplan import WorkerPlan

MINIMAL = {"deployment": {"name": "qwen"}, "model": {"id": "Qwen/Qwen2-7B-Instruct"}}


def test_round_trip_and_defaults(tmp_path):
    plan = WorkerPlan.parse(
        {**MINIMAL, "deviceMap": {"model.layers.0": 0, "lm_head": "cpu"}, "maxMemory": {"0": 100, "cpu": 200}}
    )
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    again = WorkerPlan.from_file(path)
    assert again == plan
    assert again.kind == "WorkerPlan"
    assert again.serving.maxBatchSize == 1
    assert again.deviceMap == {"model.layers.0": 0, "lm_head": "cpu"}
    assert again.accelerate_max_memory() == {0: 100, "cpu": 200}
    assert json.loads(plan.to_json())["precision"] == {"weights": "bfloat16", "kvCache": "auto"}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"precision": {"weights": "fp7"}}, "precision.weights: 'fp7' is not one of"),
        ({"maxMemory": {"gpu0": 1}}, "maxMemory: key 'gpu0' is not a GPU index"),
        ({"deviceMap": {"lm_head": "tpu"}}, "deviceMap: 'lm_head': 'tpu' is not a GPU index"),
        ({"deviceMap": {"lm_head": -1}}, "deviceMap: 'lm_head': -1 is not a GPU index"),
        ({"serving": {"maxBatchSize": 0}}, "serving.maxBatchSize: 0 must be >= 1"),
        ({"surprise": 1}, "surprise: unknown field"),
    ],
)
def test_errors_name_the_field(tmp_path, patch, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**MINIMAL, **patch}))
    with pytest.raises(SpecError) as info:
        WorkerPlan.from_file(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_and_not_json(tmp_path):
    with pytest.raises(SpecError, match="cannot read the plan"):
        WorkerPlan.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(SpecError, match="not JSON"):
        WorkerPlan.from_file(bad)
