"""The attention layer of GQA/MHA models: writes the step's K/V into the paged pool and asks
the batch's attention backend (`engine.model_api.AttentionBackend`) for the output."""

from __future__ import annotations

import torch
from torch import nn

from engine.model_api import AttentionSpec, ForwardBatch
from models.layers.rope_store import rope_and_store
from models.layers.rotary import RotaryEmbedding


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
        self.spec = AttentionSpec(
            num_heads, num_kv_heads, head_dim, v_head_dim or head_dim, scaling
        )
        self.layer_id = layer_id

    @property
    def num_heads(self) -> int:
        return self.spec.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.spec.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.spec.head_dim

    @property
    def v_head_dim(self) -> int:
        return self.spec.v_head_dim

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
        return self.attend(q, k, v, batch)

    def rope_and_attend(
        self,
        rotary: RotaryEmbedding,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """Rotate q and k at the step's positions, store k and v, attend: on CUDA one fused
        kernel does the first two (`rope_store`), else torch."""
        rows = q.shape[0]
        q = q.view(rows, self.num_heads, self.head_dim)
        k = k.view(rows, self.num_kv_heads, self.head_dim)
        table = rotary.fused_table(q)
        if table is None:
            q, k = rotary(batch.positions, q, k)
            return self.forward(q, k, v, batch)
        v = v.view(rows, self.num_kv_heads, self.v_head_dim)
        k_buf, v_buf = batch.kv_pool.layer(self.layer_id)
        rope_and_store(q, k, v, batch.positions, batch.out_cache_loc, table, k_buf, v_buf)
        return self.attend(q, k, v, batch)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        out = batch.attn_backend.forward(q, k, v, self.layer_id, self.spec, batch)
        return out.reshape(q.shape[0], self.num_heads * self.v_head_dim)
