"""``kubevram estimate``: resolve each deployment's model facts and print the estimate.

Where the model config comes from, first found wins: ``spec.model.config`` (inline), the CLI's
``--model-config``, then the built-in catalogue of published configs by ``spec.model.id``
(``spec.model.configMapRef`` is read by the operator, which passes the dict in as ``model_config``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.api.load import load_deployments
from kubevram.api.quantity import GiB
from kubevram.api.v1alpha1 import LLMDeployment
from kubevram.planner.catalog import known_config
from kubevram.planner.estimate import Estimate, Workload, estimate
from kubevram.planner.facts import ModelFacts, UnknownArchitecture, facts_from_config
from kubevram.planner.quantization import check_precision

# Called with (config, where) when the analytic path does not know the architecture; the CLI installs
# the transformers meta-device introspection here when transformers is importable.
Fallback = Callable[[Mapping[str, Any], str], ModelFacts]


def model_config_for(
    deployment: LLMDeployment, model_config: Mapping[str, Any] | None
) -> tuple[Mapping[str, Any], str]:
    """The config dict for ``deployment`` and the field it came from (for error messages)."""
    spec = deployment.spec
    if spec.model.config:
        return spec.model.config, "spec.model.config"
    if model_config is not None:
        return model_config, "--model-config"
    known = known_config(spec.model.id)
    if known is not None:
        return known, f"catalogue[{spec.model.id}]"
    ref = spec.model.configMapRef
    if ref is not None:
        raise SpecError(
            "spec.model.configMapRef",
            f"ConfigMap {ref.name!r} key {ref.key!r} can only be read in a cluster; pass --model-config",
        )
    raise SpecError(
        "spec.model.config",
        f"no config.json for model {spec.model.id!r}: give spec.model.config, spec.model.configMapRef or "
        f"--model-config (it is not in the built-in catalogue)",
    )


def resolve_facts(
    deployment: LLMDeployment, model_config: Mapping[str, Any] | None = None, fallback: Fallback | None = None
) -> ModelFacts:
    """Model facts of ``deployment``; ``SpecError`` names the field when they cannot be had."""
    config, where = model_config_for(deployment, model_config)
    try:
        facts = facts_from_config(config, where)
    except UnknownArchitecture:
        if fallback is None:
            raise
        facts = fallback(config, where)
    check_positions(facts, deployment.spec.serving.maxSequenceLength, where)
    check_precision(facts.quantization, str(deployment.spec.precision.weights), where)
    return facts


def check_positions(facts: ModelFacts, max_sequence_length: int, where: str) -> None:
    """``SpecError`` when ``maxSequenceLength`` passes the positions the model reaches (its
    ``max_position_embeddings``, extended by rope scaling where the config has it)."""
    limit = facts.position_limit
    if limit and max_sequence_length > limit:
        if facts.rope_scaling_factor > 1:
            reach = f"the {limit} positions its rope scaling reaches ({where}.rope_scaling)"
        else:
            reach = f"its max_position_embeddings {limit} ({where}.max_position_embeddings; no rope scaling)"
        raise SpecError(
            "spec.serving.maxSequenceLength",
            f"{max_sequence_length} is past what the model serves: {reach}",
        )


def estimate_deployment(
    deployment: LLMDeployment, model_config: Mapping[str, Any] | None = None, fallback: Fallback | None = None
) -> Estimate:
    return estimate(resolve_facts(deployment, model_config, fallback), Workload.from_spec(deployment.spec))


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def render_estimates(rows: list[tuple[str, Estimate]], output: str) -> str:
    if output == "json":
        return json.dumps([{"name": name, **est.to_json()} for name, est in rows], indent=2)
    lines = []
    for name, est in rows:
        lines += [
            f"{name}: {est.parameters / 1e9:.2f} B parameters, {est.dtype}, "
            f"{est.maxSequenceLength} tokens x {est.maxBatchSize} sequences",
            f"  {'weights':<28}{_gib(est.weightsBytes):>10} GiB",
            f"  {'KV cache':<28}{_gib(est.kvCacheBytes):>10} GiB   ({est.kvCacheBytesPerToken:,} B/token)",
            f"  {'activations (prefill)':<28}{_gib(est.activationBytes):>10} GiB",
            f"  {'CUDA context + workspaces':<28}{_gib(est.overheadBytesPerGPU):>10} GiB   (per GPU)",
            f"  {'allocator headroom':<28}{_gib(est.fragmentationBytes):>10} GiB",
            f"  {'total on one GPU':<28}{_gib(est.totalBytes):>10} GiB",
        ]
    return "\n".join(lines)


def estimate_command(
    text: str,
    source: str,
    model_config: Mapping[str, Any] | None,
    output: str,
    fallback: Fallback | None = None,
) -> str:
    """Everything ``kubevram estimate`` prints; raises ``SpecError`` (exit 2) on bad input."""
    rows = []
    for deployment in load_deployments(text, source):
        try:
            rows.append((deployment.name, estimate_deployment(deployment, model_config, fallback)))
        except SpecError as exc:
            where = ": ".join(part for part in (source, deployment.name) if part)
            raise SpecError(exc.field, exc.message, source=where) from None
    return render_estimates(rows, output)
