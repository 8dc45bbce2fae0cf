"""The attention backend interface: what the graph runner and the layers call.

A step's rows are laid out request by request (`extend_lens[i]` new tokens each), then
padding. A layer writes the step's K/V at `batch.out_cache_loc` and asks the batch's
backend for the output; the backend reads each request's whole context through
`batch.req_to_token`. The engine plans the backend once per step, before the forward, so
per-step metadata (index plans, CUDA-graph buffers) is built once for all layers:

- eager step: `plan(batch)`;
- CUDA graphs: `plan_capture(batch)` before a graph of `batch.rows` rows is recorded, and
  `plan_replay(batch)` before each replay, which refills that size's buffers in place.

Every backend answers both layer entries, `forward` (K and V buffers) and `forward_mla`
(one latent ‖ k_pe buffer), so backends are interchangeable; a backend computes in torch
what its kernels do not serve.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

import torch
from attrs import frozen

if TYPE_CHECKING:
    from engine.model_api.forward_batch import ForwardBatch


@frozen
class AttentionSpec:
    """Multi-head / grouped-query attention over a K and a V buffer per layer; head counts
    are this rank's."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    scaling: float


@frozen
class MLASpec:
    """Multi-head latent attention over one ``latent ‖ k_pe`` buffer per layer, computed in
    the absorbed form (see `models.layers.mla`); heads are this rank's."""

    num_heads: int
    kv_lora_rank: int
    rope_dim: int
    scaling: float


class AttentionBackend(abc.ABC):
    name: ClassVar[str]
    supports_cuda_graph: ClassVar[bool] = False

    @classmethod
    def unavailable(cls, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why this backend cannot run in `dtype` on `device` at all, or None (checked in
        the front end, before any rank starts)."""
        return None

    @classmethod
    def unusable(
        cls, spec: AttentionSpec | MLASpec | None, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        """Why this backend cannot serve a model with `spec` in `dtype` on `device`, or None."""
        return cls.unavailable(dtype, device)

    @classmethod
    def create(
        cls,
        spec: AttentionSpec | MLASpec | None,
        dtype: torch.dtype,
        device: torch.device,
        max_slots: int,
    ) -> AttentionBackend:
        """The backend for a model with `spec`; `max_slots` bounds the KV slots one step
        reads (the pool's, plus one sink slot per padding row)."""
        return cls()

    @abc.abstractmethod
    def plan(self, batch: ForwardBatch) -> None:
        """Per-step metadata for an eager forward of `batch`."""

    def plan_capture(self, batch: ForwardBatch) -> None:
        """Metadata for recording a CUDA graph of `batch.rows` rows (a decode step)."""
        raise RuntimeError(f"the {self.name} attention backend cannot be captured")

    def plan_replay(self, batch: ForwardBatch) -> None:
        """Refill the buffers of the graph of `batch.rows` rows for `batch`, in place."""
        raise RuntimeError(f"the {self.name} attention backend cannot be captured")

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        spec: AttentionSpec,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """q [rows, heads, head_dim] -> [rows, heads, v_head_dim]; K/V are already in the pool."""

    @abc.abstractmethod
    def forward_mla(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        layer_id: int,
        spec: MLASpec,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """q_latent [rows, heads, kv_lora_rank], q_pe [rows, heads, rope_dim] ->
        attention-weighted latents [rows, heads, kv_lora_rank]."""
