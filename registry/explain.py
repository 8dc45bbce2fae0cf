"""The JSON documents of `parcap registry list | show | explain` (also embedded by the engine)."""

from __future__ import annotations

from typing import Any

from registry.models import ModelInfo, ModelRegistry, model_registry
from registry.plan import ParallelPlan, resolve_plan


def explain_json(info: ModelInfo, plan: ParallelPlan) -> dict[str, Any]:
    """The explain document for a plan already resolved (the engine resolves once)."""
    return {
        "architecture": info.architecture,
        "declared_by": info.declared_by,
        "capabilities": info.capabilities.to_json(),
        "plan": plan.to_json(),
    }


def explain(architecture: str, args: Any, *, models: ModelRegistry | None = None) -> dict[str, Any]:
    """Load `architecture`, resolve its plan under `args`, return the explain document.

    Raises UnknownArchitecture, ModelLoadError, PlanRefused, or ValueError for bad args.
    """
    info = (models or model_registry()).load(architecture)
    return explain_json(info, resolve_plan(info.capabilities, args, model=architecture))


def show_json(info: ModelInfo) -> dict[str, Any]:
    return {
        "architecture": info.architecture,
        "class": info.path,
        "declared_by": info.declared_by,
        "capabilities": info.capabilities.to_json(),
        "origin": info.origin,
    }


def list_json(models: ModelRegistry | None = None) -> dict[str, Any]:
    """Every registered model with its declaration, and every entry that failed."""
    infos, errors = (models or model_registry()).scan()
    return {
        "models": [info.to_json() for info in infos],
        "errors": [e.to_json() for e in errors],
    }
