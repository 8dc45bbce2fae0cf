"""Building parcap models in the test process (or in a spawned rank) without an engine."""

from __future__ import annotations

import types

import torch

from engine.model_api import ModelBase, ModelContext, MoeSettings
from engine.model_api.config import config_from_dict
from engine.model_api.parallel import get_parallel
from engine.runtime.loader import build_model, load_random


def build(
    cls: type[ModelBase],
    config: types.SimpleNamespace,
    ctx: ModelContext | None = None,
    dtype: torch.dtype = torch.float32,
) -> ModelBase:
    """`cls(config, ctx)` in `dtype` (one process, one rank when `ctx` is None)."""
    return build_model(cls, config, ctx or ModelContext.single(), dtype)


def tiny_random(cls: type[ModelBase], ctx: ModelContext | None = None) -> ModelBase:
    """`cls` at its tiny config with seeded random weights (seed 0)."""
    model = build(cls, config_from_dict(cls.tiny_config()), ctx)
    load_random(model, seed=0)
    return model


def rank_context(moe: MoeSettings | None = None) -> ModelContext:
    """The context of this spawned rank (after `init_parallel`)."""
    return ModelContext(get_parallel(), moe or MoeSettings())
