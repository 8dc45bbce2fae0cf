"""Where a launch's model comes from: `--model ARCH` (the class's embedded tiny config) or
`--model-path DIR` (its config.json), resolved in the front end before any rank starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from engine.messages import ModelSource
from registry import get_model_class


class ModelSourceError(ValueError):
    """A model that cannot be located or described; reported before any rank starts."""


def model_source(model: str | None, model_path: str | None) -> ModelSource:
    """From `--model ARCH` (embedded tiny config) or `--model-path DIR` (its config.json)."""
    if model_path is None:
        return ModelSource(model, dict(get_model_class(model).tiny_config()), None)
    file = Path(model_path) / "config.json"
    if not file.is_file():
        raise ModelSourceError(f"{model_path}: no config.json there (is it a checkpoint folder?)")
    config = _read_json(file)
    archs = config.get("architectures")
    if not archs or not isinstance(archs[0], str):
        raise ModelSourceError(f"{file}: no 'architectures' list naming the model class")
    get_model_class(archs[0])
    # generation stops where transformers' generate stops: generation_config.json first
    generation = Path(model_path) / "generation_config.json"
    if generation.is_file():
        eos = _read_json(generation).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    return ModelSource(archs[0], config, str(model_path))


def with_context(source: ModelSource, context_length: int | None) -> ModelSource:
    """`source`, served at `--context-length` when given; longer than the model's is refused."""
    if context_length is None or context_length == source.context_len:
        return source
    if context_length > source.context_len:
        raise ModelSourceError(
            f"--context-length {context_length}: longer than {source.architecture}'s "
            f"max_position_embeddings ({source.context_len})"
        )
    return attrs.evolve(source, served_context=context_length)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelSourceError(f"{file}: expected a JSON object")
    return value
