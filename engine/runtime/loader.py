"""Weights into a model built on this rank: checkpoint and seeded random sources, read shard
by shard, checked by name and shape against the model's `checkpoint_shapes`."""

from __future__ import annotations

import json
import math
import types
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from engine.model_api.config import tie_word_embeddings
from engine.model_api.contract import ModelBase, ModelContext
from engine.model_api.weights import CheckpointError, Weights, WeightSource

# Buffers some checkpoints carry that parcap recomputes.
_UNUSED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class SafetensorsSource:
    """Reads only the requested slice from the file; a read that fails names both."""

    def __init__(self, handle: object, name: str, file: Path) -> None:
        self.name, self.file = name, file
        self._slice = self._read(lambda: handle.get_slice(name))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * dim + [slice(start, start + length)]
        return self._read(lambda: self._slice[tuple(index)])

    def full(self) -> torch.Tensor:
        return self._read(lambda: self._slice[:])

    def _read(self, fn):
        try:
            return fn()
        except Exception as e:  # safetensors' own errors name neither the file nor the tensor
            raise CheckpointError(f"{self.name}: cannot be read from {self.file} ({e})") from e


class RandomSource:
    """A seeded tensor, generated whole so every shard of it agrees whatever the TP size;
    on a GPU `device` it is drawn there (fast for real model sizes; other values than the
    CPU's draw, the same on every GPU)."""

    def __init__(
        self, name: str, shape: tuple[int, ...], seed: int, device: torch.device | None = None
    ) -> None:
        self.name = name
        self._shape = tuple(shape)
        self.seed = seed
        self.device = device

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.full().narrow(dim, start, length)

    def full(self) -> torch.Tensor:
        return random_tensor(self.name, self._shape, self.seed, self.device)


def random_tensor(
    name: str, shape: tuple[int, ...], seed: int, device: torch.device | None = None
) -> torch.Tensor:
    """Norm weights near 1, biases near 0, matrices scaled by 1/sqrt(fan-in)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    generator = torch.Generator(device).manual_seed(
        (zlib.crc32(name.encode()) ^ seed) & (2**63 - 1)
    )
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    if len(shape) >= 2:
        return noise / math.sqrt(shape[-1])
    if "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]:
        return 1.0 + 0.1 * noise
    return 0.02 * noise


def random_weights(
    shapes: Mapping[str, tuple[int, ...]], seed: int, device: torch.device | None = None
) -> Iterator[tuple[str, RandomSource]]:
    for name, shape in shapes.items():
        yield name, RandomSource(name, tuple(shape), seed, device)


def iter_checkpoint(path: str | Path) -> Iterator[tuple[str, SafetensorsSource]]:
    """Every tensor of a safetensors checkpoint, single-file or sharded by an index."""
    from safetensors import safe_open

    for file in _checkpoint_files(Path(path)):
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:  # e.g. "incomplete metadata" for a truncated file
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            yield name, SafetensorsSource(handle, name, file)


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from e
        for file in files:
            if not (path / file).exists():
                raise CheckpointError(f"{file}: listed in {index.name} but missing from {path}")
        return [path / file for file in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors checkpoint there")
    return files


def load_model(model: ModelBase, weights: Weights) -> None:
    """Check `weights` against `model.checkpoint_shapes(model.config)`, then load them.

    A model may rename checkpoint tensors (`checkpoint_name(name)`, e.g. from a released
    checkpoint's naming to its own) and skip those it has no use for (`ignores_tensor`).

    Fails on the first unexpected or mis-shaped tensor, and after the last on a missing one.
    """
    expected = type(model).checkpoint_shapes(model.config)
    tied = tie_word_embeddings(model.config)
    seen = set()
    files: set[Path] = set()

    def checked() -> Iterator[tuple[str, WeightSource]]:
        for given, source in weights:
            name = model.checkpoint_name(given)
            file = getattr(source, "file", None)
            files.add(file)
            if name is None:
                continue
            where = "the checkpoint" if file is None else file
            if name in expected:
                if tuple(source.shape) != tuple(expected[name]):
                    raise CheckpointError(
                        f"{name}: shape {tuple(source.shape)} in {where}, "
                        f"{type(model).__name__} expects {tuple(expected[name])}"
                    )
                seen.add(name)
                yield name, source
            elif (
                name.endswith(_UNUSED_SUFFIXES)
                or (tied and name == "lm_head.weight")
                or model.ignores_tensor(name)
            ):
                continue
            else:
                raise CheckpointError(
                    f"{name}: unexpected tensor in {where} for {type(model).__name__}"
                )

    with torch.no_grad():
        model.load_weights(checked())
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        named = sorted(str(f) for f in files if f is not None)
        where = named[0] if len(named) == 1 else "the checkpoint"
        if len(named) > 1:
            where += f" ({len(named)} files in {Path(named[0]).parent})"
        raise CheckpointError(f"{missing[0]}: missing from {where}{more}")


def build_model(
    model_cls: type[ModelBase],
    config: types.SimpleNamespace,
    ctx: ModelContext,
    dtype: torch.dtype,
) -> ModelBase:
    """Instantiate with parameters allocated directly in `dtype` on the context's device
    (still unloaded)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(ctx.parallel.device):
            model = model_cls(config, ctx)
    finally:
        torch.set_default_dtype(previous)
    return model.requires_grad_(False).eval()


def load_checkpoint(model: ModelBase, path: str | Path) -> None:
    load_model(model, iter_checkpoint(path))


def load_random(model: ModelBase, seed: int) -> None:
    load_model(model, random_weights(type(model).checkpoint_shapes(model.config), seed))
