"""The LLMDeployment resource, version v1alpha1: the single source of its schema.

The pydantic models below are what the operator, the CLI and the worker parse; the CRD in
``crds/llmdeployment.yaml`` is generated from them (``kubevram crd``), so every ``description``
here is what ``kubectl explain llmdeployment.spec...`` prints. Field names are camelCase, as in
every Kubernetes API. Pure: no Kubernetes client, kopf or torch here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from kubevram.api.quantity import NON_NEGATIVE_QUANTITY_PATTERN, parse_memory

GROUP = "llm.kubevram.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ["llmd"]

DEFAULT_WORKER_IMAGE = "ghcr.io/kubevram/worker:0.1.0"
#: What the planner budgets per GPU for the CUDA context, kernels and library workspaces when
#: spec.estimation.overheadPerGPU is unset: accelerate's "Big Model Inference" guide says the CUDA
#: kernels take 1-2 GB, transformers' "Model training anatomy" guide measures 1.3 GB.
DEFAULT_OVERHEAD_PER_GPU = "1280Mi"
#: Allocator headroom, as a share of the dynamic memory (KV cache and activations).
DEFAULT_FRAGMENTATION = 0.05
#: What the planner budgets per GPU of a multi-node group for NCCL's buffers when
#: spec.estimation.communicationPerGPU is unset (docs/estimate.md: "Communication buffers").
DEFAULT_COMMUNICATION_PER_GPU = "1Gi"
#: The most pods (one per node) one replica's group spans unless spec.placement.maxGroupSize says.
DEFAULT_MAX_GROUP_SIZE = 4


class Precision(StrEnum):
    """Storage precision of the weights."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    int8 = "int8"
    int4 = "int4"


class KVCachePrecision(StrEnum):
    """Storage precision of the KV cache: the worker keeps it in the compute dtype (``auto``); naming that
    dtype is allowed, any other is refused (the worker would not honour it)."""

    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


# The dtype the worker computes (and keeps the KV cache) in, per weight precision: bitsandbytes
# dequantizes int8/int4 weights to float16.
COMPUTE_DTYPES: dict[str, str] = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "float16",
    "int4": "float16",
}


class Strategy(StrEnum):
    """How the layers of one replica are spread over its GPUs (accelerate's names)."""

    balanced = "balanced"
    balanced_low_0 = "balanced_low_0"
    sequential = "sequential"


class Offload(StrEnum):
    """Where layers may go when the GPUs cannot hold them all."""

    none = "none"
    cpu = "cpu"
    disk = "disk"


class Sharing(StrEnum):
    """Whether a replica takes whole GPUs or a VRAM slice of a shared GPU."""

    exclusive = "exclusive"
    shared = "shared"


class MultiNode(StrEnum):
    """Whether one replica may span several nodes (a LeaderWorkerSet group of pods)."""

    never = "never"
    whenNeeded = "whenNeeded"
    always = "always"


class ResourceAPI(StrEnum):
    """How worker pods ask for GPUs: device-plugin counts or DRA ResourceClaims."""

    auto = "auto"
    devicePlugin = "devicePlugin"
    dra = "dra"


class FailureMode(StrEnum):
    """What an Inference Gateway does when its Endpoint Picker does not answer."""

    FailOpen = "FailOpen"
    FailClose = "FailClose"


class Packing(StrEnum):
    """How replicas are spread over nodes."""

    binpack = "binpack"
    spread = "spread"


