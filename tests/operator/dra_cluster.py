"""A DRA cluster for the tests: Nodes, ResourceSlices as NVIDIA's DRA driver publishes them, ResourceClaims,
DeviceClasses, and a CEL evaluator with Kubernetes' extensions that kubevram's selectors use.

Slices follow kubernetes-sigs/dra-driver-nvidia-gpu (``cmd/gpu-kubelet-plugin``): a whole GPU is named
``gpu-<minor>`` with attributes ``type: gpu``, ``uuid``, ``productName``, ``brand``, ``architecture``,
``cudaComputeCapability``, ``driverVersion`` and the capacity ``memory`` in bytes; a MIG device is named
``gpu-<minor>-mig-<profile without dots>-<profile id>-<placement start>`` with ``type: mig``, ``profile``,
``parentUUID`` and its own capacities (``memory``, ``multiprocessors``, ..., ``memorySlice<i>``); with
``--consumable-shares=memory`` every device has ``allowMultipleAllocations: true`` and a ``requestPolicy`` on
``memory`` (default: the whole memory, min and step 1Mi, max the memory rounded down to 1Mi), and with
``--consumable-shares=N`` also a capacity ``shares`` of N. The DeviceClasses are the driver chart's
``gpu.nvidia.com`` and ``mig.nvidia.com``.

The CEL evaluator (cel-python) registers Kubernetes' quantity library (``quantity``, ``isQuantity``,
``compareTo``, ``isGreaterThan``, ``isLessThan``, ``asInteger``) and the strings extension's ``replace`` as
k8s.io/apiserver/pkg/cel/library documents them; quantities are parsed by the kubernetes client's own
``parse_quantity``, not kubevram's. A Quantity is an opaque type: ``>=`` on it is an error, as in Kubernetes.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import celpy
import celpy.celtypes as ct
from kubernetes.utils import parse_quantity

DRIVER = "gpu.nvidia.com"
MiB, GiB = 2**20, 2**30

A100_80 = {
    "productName": "NVIDIA A100-SXM4-80GB",
    "architecture": "Ampere",
    "cc": "8.0.0",
    "memory": 81920 * MiB,
}
L4 = {"productName": "NVIDIA L4", "architecture": "Ada Lovelace", "cc": "8.9.0", "memory": 23034 * MiB}
H100 = {
    "productName": "NVIDIA H100 80GB HBM3",
    "architecture": "Hopper",
    "cc": "9.0.0",
    "memory": 81559 * MiB,
}

DEVICE_CLASSES = [
    {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {
            "selectors": [
                {
                    "cel": {
                        "expression": (
                            f"device.driver == '{DRIVER}' && device.attributes['{DRIVER}'].type == '{kind}'"
                        )
                    }
                }
            ]
        },
    }
    for name, kind in (("gpu.nvidia.com", "gpu"), ("mig.nvidia.com", "mig"))
]


def dra_node(
    name: str,
    *,
    cpu: str = "64",
    memory: str = "512Gi",
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """A Node of a DRA cluster: no GFD labels, no nvidia.com/gpu allocatable (the device plugin is off)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {"taints": taints or []},
        "status": {
            "capacity": {"cpu": cpu, "memory": memory},
            "allocatable": {"cpu": cpu, "memory": memory},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _string(value: str) -> dict[str, str]:
    return {"string": value}


def _version(value: str) -> dict[str, str]:
    return {"version": value}


def _gpu_attributes(gpu: dict[str, Any]) -> dict[str, Any]:
    """What a GPU and each of its MIG devices publish alike (``CommonAttributesMig`` copies the parent's)."""
    return {
        "productName": _string(gpu["productName"]),
        "brand": _string("Nvidia"),
        "architecture": _string(gpu["architecture"]),
        "cudaComputeCapability": _version(gpu["cc"]),
        "driverVersion": _version("580.82.7"),
        "cudaDriverVersion": _version("13.0.0"),
    }


def gpu_device(minor: int, gpu: dict[str, Any], *, shares: str | None = None) -> dict[str, Any]:
    """One whole GPU as ``GpuInfo.GetDevice`` publishes it, with ``applyConsumableShares`` when ``shares``
    is ``memory`` or an integer."""
    device: dict[str, Any] = {
        "name": f"gpu-{minor}",
        "attributes": {
            "type": _string("gpu"),
            "uuid": _string(f"GPU-{uuidlib.UUID(int=minor + 1)}"),
            **_gpu_attributes(gpu),
            "resource.kubernetes.io/pciBusID": _string(f"0000:{minor + 7:02x}:00.0"),
        },
        "capacity": {"memory": {"value": str(gpu["memory"])}},
    }
    return _consumable(device, shares)


def _consumable(device: dict[str, Any], shares: str | None) -> dict[str, Any]:
    if shares is None:
        return device
    device["allowMultipleAllocations"] = True
    memory = int(device["capacity"]["memory"]["value"])
    top = str(memory // MiB * MiB)
    device["capacity"]["memory"] = {
        "value": top,
        "requestPolicy": {
            "default": top if shares == "memory" else "0",
            "validRange": {"min": "1Mi" if shares == "memory" else "0", "max": top, "step": "1Mi"},
        },
    }
    if shares != "memory":
        device["capacity"]["shares"] = {
            "value": shares,
            "requestPolicy": {"default": "1", "validRange": {"min": "1", "max": shares, "step": "1"}},
        }
    return device


def mig_device(
    minor: int,
    parent: dict[str, Any],
    profile: str,
    profile_id: int,
    start: int,
    memory_mib: int,
    *,
    shares: str | None = None,
) -> dict[str, Any]:
    """One MIG device as ``MigDeviceInfo.GetDevice`` publishes it."""
    device = {
        "name": f"gpu-{minor}-mig-{profile.replace('.', '')}-{profile_id}-{start}",
        "attributes": {
            "type": _string("mig"),
            "uuid": _string(f"MIG-{uuidlib.UUID(int=1000 * (minor + 1) + start)}"),
            "parentUUID": _string(f"GPU-{uuidlib.UUID(int=minor + 1)}"),
            "profile": _string(profile),
            **_gpu_attributes(parent),
        },
        "capacity": {
            "multiprocessors": {"value": "14"},
            "copyEngines": {"value": "1"},
            "decoders": {"value": "0"},
            "encoders": {"value": "0"},
            "jpegEngines": {"value": "0"},
            "ofaEngines": {"value": "0"},
            "memory": {"value": str(memory_mib * MiB)},
            **{f"memorySlice{i}": {"value": "1"} for i in range(start, start + 1)},
        },
    }
    return _consumable(device, shares)


def resource_slice(node: str, devices: list[dict[str, Any]], *, generation: int = 1) -> dict[str, Any]:
    """The driver's ResourceSlice of one node (its pool is named after the node)."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-{DRIVER}-{generation}"},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
            "devices": devices,
        },
    }


def allocated_claim(
    name: str,
    node: str,
    devices: list[str],
    *,
    namespace: str = "default",
    consumed: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A ResourceClaim the scheduler allocated: ``devices`` of ``node`` (``consumed``: device ->
    consumedCapacity memory, for shared devices)."""
    results = []
    for i, device in enumerate(devices):
        result: dict[str, Any] = {"request": f"gpu-{i}", "driver": DRIVER, "pool": node, "device": device}
        if consumed and device in consumed:
            result["consumedCapacity"] = {"memory": consumed[device]}
            result["shareID"] = str(uuidlib.UUID(int=hash((name, device)) & (2**128 - 1)))
        results.append(result)
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "devices": {
                "requests": [
                    {"name": f"gpu-{i}", "exactly": {"deviceClassName": "gpu.nvidia.com"}}
                    for i in range(len(devices))
                ]
            }
        },
        "status": {
            "allocation": {
                "devices": {"results": results},
                "nodeSelector": {
                    "nodeSelectorTerms": [
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                    ]
                },
            }
        },
    }


