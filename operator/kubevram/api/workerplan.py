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
 "offloadFolder": null, "group": null, "kvCacheBytes": 536870912}
```

A pod of a multi-node replica (a LeaderWorkerSet group) reads the same file as every other pod of its
group: ``group`` says the layout (pods, GPUs per pod, tensor-parallel and pipeline sizes, each stage's
decoder layers) and every rank's budget; ``deviceMap`` and ``maxMemory`` are null (transformers places a
rank's modules itself). The pod finds its own ranks by ``LWS_WORKER_INDEX``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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

#: The port the leader of a multi-node group listens on for torch.distributed's rendezvous (its store).
DEFAULT_GROUP_PORT = 29500


class _Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_enum_values=True)


class DeploymentRef(_Plan):
    name: str = Field(min_length=1, description="Name of the LLMDeployment the worker serves.")
    namespace: str = Field(default="default", min_length=1, description="Its namespace.")


class PlanModel(_Plan):
    id: str = Field(min_length=1, description="Hub id or path inside the model volume to load.")
    trustRemoteCode: bool = Field(default=False, description="Allow the model's own Python code to run.")


class GroupStage(_Plan):
    stage: int = Field(ge=0, description="Pipeline stage index.")
    layers: list[int] = Field(min_length=2, max_length=2, description="Decoder layers [first, end).")
    ends: list[str] = Field(default_factory=list, description="Embeddings or head the stage holds too.")


class RankBudget(_Plan):
    """What one rank (one GPU of one pod) of a group holds, in bytes, as the planner budgeted it."""

    rank: int = Field(ge=0)
    pod: int = Field(ge=0, description="LWS_WORKER_INDEX of its pod (0: the leader).")
    gpu: int = Field(ge=0, description="Pod-local GPU index (and local rank).")
    stage: int = Field(ge=0)
    tpRank: int = Field(ge=0)
    weights: int = Field(ge=0)
    kvCache: int = Field(ge=0)
    activations: int = Field(ge=0)
    communication: int = Field(ge=0)
    overhead: int = Field(ge=0)
    fragmentation: int = Field(ge=0)
    total: int = Field(ge=0)


class GroupPlan(_Plan):
    """A replica run by a group of pods (a LeaderWorkerSet): pipeline stages across the pods, tensor
    parallel over each pod's GPUs, one process (rank) per GPU: rank = pod x gpusPerPod + local GPU,
    stage = rank // tensorParallel. Every pod reads the same plan and finds itself by LWS_WORKER_INDEX."""

    size: int = Field(ge=1, description="Pods in the group (LWS_GROUP_SIZE).")
    gpusPerPod: int = Field(ge=1, description="GPUs, and processes, per pod.")
    tensorParallel: int = Field(ge=1)
    pipelineParallel: int = Field(ge=1)
    worldSize: int = Field(ge=1)
    port: int = Field(default=DEFAULT_GROUP_PORT, ge=1, le=65535, description="The leader's rendezvous port.")
    stages: list[GroupStage]
    ranks: list[RankBudget]

    @model_validator(mode="after")
    def _consistent(self) -> GroupPlan:
        world = self.size * self.gpusPerPod
        if not world == self.worldSize == self.tensorParallel * self.pipelineParallel:
            raise ValueError(
                f"worldSize {self.worldSize} must be size x gpusPerPod ({world}) and tensorParallel x "
                f"pipelineParallel ({self.tensorParallel * self.pipelineParallel})"
            )
        if [s.stage for s in self.stages] != list(range(self.pipelineParallel)):
            raise ValueError(f"stages must be 0..{self.pipelineParallel - 1}, one each")
        starts = [s.layers[0] for s in self.stages[1:]]
        empty = any(a >= b for a, b in (s.layers for s in self.stages))
        if starts != [s.layers[1] for s in self.stages[:-1]] or empty:
            raise ValueError("stages must hold contiguous, non-empty layer ranges")
        if [r.rank for r in self.ranks] != list(range(self.worldSize)):
            raise ValueError(f"ranks must be 0..{self.worldSize - 1}, one each")
        return self

    def rank(self, pod: int, gpu: int) -> RankBudget:
        """The rank of pod ``pod``'s GPU ``gpu``."""
        return self.ranks[pod * self.gpusPerPod + gpu]


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
    group: GroupPlan | None = Field(
        default=None, description="The multi-node group this pod belongs to; null: a single-pod replica."
    )
    kvCacheBytes: int | None = Field(
        default=None,
        ge=0,
        description="The planned KV cache of one replica (the estimate's kvCacheBytes: maxSequenceLength x "
        "maxBatchSize tokens); vllm:kv_cache_usage_perc is the share of it in use. Null: the worker "
        "budgets maxBatchSize x maxSequenceLength positions at the bytes one position measures in its cache.",
    )

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
