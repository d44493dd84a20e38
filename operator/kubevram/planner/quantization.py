"""Pre-quantized checkpoints: ``quantization_config`` decides the bytes of each quantized weight.

A ``config.json`` with a ``quantization_config`` describes weights already stored quantized; transformers
loads them as they are, whatever ``precision.weights`` says, and the layers the method leaves alone
(embeddings, norms, the output head, routers, listed exclusions) stay in the compute dtype. Per weight
matrix of ``out x in`` (``g`` the group size, ``b`` the bits), the tensors each method's loader creates:

=====================  =====================================================================================
method                 tensors per Linear (source)
=====================  =====================================================================================
fp8 (block-wise)       weight float8 ``out x in`` + float32 ``weight_scale_inv`` of ``ceil(out/B0) x
                       ceil(in/B1)`` (transformers ``FineGrainedFP8``; DeepSeek-V3's checkpoint)
awq (GEMM)             int32 ``qweight`` ``in x out*b/32``, int32 ``qzeros`` ``in/g x out*b/32``, float16
                       ``scales`` ``in/g x out`` (AutoAWQ ``WQLinear_GEMM``)
gptq                   int32 ``qweight`` ``in*b/32 x out``, int32 ``qzeros`` ``in/g x out*b/32``, float16
                       ``scales`` ``in/g x out``, int32 ``g_idx`` of ``in`` (AutoGPTQ / GPTQModel)
bitsandbytes           as ``precision.weights`` int8 (LLM.int8) / int4 (NF4; double quantization adds
                       its nested statistics)
compressed-tensors     pack-quantized: int32 ``weight_packed`` ``out x in*b/32``, ``weight_scale`` ``out x
                       in/g`` in the compute dtype, int64 ``weight_shape`` (2), int32 ``weight_zero_point``
                       when asymmetric; float-quantized (FP8): float8 ``weight`` + ``weight_scale`` (per
                       channel ``out``, per tensor 1) in float32 (vLLM's ``compressed_tensors`` scheme)
=====================  =====================================================================================

Biases stay in the compute dtype. Mixture-of-experts weights are quantized like any Linear by every
method except bitsandbytes (which quantizes ``nn.Linear`` only, not transformers 5's fused 3-D experts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubevram.api.errors import SpecError

METHODS = ("fp8", "awq", "gptq", "bitsandbytes", "compressed-tensors")
# Modules every method leaves in the compute dtype anyway (the head, MoE routers): excluding them
# changes nothing kubevram counts.
_ALWAYS_SKIPPED = ("lm_head", "output", "gate", "router", "output_layer", "embed")


@dataclass(frozen=True)
class Quantization:
    """How a pre-quantized checkpoint stores its Linear weights."""

    method: str  # fp8 | awq | gptq | bitsandbytes | compressed-tensors
    bits: int = 4
    group_size: int = 0  # 0: one group over the whole input dimension
    block: tuple[int, int] = (0, 0)  # fp8 block-wise scales
    zero_point: bool = True  # awq/gptq/compressed-tensors asymmetric: zero points stored
    desc_act: bool = False
    packed: bool = True  # compressed-tensors: pack-quantized (int) vs float-quantized (fp8)
    per_channel: bool = True  # compressed-tensors FP8: one scale per output row (else per tensor)
    double_quant: bool = False  # bitsandbytes NF4 nested statistics
    experts: bool = True  # fused 3-D expert weights are quantized too

    @property
    def precision(self) -> str | None:
        """The ``precision.weights`` a bitsandbytes checkpoint implies (None: a float dtype is expected)."""
        if self.method == "bitsandbytes":
            return "int4" if self.bits == 4 else "int8"
        return None

    def describe(self) -> str:
        return f"{self.method}, {self.bits}-bit"

    def linear_bytes(
        self, out_features: int, in_features: int, count: int, bias: bool, dtype_bytes: int
    ) -> int:
        """Bytes of ``count`` quantized ``out x in`` matrices (and their biases, in the compute dtype)."""
        biases = count * out_features * dtype_bytes if bias else 0
        n = out_features * in_features
        if self.method == "fp8":
            b0, b1 = self.block
            scales = _ceil(out_features, b0) * _ceil(in_features, b1) if b0 and b1 else 1
            return count * (n + 4 * scales) + biases
        groups = _ceil(in_features, self.group_size) if self.group_size > 0 else 1
        packed = _ceil(n * self.bits, 32) * 4
        zeros = groups * _ceil(out_features * self.bits, 32) * 4 if self.zero_point else 0
        if self.method == "awq":
            return count * (packed + zeros + groups * out_features * 2) + biases
        if self.method == "gptq":
            return count * (packed + zeros + groups * out_features * 2 + 4 * in_features) + biases
        if self.method == "compressed-tensors":
            if not self.packed:  # FP8 weights with float32 scales
                return count * (n + 4 * (out_features if self.per_channel else 1)) + biases
            scales = out_features * groups * dtype_bytes
            return count * (packed + scales + 16 + zeros) + biases
        raise ValueError(f"{self.method!r} is not one of {', '.join(METHODS)}")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def quantization_from_config(config: Mapping[str, Any], where: str) -> Quantization | None:
    """The ``Quantization`` of a pre-quantized checkpoint's config (None when it has none)."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    field = f"{where}.quantization_config"
    if not isinstance(qc, Mapping):
        raise SpecError(field, f"{qc!r} is not an object")
    method = qc.get("quant_method")
    if method not in METHODS:
        raise SpecError(
            f"{field}.quant_method",
            f"{method!r} is not a quantization kubevram can size ({', '.join(METHODS)})",
        )
    _check_exclusions(qc, field)
    if method == "fp8":
        block = qc.get("weight_block_size") or [0, 0]
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block)):
            raise SpecError(f"{field}.weight_block_size", f"{block!r} is not [rows, columns]")
        return Quantization("fp8", bits=8, block=(block[0], block[1]))
    if method in ("awq", "gptq"):
        bits = _int(qc, "bits", 4, field)
        return Quantization(
            str(method),
            bits=bits,
            group_size=_int(qc, "group_size", 128, field, allow_negative=True),
            zero_point=bool(qc.get("zero_point", True)) if method == "awq" else True,
            desc_act=bool(qc.get("desc_act", False)),
        )
    if method == "bitsandbytes":
        four = bool(qc.get("load_in_4bit"))
        if not four and not qc.get("load_in_8bit"):
            raise SpecError(field, "bitsandbytes without load_in_4bit or load_in_8bit")
        kind = qc.get("bnb_4bit_quant_type", "nf4")
        if four and kind not in ("nf4", "fp4"):
            raise SpecError(f"{field}.bnb_4bit_quant_type", f"{kind!r} is not nf4 or fp4")
        return Quantization(
            "bitsandbytes",
            bits=4 if four else 8,
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)) and four,
            experts=False,
        )
    return _compressed_tensors(qc, field)


