"""Weights as a model receives them: named sources, read whole or a slice at a time, placed
into parameters by each parameter's `weight_loader`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import torch
from torch import nn

Weights = Iterable[tuple[str, "WeightSource"]]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message starts with the tensor's name."""


class WeightSource(Protocol):
    """One named tensor that can be read whole or a slice at a time."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...

    def full(self) -> torch.Tensor: ...


class TensorSource:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.tensor.narrow(dim, start, length)

    def full(self) -> torch.Tensor:
        return self.tensor


def default_weight_loader(param: nn.Parameter, source: WeightSource) -> None:
    param.data.copy_(source.full())


def load_params(
    module: nn.Module, weights: Weights, packed: Mapping[str, tuple[str, object]] | None = None
) -> set[str]:
    """Load checkpoint tensors into parameters of the same name.

    `packed` maps a checkpoint module name to a fused parameter and its shard id
    (`q_proj` -> (`qkv_proj`, "q")); the parameter's `weight_loader` places the shard.
    """
    params = dict(module.named_parameters())
    loaded = set()
    for name, source in weights:
        param_name, shard = name, None
        for part, (fused, shard_id) in (packed or {}).items():
            if f".{part}." in name:
                param_name, shard = name.replace(f".{part}.", f".{fused}."), shard_id
                break
        param = params.get(param_name)
        if param is None:
            raise CheckpointError(f"{name}: no parameter {param_name} in {type(module).__name__}")
        loader = getattr(param, "weight_loader", default_weight_loader)
        if shard is None:
            loader(param, source)
        else:
            loader(param, source, shard)
        loaded.add(param_name)
    return loaded
