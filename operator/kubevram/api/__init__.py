"""The LLMDeployment API types (pure pydantic): spec, status, loading and errors."""

from kubevram.api.errors import SpecError
from kubevram.api.load import load_deployments, parse_deployment
from kubevram.api.v1alpha1 import API_VERSION, KIND, LLMDeployment, LLMDeploymentSpec

__all__ = [
    "API_VERSION",
    "KIND",
    "LLMDeployment",
    "LLMDeploymentSpec",
    "SpecError",
    "load_deployments",
    "parse_deployment",
]