RESOURCE = "/apis/resource.k8s.io/v1"


def serve(cluster: Any, slices: Sequence[dict[str, Any]], claims: Sequence[dict[str, Any]] = ()) -> None:
    """Publish ``slices``, the driver's DeviceClasses and ``claims`` on an emulated API server (what the
    driver, its chart and the scheduler would have written)."""
    for item in slices:
        cluster.create(f"{RESOURCE}/resourceslices", item)
    for item in DEVICE_CLASSES:
        cluster.create(f"{RESOURCE}/deviceclasses", item)
    for claim in claims:
        namespace = claim["metadata"].get("namespace") or "default"
        cluster.create(f"{RESOURCE}/namespaces/{namespace}/resourceclaims", claim)


# ------------------------------------------------------------------------------------------------- CEL


class Quantity:
    """Kubernetes' CEL Quantity: an opaque value, compared only through its methods."""

    def __init__(self, value: Decimal) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Quantity({self.value})"


def _quantity(text: Any) -> Quantity:
    return Quantity(Decimal(parse_quantity(str(text))))


def _is_quantity(text: Any) -> ct.BoolType:
    try:
        parse_quantity(str(text))
    except ValueError:
        return ct.BoolType(False)
    return ct.BoolType(True)


def _both(a: Any, b: Any) -> tuple[Decimal, Decimal]:
    if not isinstance(a, Quantity) or not isinstance(b, Quantity):
        raise TypeError(f"no such overload: {type(a).__name__}, {type(b).__name__}")
    return a.value, b.value


