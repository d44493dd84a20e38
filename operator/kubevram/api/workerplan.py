"""The worker plan: what the operator tells one worker pod to load, and how.

The operator renders one ``WorkerPlan`` per replica shape and mounts it as JSON; the worker parses it
(``WorkerPlan.from_file``) and passes ``deviceMap`` and ``maxMemory`` unchanged to
``from_pretrained(device_map=..., max_memory=...)`` (only the ``"0"`` GPU keys of ``maxMemory`` become
integers, which accelerate wants). Pure: pydantic only.

```json
{"apiVersion": "llm.kubevram.io/v1alpha1", "kind": "WorkerPlan",
 "deployment": {"name": "qwen2-7b", "namespace": "ai"},
 "model": {"id": "Qwen/Qwen2-7B-Instruct", "trustRemoteCode": false},
 "precision": {"weights": "bfloat16", "kvCache": "auto"},
 "serving": {"maxSequenceLength": 4096, "maxBatchSize": 4},
 "generation": {"chinese": {"enabled": false}}, "memoryRelease": {},
 "deviceMap": {"model.embed_tokens": 0, "model.layers.0": 0, "lm_head": "cpu"},
 "maxMemory": {"0": 21474836480, "cpu": 68719476736},
 "offloadFolder": null}
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kubevram.api.errors import SpecError, from_validation_error
from kubevram.api.v1alpha1 import (
    GenerationSpec,
    MemoryReleaseSpec,
    PrecisionSpec,
    ServingSpec,
)

#: Where disk-offloaded weights go, everywhere: the planner's plans, the operator's worker pods (an
#: emptyDir sized for the disk budget is mounted there) and a worker started by hand.
DEFAULT_OFFLOAD_FOLDER = "/tmp/kubevram-offload"

#: Where one module goes: a pod GPU index, the CPU or the disk (accelerate's device_map values).
Device = int | Literal["cpu", "disk"]


class _Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_enum_values=True)


class DeploymentRef(_Plan):
    name: str = Field(min_length=1, description="Name of the LLMDeployment the worker serves.")
    namespace: str = Field(default="default", min_length=1, description="Its namespace.")


class PlanModel(_Plan):
    id: str = Field(min_length=1, description="Hub id or path inside the model volume to load.")
    trustRemoteCode: bool = Field(default=False, description="Allow the model's own Python code to run.")


class WorkerPlan(_Plan):
    """One worker pod's loading and serving plan, as the operator renders it."""

    apiVersion: Literal["llm.kubevram.io/v1alpha1"] = "llm.kubevram.io/v1alpha1"
    kind: Literal["WorkerPlan"] = "WorkerPlan"
    deployment: DeploymentRef
    model: PlanModel
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    memoryRelease: MemoryReleaseSpec = Field(default_factory=MemoryReleaseSpec)
    deviceMap: dict[str, Device] | None = Field(
        default=None,
        description="Module name to pod GPU index, 'cpu' or 'disk'; null lets the worker use what it finds.",
    )
    maxMemory: dict[str, int] | None = Field(
        default=None,
        description="Bytes per pod GPU index ('0'..'n-1') and 'cpu'/'disk'.",
    )
    offloadFolder: str | None = Field(default=None, description="Folder for disk-offloaded weights.")

    @field_validator("deviceMap", mode="before")
    @classmethod
    def _device_map(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for module, device in value.items():
            ok = device in ("cpu", "disk") or (
                isinstance(device, int) and not isinstance(device, bool) and device >= 0
            )
            if not ok:
                raise ValueError(f"{module!r}: {device!r} is not a GPU index (0, 1, ...), 'cpu' or 'disk'")
        return value

    @field_validator("maxMemory")
    @classmethod
    def _max_memory(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for key, size in (value or {}).items():
            if not (key.isdigit() or key in ("cpu", "disk")):
                raise ValueError(f"key {key!r} is not a GPU index ('0', '1', ...), 'cpu' or 'disk'")
            if size < 0:
                raise ValueError(f"{key!r}: {size} bytes must be >= 0")
        return value

    def accelerate_max_memory(self) -> dict[int | str, int] | None:
        """``maxMemory`` with GPU keys as ints, as ``from_pretrained(max_memory=...)`` wants."""
        if self.maxMemory is None:
            return None
        return {int(k) if k.isdigit() else k: v for k, v in self.maxMemory.items()}

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=False)

    @classmethod
    def parse(cls, obj: Any, source: str = "") -> WorkerPlan:
        """Validate a decoded JSON object; errors name the field (``precision.weights: 'fp7' is not...``)."""
        if not isinstance(obj, dict):
            raise SpecError(
                "", f"expected a JSON object (a WorkerPlan), got {type(obj).__name__}", source=source
            )
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            raise from_validation_error(exc, source=source) from None

    @classmethod
    def from_file(cls, path: str | Path) -> WorkerPlan:
        """Read a plan JSON file; unreadable files, bad JSON and bad fields raise ``SpecError``."""
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError("", f"cannot read the plan: {exc.strerror or exc}", source=source) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError("", f"not JSON: {exc.msg} at line {exc.lineno}", source=source) from None
        return cls.parse(obj, source=source)
