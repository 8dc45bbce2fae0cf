"""A checkpoint's config.json as the namespace models are built from."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch

DEFAULT_ROPE_THETA = 10_000.0
_ORIGINAL_LENGTH_ROPE_TYPES = ("llama3", "yarn", "longrope")


def config_from_dict(values: dict[str, Any]) -> types.SimpleNamespace:
    """Top-level keys become attributes; nested dicts stay dicts."""
    return types.SimpleNamespace(**values)


def load_config(path: str | Path) -> types.SimpleNamespace:
    """Read `path`/config.json (or `path` itself when it is a file)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        values = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json at {path}") from None
    return config_from_dict(values)


def head_dim(config: types.SimpleNamespace) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_kv_heads(config: types.SimpleNamespace) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def tie_word_embeddings(config: types.SimpleNamespace) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def rope_parameters(config: types.SimpleNamespace) -> dict[str, Any]:
    """RoPE settings in transformers 5.x form, from `rope_parameters` or legacy `rope_scaling`.

    Same defaults as transformers' `standardize_rope_params`: `rope_type` from the legacy
    `type` key or "default", `rope_theta` from the top level, and the pre-training length
    for the types that scale from it.
    """
    params = dict(
        getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    )
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or DEFAULT_ROPE_THETA)
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    if params["rope_type"] in _ORIGINAL_LENGTH_ROPE_TYPES:
        original = getattr(config, "original_max_position_embeddings", None)
        if original is not None:
            params["original_max_position_embeddings"] = original
        else:
            params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return params


def checkpoint_dtype(config: types.SimpleNamespace) -> torch.dtype | None:
    """The dtype the checkpoint was saved in (`dtype`, or the older `torch_dtype`)."""
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config.json names an unknown dtype {name!r}")
    return dtype