def _compare_to(a: Any, b: Any) -> ct.IntType:
    x, y = _both(a, b)
    return ct.IntType((x > y) - (x < y))


def _as_integer(a: Any) -> ct.IntType:
    if not isinstance(a, Quantity) or a.value != a.value.to_integral_value() or abs(a.value) >= 2**63:
        raise ValueError(f"cannot convert {a!r} to an int64")
    return ct.IntType(int(a.value))


def _replace(text: Any, old: Any, new: Any) -> ct.StringType:
    return ct.StringType(str(text).replace(str(old), str(new)))


FUNCTIONS = {
    "quantity": _quantity,
    "isQuantity": _is_quantity,
    "compareTo": _compare_to,
    "isGreaterThan": lambda a, b: ct.BoolType(_both(a, b)[0] > _both(a, b)[1]),
    "isLessThan": lambda a, b: ct.BoolType(_both(a, b)[0] < _both(a, b)[1]),
    "asInteger": _as_integer,
    "replace": _replace,
}
_ENV = celpy.Environment()


def _attribute_value(value: dict[str, Any]) -> Any:
    if "string" in value:
        return ct.StringType(value["string"])
    if "int" in value:
        return ct.IntType(value["int"])
    if "bool" in value:
        return ct.BoolType(value["bool"])
    return ct.StringType(value.get("version", ""))  # semver: compared as text here


def _domain(name: str, driver: str) -> tuple[str, str]:
    return tuple(name.split("/", 1)) if "/" in name else (driver, name)  # type: ignore[return-value]


def device_activation(device: dict[str, Any], driver: str = DRIVER) -> dict[str, Any]:
    """The CEL ``device`` variable for one device of a slice: driver, attributes and capacity by domain."""
    attributes: dict[str, dict[str, Any]] = {}
    for name, value in (device.get("attributes") or {}).items():
        domain, short = _domain(name, driver)
        attributes.setdefault(domain, {})[short] = _attribute_value(value)
    capacity: dict[str, dict[str, Any]] = {}
    for name, value in (device.get("capacity") or {}).items():
        domain, short = _domain(name, driver)
        capacity.setdefault(domain, {})[short] = _quantity(value["value"])

    def cel_map(values: dict[str, Any]) -> ct.MapType:
        return ct.MapType({ct.StringType(k): v for k, v in values.items()})

    return {
        "device": cel_map(
            {
                "driver": ct.StringType(driver),
                "attributes": cel_map({d: cel_map(v) for d, v in attributes.items()}),
                "capacity": cel_map({d: cel_map(v) for d, v in capacity.items()}),
                "allowMultipleAllocations": ct.BoolType(bool(device.get("allowMultipleAllocations"))),
            }
        )
    }


def evaluate(expression: str, device: dict[str, Any], driver: str = DRIVER) -> bool:
    """A DRA selector's CEL ``expression`` on one device; an error is raised, as the scheduler fails
    allocation on one."""
    program = _ENV.program(_ENV.compile(expression), functions=FUNCTIONS)
    result = program.evaluate(device_activation(device, driver))
    if not isinstance(result, ct.BoolType):
        raise TypeError(f"{expression!r} gave {result!r}, not a bool")
    return bool(result)


def selects(
    exactly: dict[str, Any],
    device: dict[str, Any],
    classes: list[dict[str, Any]] = DEVICE_CLASSES,
    driver: str = DRIVER,
) -> bool:
    """Whether a request's ``exactly`` (its DeviceClass's selectors and its own) selects ``device``."""
    (cls,) = [c for c in classes if c["metadata"]["name"] == exactly["deviceClassName"]]
    selectors = [*cls["spec"]["selectors"], *(exactly.get("selectors") or [])]
    return all(evaluate(s["cel"]["expression"], device, driver) for s in selectors)
