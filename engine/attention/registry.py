"""The attention backends by name (``--attention-backend``), and the choice for a launch.

`auto` takes FlashInfer on CUDA where it is installed and serves the model's attention,
else torch. Naming a backend that cannot serve the launch is an error, never a fallback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from registry.models import Registry

if TYPE_CHECKING:
    import torch

    from engine.attention.base import AttentionBackend, AttentionSpec, MLASpec

# name -> "module:Class", imported when chosen
BACKENDS: Registry[str] = Registry("attention backend")
BACKENDS.add("torch", "engine.attention.torch_backend:TorchAttentionBackend")
BACKENDS.add("flashinfer", "engine.attention.flashinfer:FlashInferBackend")
AUTO = "auto"
AUTO_ORDER = ("flashinfer", "torch")


class BackendUnavailable(ValueError):
    """The named attention backend cannot serve this launch."""


def choices() -> tuple[str, ...]:
    return (AUTO, *BACKENDS.names())


def backend_class(name: str) -> type[AttentionBackend]:
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def resolve(
    name: str,
    spec: AttentionSpec | MLASpec | None,
    dtype: torch.dtype,
    device: torch.device,
) -> str:
    """The backend `name` stands for (auto: the first usable one); raises
    BackendUnavailable with why a named one cannot serve."""
    if name != AUTO:
        why = backend_class(name).unusable(spec, dtype, device)
        if why is not None:
            raise BackendUnavailable(f"--attention-backend {name}: {why}")
        return name
    return next(n for n in AUTO_ORDER if backend_class(n).unusable(spec, dtype, device) is None)


def check_available(name: str, dtype: torch.dtype, device: torch.device) -> None:
    """Raise BackendUnavailable when the named backend cannot run here at all (auto can)."""
    if name != AUTO and (why := backend_class(name).unavailable(dtype, device)):
        raise BackendUnavailable(f"--attention-backend {name}: {why}")


def make_backend(
    name: str,
    spec: AttentionSpec | MLASpec | None,
    dtype: torch.dtype,
    device: torch.device,
    max_slots: int,
) -> AttentionBackend:
    """The backend for a model with `spec`; `max_slots` bounds the KV slots one CUDA-graph
    step reads (the pool's, plus one sink slot per padding row)."""
    return backend_class(resolve(name, spec, dtype, device)).create(spec, dtype, device, max_slots)