def _compressed_tensors(qc: Mapping[str, Any], field: str) -> Quantization:
    groups = qc.get("config_groups") or {}
    found = (
        [g.get("weights") for g in groups.values() if isinstance(g, Mapping)]
        if isinstance(groups, Mapping)
        else []
    )
    schemes: list[Mapping[str, Any]] = [s for s in found if isinstance(s, Mapping)]
    if len(schemes) != 1:
        raise SpecError(
            f"{field}.config_groups", "kubevram sizes one weight scheme (one config group with weights)"
        )
    weights = schemes[0]
    bits = _int(weights, "num_bits", 4, f"{field}.config_groups")
    kind = weights.get("type", "int")
    strategy = weights.get("strategy", "group")
    symmetric = bool(weights.get("symmetric", True))
    if kind == "float":
        if bits != 8 or strategy not in ("channel", "tensor"):
            raise SpecError(f"{field}.config_groups", f"float {bits}-bit {strategy!r} weights are not sized")
        return Quantization("compressed-tensors", bits=8, packed=False, per_channel=strategy == "channel")
    group = _int(weights, "group_size", 128, f"{field}.config_groups") if strategy == "group" else 0
    return Quantization("compressed-tensors", bits=bits, group_size=group, zero_point=not symmetric)


def _int(qc: Mapping[str, Any], key: str, default: int, field: str, allow_negative: bool = False) -> int:
    value = qc.get(key, default)
    if value is None:
        value = default
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (value <= 0 and not (allow_negative and value == -1))
    ):
        raise SpecError(f"{field}.{key}", f"{value!r} is not a positive integer")
    return value


def _check_exclusions(qc: Mapping[str, Any], field: str) -> None:
    """Exclusion lists name modules left unquantized; kubevram counts the head, embeddings and routers
    unquantized already and cannot follow other names."""
    for key in ("modules_to_not_convert", "ignore", "llm_int8_skip_modules"):
        names = qc.get(key) or []
        if not isinstance(names, list):
            raise SpecError(f"{field}.{key}", f"{names!r} is not a list of module names")
        for name in names:
            tail = str(name).removeprefix("re:").rstrip("$").split(".")[-1].strip("*")
            if not any(tail.endswith(skip) for skip in _ALWAYS_SKIPPED):
                raise SpecError(
                    f"{field}.{key}",
                    f"{name!r}: kubevram counts only the head, embeddings and routers as unquantized",
                )


def check_precision(quantization: Quantization | None, weights: str, where: str) -> None:
    """``SpecError`` naming both when ``precision.weights`` contradicts a pre-quantized checkpoint."""
    if quantization is None:
        return
    implied = quantization.precision
    if implied is not None and weights != implied:
        raise SpecError(
            "spec.precision.weights",
            f"{weights!r} contradicts {where}.quantization_config ({quantization.describe()}): use {implied}",
        )
    if implied is None and weights in ("int8", "int4"):
        raise SpecError(
            "spec.precision.weights",
            f"{weights!r} contradicts {where}.quantization_config ({quantization.describe()}): the "
            f"checkpoint is already quantized; give the compute dtype of its other layers "
            f"(float16 or bfloat16)",
        )
