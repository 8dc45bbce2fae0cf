"""The model contract: what the engine calls on a model class and its instances, and the
build-time context every model is constructed with.

A model author subclasses `ModelBase`, registers the class (built in or through the
entry-point group ``parcap.models``) and may declare `parallel_capabilities`
(`registry.ParallelCapabilities`); the engine reads that declaration only through the
plan the registry resolves from it.
"""

from __future__ import annotations

import abc
import types
from typing import TYPE_CHECKING, Any

import torch
from attrs import frozen
from torch import nn

from engine.model_api.parallel import ParallelState

if TYPE_CHECKING:
    from engine.attention.base import AttentionSpec, MLASpec
    from engine.model_api.forward_batch import ForwardBatch
    from engine.model_api.weights import Weights

# How a KV-cache buffer is declared: the per-slot shape (the pool's dtype), or a shape
# and the dtype that buffer must keep (state that bf16 would lose keeps float32).
KVBufferSpec = tuple[int, ...] | tuple[tuple[int, ...], torch.dtype]


@frozen
class MoeSettings:
    """How MoE and dense MLP layers are built: ``--moe-a2a-backend``, ``--moe-dense-tp-size``."""

    a2a_backend: str = "none"
    dense_tp_size: int | None = None

    @classmethod
    def from_args(cls, args: Any) -> MoeSettings:
        return cls(args.moe_a2a_backend, args.moe_dense_tp_size)


@frozen
class Divides:
    """A config size that must split evenly over a parallel group ("tp" or "attn_tp"); with
    `either_way`, the group may instead split evenly over it (KV heads replicated when
    there are fewer than ranks)."""

    name: str
    value: int
    group: str
    either_way: bool = False

    def holds(self, size: int) -> bool:
        return self.value % size == 0 or (self.either_way and size % self.value == 0)


@frozen
class ModelContext:
    """Everything a model's constructor needs besides its config: the parallel layout its
    layers shard over and the MoE settings of the launch."""

    parallel: ParallelState
    moe: MoeSettings = MoeSettings()

    @classmethod
    def single(cls, device: torch.device | str = "cpu", moe: MoeSettings | None = None):
        """One process, one rank (tests, benchmarks, `parcap verify`'s reference)."""
        return cls(ParallelState.single(device), moe or MoeSettings())


class ModelBase(nn.Module, abc.ABC):
    """A causal LM as the engine runs it.

    - ``Model(config, ctx)``: `config` is the checkpoint's config.json (or `tiny_config()`)
      as a namespace; parameters are allocated in the launch's dtype on its device.
    - ``forward(batch)``: float32 logits [batch.batch_size, vocab] at `batch.sample_rows`,
      identical on every rank of the attention-TP group.
    - ``load_weights(weights)``: place every (checkpoint name, source) pair; the engine has
      checked the names and shapes against `checkpoint_shapes` first.
    - ``kv_cache_shapes()``: per layer, the per-slot buffers of the paged KV pool.
    - ``attention_spec()``: what the attention backend computes for every layer (None: the
      model's attention calls no backend and runs in torch).
    - ``tiny_config()`` / ``checkpoint_shapes(config)``: the embedded default config (byte
      tokenizer vocabulary) and every checkpoint tensor's name and shape.
    - ``parallel_constraints(config, moe)``: the config sizes that must split evenly over
      the TP or attention-TP group (`Divides`), checked before any rank starts.
    - ``checkpoint_name(name)``: the name a checkpoint tensor goes by in
      `checkpoint_shapes` (a model may accept several naming schemes), or None to skip it.
    - ``ignores_tensor(name)``: checkpoint tensors the model has no use for (e.g. MTP layers).
    """

    @abc.abstractmethod
    def __init__(self, config: types.SimpleNamespace, ctx: ModelContext) -> None:
        super().__init__()

    @abc.abstractmethod
    def forward(self, batch: ForwardBatch) -> torch.Tensor: ...

    @abc.abstractmethod
    def load_weights(self, weights: Weights) -> None: ...

    @abc.abstractmethod
    def kv_cache_shapes(self) -> list[list[KVBufferSpec]]: ...

    @abc.abstractmethod
    def attention_spec(self) -> AttentionSpec | MLASpec | None: ...

    @staticmethod
    @abc.abstractmethod
    def tiny_config() -> dict[str, Any]: ...

    @staticmethod
    @abc.abstractmethod
    def checkpoint_shapes(config: types.SimpleNamespace) -> dict[str, tuple[int, ...]]: ...

    @staticmethod
    def parallel_constraints(config: types.SimpleNamespace, moe: MoeSettings) -> list[Divides]:
        return []

    def checkpoint_name(self, name: str) -> str | None:
        return name

    def ignores_tensor(self, name: str) -> bool:
        return False
