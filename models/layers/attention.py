"""Attention over the paged KV cache and the backends that compute it.

A step's rows are laid out request by request (`extend_lens[i]` new tokens each), then
padding. `Attention` writes the step's K/V at `batch.out_cache_loc` and asks the batch's
backend for the output; the backend reads each request's whole context through
`batch.req_to_token`. The engine calls `backend.prepare(batch)` once per step, before the
forward, so per-step metadata (index plans, CUDA-graph buffers) is built once for all layers.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.forward_batch import ForwardBatch


class AttentionBackend:
    def prepare(self, batch: ForwardBatch) -> None:
        raise NotImplementedError

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: Attention,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """q [rows, heads, head_dim] -> [rows, heads, v_head_dim]; K/V are already in the pool."""
        raise NotImplementedError


class Attention(nn.Module):
    """Head counts are this rank's shares."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scaling: float,
        layer_id: int,
        v_head_dim: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.v_head_dim = v_head_dim or head_dim
        self.scaling = scaling
        self.layer_id = layer_id

    def kv_cache_shapes(self) -> list[tuple[int, ...]]:
        return [(self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.v_head_dim)]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """q/k/v with one row per batch row; returns [rows, num_heads * v_head_dim]."""
        rows = q.shape[0]
        q = q.reshape(rows, self.num_heads, self.head_dim)
        k = k.reshape(rows, self.num_kv_heads, self.head_dim)
        v = v.reshape(rows, self.num_kv_heads, self.v_head_dim)
        batch.kv_pool.store(self.layer_id, batch.out_cache_loc, k, v)
        out = batch.attn_backend.forward(q, k, v, self, batch)
        return out.reshape(rows, self.num_heads * self.v_head_dim)


class TorchAttentionBackend(AttentionBackend):
    """Eager per-request attention for CPU and tests; any head layout, GQA, cached prefixes."""

    def __init__(self) -> None:
        self._batch: ForwardBatch | None = None
        self._requests: list[tuple[int, int, int, int]] = []

    def prepare(self, batch: ForwardBatch) -> None:
        rows, plan = 0, []
        req_rows = batch.req_pool_indices.tolist()
        for req_row, seq_len, extend_len in zip(
            req_rows, batch.seq_lens, batch.extend_lens, strict=True
        ):
            plan.append((rows, extend_len, req_row, seq_len))
            rows += extend_len
        if rows != batch.num_tokens:
            raise ValueError(
                f"extend_lens sum to {rows} rows, but the batch has {batch.num_tokens} tokens"
            )
        self._batch, self._requests = batch, plan

    def context_slots(self, batch: ForwardBatch, req_row: int, seq_len: int) -> torch.Tensor:
        return batch.req_to_token[req_row, :seq_len]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: Attention,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        if self._batch is not batch:
            raise RuntimeError("TorchAttentionBackend.prepare(batch) was not called for this batch")
        k_buf, v_buf = batch.kv_pool.layer(layer.layer_id)
        out = q.new_zeros(q.shape[0], layer.num_heads, layer.v_head_dim)
        for start, extend_len, req_row, seq_len in self._requests:
            slots = self.context_slots(batch, req_row, seq_len)
            out[start : start + extend_len] = causal_attention(
                q[start : start + extend_len], k_buf[slots], v_buf[slots], layer.scaling
            )
        return out


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The last q.shape[0] tokens of a context attending to k/v [context, kv_heads, dim]."""
    new, context = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1).transpose(0, 1)
    v = v.float().repeat_interleave(groups, dim=1).transpose(0, 1)
    scores = torch.matmul(q.float().transpose(0, 1), k.transpose(1, 2)) * scaling
    query_pos = torch.arange(context - new, context, device=q.device)
    visible = torch.arange(context, device=q.device)[None, :] <= query_pos[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(0, 1).to(q.dtype)
