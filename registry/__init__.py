"""parcap's registry: model capabilities, the model registry and the parallel plan.

Imports neither torch (at module level), nor `engine`, nor `models`.
"""

from registry.args import PlanArgs, UsageError
from registry.capabilities import ParallelCapabilities
from registry.explain import explain, explain_json, list_json, show_json
from registry.models import (
    BUILTIN_MODELS,
    DuplicateName,
    ModelInfo,
    ModelLoadError,
    ModelRegistry,
    Registry,
    UnknownArchitecture,
    capabilities_of,
    get_model_class,
    get_model_info,
    model_registry,
    register_model,
    reset_model_registry,
)
from registry.plan import Decision, ParallelPlan, PlanRefused, resolve_plan

__all__ = [
    "BUILTIN_MODELS",
    "Decision",
    "DuplicateName",
    "ModelInfo",
    "ModelLoadError",
    "ModelRegistry",
    "ParallelCapabilities",
    "ParallelPlan",
    "PlanArgs",
    "PlanRefused",
    "Registry",
    "UnknownArchitecture",
    "UsageError",
    "capabilities_of",
    "explain",
    "explain_json",
    "get_model_class",
    "get_model_info",
    "list_json",
    "model_registry",
    "register_model",
    "reset_model_registry",
    "resolve_plan",
    "show_json",
]