class _Model(BaseModel):
    """Base for every spec model: camelCase, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_enum_values=True)


def _memory(value: str | int) -> str | int:
    parse_memory(value)  # a ValueError names the value; pydantic adds the field
    return value


# An amount of memory: a Kubernetes quantity >= 0. The schema checks strings by pattern and integers by
# minimum (each applies to its own type only), the parser both.
Quantity = Annotated[
    str | int,
    AfterValidator(_memory),
    Field(
        description="A Kubernetes quantity such as 40Gi, 512Mi or a plain number of bytes.",
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "pattern": NON_NEGATIVE_QUANTITY_PATTERN,
            "minimum": 0,
        },
    ),
]


class ConfigMapKeyRef(_Model):
    name: str = Field(min_length=1, description="Name of a ConfigMap in the deployment's namespace.")
    key: str = Field(default="config.json", min_length=1, description="Key holding the config.json text.")


class ModelSpec(_Model):
    id: str = Field(
        min_length=1,
        description="What the worker loads: a Hugging Face hub id or a path inside the model volume.",
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="Inline Hugging Face config.json of the model: the facts the VRAM plan is computed from.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    configMapRef: ConfigMapKeyRef | None = Field(
        default=None, description="A ConfigMap key holding the model's config.json (instead of `config`)."
    )
    volume: dict[str, Any] | None = Field(
        default=None,
        description="A Kubernetes volume source holding the weights, mounted read-only at /models: a "
        "persistentVolumeClaim, csi or ephemeral volume (what a PodSecurity restricted namespace admits).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    trustRemoteCode: bool = Field(default=False, description="Allow the model's own Python code to run.")


class PrecisionSpec(_Model):
    weights: Precision = Field(
        default=Precision.bfloat16,
        description="Weight precision. int8 and int4 use bitsandbytes (LLM.int8 and NF4) and keep "
        "embeddings, norms and the output head in float16; the worker image carries bitsandbytes.",
    )
    kvCache: KVCachePrecision = Field(
        default=KVCachePrecision.auto,
        description="KV cache precision. The worker keeps the cache in the compute dtype (the weights' "
        "dtype; float16 for int8/int4): auto, or that dtype by name.",
    )

    @field_validator("kvCache")
    @classmethod
    def _served(cls, value: str, info: ValidationInfo) -> str:
        weights = str(info.data.get("weights", Precision.bfloat16))
        compute = COMPUTE_DTYPES.get(weights)
        if value != KVCachePrecision.auto and compute is not None and value != compute:
            raise ValueError(
                f"{str(value)!r} is not served: the worker keeps the KV cache in the compute dtype, "
                f"{compute} for weights {weights}; use auto or {compute}"
            )
        return value


class EndpointPickerRef(_Model):
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Service of the Endpoint Picker (EPP) that routes the pool's requests; unset means "
        "<name>-epp.",
    )
    port: int = Field(default=9002, ge=1, le=65535, description="The EPP Service's gRPC port.")
    failureMode: FailureMode = Field(
        default=FailureMode.FailClose,
        description="FailClose drops requests while the EPP does not answer; FailOpen routes them anyway.",
    )


class InferencePoolSpec(_Model):
    enabled: bool | None = Field(
        default=None,
        description="Create an InferencePool (inference.networking.k8s.io/v1) selecting the workers; unset "
        "follows the operator's default (the chart's inferencePool.enabled).",
    )
    endpointPickerRef: EndpointPickerRef = Field(
        default_factory=EndpointPickerRef, description="The Endpoint Picker the pool names."
    )


class ServingSpec(_Model):
    maxSequenceLength: int = Field(
        default=4096, ge=1, le=10_000_000, description="Longest prompt plus generated tokens served."
    )
    maxBatchSize: int = Field(default=1, ge=1, le=4096, description="Most sequences decoded together.")
    inferencePool: InferencePoolSpec = Field(
        default_factory=InferencePoolSpec,
        description="Serve behind a Gateway API Inference Extension gateway (an InferencePool).",
    )


class Toleration(_Model):
    key: str | None = Field(default=None, description="Taint key the toleration applies to.")
    operator: str | None = Field(
        default=None, description="Equal or Exists.", json_schema_extra={"enum": ["Equal", "Exists"]}
    )
    value: str | None = Field(default=None, description="Taint value the toleration matches.")
    effect: str | None = Field(
        default=None,
        description="NoSchedule, PreferNoSchedule or NoExecute; empty matches every effect.",
        json_schema_extra={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
    )
    tolerationSeconds: int | None = Field(default=None, description="For NoExecute: how long it tolerates.")


class PlacementSpec(_Model):
    gpusPerReplica: int = Field(
        default=0,
        ge=0,
        le=64,
        description="GPUs per replica (all the pods of a multi-node group together); 0 chooses the fewest "
        "GPUs that fit.",
    )
    strategy: Strategy = Field(default=Strategy.balanced, description="How layers are spread over GPUs.")
    offload: Offload = Field(
        default=Offload.none, description="Whether layers that do not fit may go to CPU memory or disk."
    )
    sharing: Sharing = Field(
        default=Sharing.exclusive,
        description="exclusive takes whole GPUs; shared takes a VRAM slice on nodes that advertise sharing.",
    )
    packing: Packing = Field(
        default=Packing.binpack, description="binpack fills nodes; spread keeps replicas on different nodes."
    )
    multiNode: MultiNode = Field(
        default=MultiNode.whenNeeded,
        description="Whether a replica may be one group of pods on several nodes (a LeaderWorkerSet: "
        "pipeline stages across the pods, tensor parallel over each pod's GPUs): never; whenNeeded, only "
        "when no node of the cluster could hold a replica without offload (before any offload); always.",
    )
    maxGroupSize: int = Field(
        default=DEFAULT_MAX_GROUP_SIZE,
        ge=2,
        le=64,
        description="Most pods (one per node) the group of one replica may span when multiNode allows "
        "groups.",
    )
    resourceAPI: ResourceAPI = Field(
        default=ResourceAPI.auto,
        description="devicePlugin asks for nvidia.com/gpu counts; dra for ResourceClaims that select GPUs "
        "by memory (resource.k8s.io/v1); auto uses DRA where the cluster serves it and a GPU driver "
        "publishes ResourceSlices (the operator's default decides).",
    )
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Labels a node must carry.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the replicas tolerate.")


class ChineseSpec(_Model):
    enabled: bool = Field(default=False, description="Steer generation into Chinese by default.")
    alpha: float = Field(
        default=5.0, gt=0, description="Factor on the probability of CJK tokens (log(alpha) added to logits)."
    )
    suppressLeadingPunctuation: bool = Field(
        default=True, description="Forbid punctuation as the first generated token."
    )
    ranges: list[str] = Field(
        default_factory=lambda: ["4E00-9FFF"],
        description="Unicode ranges (hex, inclusive) that count as CJK, e.g. 4E00-9FFF.",
        json_schema_extra={"items": {"type": "string", "pattern": "^[0-9A-Fa-f]{1,6}-[0-9A-Fa-f]{1,6}$"}},
    )

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, value: list[str]) -> list[str]:
        for item in value:
            lo, sep, hi = item.partition("-")
            try:
                ok = bool(sep) and int(lo, 16) <= int(hi, 16) <= 0x10FFFF
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{item!r} is not a range of hex code points such as 4E00-9FFF")
        return value


class GenerationDefaults(_Model):
    temperature: float = Field(default=0.7, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    topP: float = Field(default=0.9, gt=0, le=1, description="Nucleus sampling mass.")
    maxNewTokens: int = Field(default=512, ge=1, description="Tokens generated when a request names none.")
    repetitionPenalty: float = Field(default=1.0, gt=0, description="CTRL-style repetition penalty.")


class GenerationSpec(_Model):
    chinese: ChineseSpec = Field(default_factory=ChineseSpec, description="Chinese steering defaults.")
    defaults: GenerationDefaults = Field(
        default_factory=GenerationDefaults, description="Sampling defaults for requests."
    )


class MemoryReleaseSpec(_Model):
    idleSeconds: int = Field(
        default=300, ge=0, description="Release cached GPU memory after this long idle; 0 disables."
    )
    highWatermark: float = Field(
        default=0.9, gt=0, le=1, description="Release when reserved memory passes this share of the budget."
    )
    sleepAfterIdleSeconds: int = Field(
        default=0,
        ge=0,
        description="Put the worker to sleep (sleepLevel) after this long without a request; 0 never.",
    )
    sleepLevel: int = Field(
        default=1,
        ge=1,
        le=2,
        description="Sleep level after sleepAfterIdleSeconds: 1 moves the weights to CPU memory and frees "
        "the KV cache and the allocator's cache; 2 frees the weights too (reloaded from the model files "
        "on wake).",
    )
    wakeOnRequest: bool = Field(
        default=True,
        description="A request to a sleeping worker wakes it (and waits for it); false: it is answered 503 "
        "with Retry-After until POST /v1/admin/wake_up.",
    )


class EstimationSpec(_Model):
    overheadPerGPU: Quantity | None = Field(
        default=None,
        description="CUDA context, kernels and library workspaces per GPU; unset means "
        f"{DEFAULT_OVERHEAD_PER_GPU} (1.25 GiB).",
    )
    communicationPerGPU: Quantity | None = Field(
        default=None,
        description="NCCL buffers per GPU of a replica spread over several nodes (tensor-parallel "
        f"all-reduce and pipeline send/receive); unset means {DEFAULT_COMMUNICATION_PER_GPU}. Single-node "
        "replicas hold none.",
    )
    fragmentation: float = Field(
        default=DEFAULT_FRAGMENTATION,
        ge=0,
        le=1,
        description="Headroom for allocator rounding, as a share of the dynamic memory.",
    )
    useCalibration: bool = Field(
        default=False, description="Use the activation coefficient refitted from the workers' measurements."
    )


class WorkerSpec(_Model):
    image: str = Field(default=DEFAULT_WORKER_IMAGE, min_length=1, description="Worker container image.")
    resources: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra container resources (cpu, memory); nvidia.com/gpu is set by the plan.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    env: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra environment variables (Kubernetes EnvVar objects).",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )


class LLMDeploymentSpec(_Model):
    """Desired state of an LLMDeployment."""

    replicas: int = Field(default=1, ge=0, le=1000, description="Number of worker replicas.")
    model: ModelSpec = Field(description="The model to serve and where its facts come from.")
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec, description="Weight and KV precision.")
    serving: ServingSpec = Field(
        default_factory=ServingSpec, description="Serving limits the VRAM is sized for."
    )
    placement: PlacementSpec = Field(default_factory=PlacementSpec, description="Where replicas may run.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="Generation defaults.")
    memoryRelease: MemoryReleaseSpec = Field(
        default_factory=MemoryReleaseSpec, description="When workers hand cached GPU memory back."
    )
    estimation: EstimationSpec = Field(default_factory=EstimationSpec, description="Estimator overrides.")
    worker: WorkerSpec = Field(default_factory=WorkerSpec, description="The worker pods.")


# ----------------------------------------------------------------------------------------- status


class Condition(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(description="Planned, Scheduled or Ready.")
    status: str = Field(
        description="True, False or Unknown.", json_schema_extra={"enum": ["True", "False", "Unknown"]}
    )
    reason: str = Field(default="", description="CamelCase reason.")
    message: str = Field(default="", description="What happened, with the numbers.")
    lastTransitionTime: str | None = Field(default=None, description="RFC 3339 time of the last change.")
    observedGeneration: int | None = Field(default=None, description="Generation the condition was set for.")


class EstimateStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    parameters: int = Field(description="Parameters of the model (tied weights counted once).")
    weightsBytes: int = Field(description="Bytes of the weights at the chosen precision.")
    kvCacheBytesPerToken: int = Field(description="KV cache bytes per token (all layers).")
    kvCacheBytes: int = Field(description="KV cache bytes at maxSequenceLength x maxBatchSize.")
    activationBytes: int = Field(description="Activation workspace bytes at the serving limits.")
    overheadBytesPerGPU: int = Field(description="CUDA context and library workspaces per GPU.")
    totalBytes: int = Field(description="Everything for one replica on one GPU.")


class GroupPodStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    node: str = Field(description="Node the pod is planned on.")
    gpus: list[int] = Field(description="Node GPU indices it reserves.")


class PlacementStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    node: str = Field(description="Node the replica is planned on (a multi-node replica's leader's).")
    gpus: list[int] = Field(description="Node GPU indices the plan reserves.")
    budgets: dict[str, int] = Field(description="Per pod GPU index (and cpu/disk): bytes reserved.")
    pods: list[GroupPodStatus] | None = Field(
        default=None, description="A multi-node replica's pods, leader first: node and GPUs of each."
    )


class AutoscalingStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    pendingReplicas: int = Field(default=0, description="Replicas that could not be placed.")
    gpuClass: str | None = Field(default=None, description="Smallest GPU class that would fit them.")
    minGpuMemoryMiB: int | None = Field(default=None, description="Per-GPU memory the pending pods ask for.")
    gpuCount: int | None = Field(default=None, description="GPUs per pending replica (per node of a group).")
    nodeCount: int | None = Field(
        default=None,
        description="Nodes of the class one pending replica spans (1, or a multi-node group's size).",
    )
    reason: str | None = Field(default=None, description="Why they could not be placed, with the numbers.")


class LLMDeploymentStatus(BaseModel):
    """Observed state, written by the operator and (``workers``) by the worker pods."""

    model_config = ConfigDict(extra="allow")

    phase: str | None = Field(
        default=None,
        description="Pending, Planned, Scheduling, Running, Degraded or Failed.",
    )
    observedGeneration: int | None = Field(default=None, description="Last generation reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Planned, Scheduled, Ready.")
    replicas: int | None = Field(default=None, description="Replicas planned (scale subresource).")
    readyReplicas: int | None = Field(default=None, description="Replicas serving.")
    selector: str | None = Field(default=None, description="Label selector of the worker pods (for HPA).")
    vramPerReplica: str | None = Field(default=None, description="Planned VRAM per replica, for people.")
    estimate: EstimateStatus | None = Field(default=None, description="The VRAM estimate, in bytes.")
    placements: list[PlacementStatus] = Field(default_factory=list, description="Where each replica runs.")
    workers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per worker pod: allocator statistics it reports.",
        json_schema_extra={
            "additionalProperties": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        },
    )
    calibration: dict[str, Any] | None = Field(
        default=None,
        description="Predicted vs measured peak per GPU and the refitted activation coefficient.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="Signal for the cluster autoscaler."
    )
    resourceAPI: str | None = Field(
        default=None, description="How the workers ask for GPUs now: devicePlugin or dra."
    )


class LLMDeployment(BaseModel):
    """An LLM served by kubevram workers, placed by GPU memory."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    apiVersion: str = Field(default=API_VERSION)
    kind: str = Field(default=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LLMDeploymentSpec
    status: LLMDeploymentStatus | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace") or "default")
