"""Attention in plain torch, per request over its cached context: any head layout, GQA,
MLA, cached prefixes. The CPU path, and what the GPU backends compute in torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.attention.base import AttentionBackend, AttentionSpec, MLASpec

if TYPE_CHECKING:
    from engine.model_api.forward_batch import ForwardBatch

# (first row, new tokens, table row, context length) per request of a step
RequestRows = list[tuple[int, int, int, int]]


def request_rows(batch: ForwardBatch) -> RequestRows:
    plan, start = [], 0
    for req_row, seq_len, new in zip(
        batch.req_pool_indices.tolist(), batch.seq_lens, batch.extend_lens, strict=True
    ):
        plan.append((start, new, req_row, seq_len))
        start += new
    if start != batch.num_tokens:
        raise ValueError(
            f"extend_lens sum to {start} rows, but the batch has {batch.num_tokens} tokens"
        )
    return plan


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        self._batch: ForwardBatch | None = None
        self._requests: RequestRows = []

    def plan(self, batch: ForwardBatch) -> None:
        self._batch, self._requests = batch, request_rows(batch)

    def _rows(self, batch: ForwardBatch) -> RequestRows:
        if self._batch is not batch:
            raise RuntimeError("TorchAttentionBackend.plan(batch) was not called for this batch")
        return self._requests

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        spec: AttentionSpec,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        return torch_attention(q, layer_id, spec, batch, self._rows(batch))

    def forward_mla(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        layer_id: int,
        spec: MLASpec,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        return torch_mla(q_latent, q_pe, layer_id, spec, batch, self._rows(batch))


def torch_attention(
    q: torch.Tensor, layer_id: int, spec: AttentionSpec, batch: ForwardBatch, rows: RequestRows
) -> torch.Tensor:
    """Each request's new rows attending causally to its cached K/V; padding rows stay 0."""
    k_buf, v_buf = batch.kv_pool.layer(layer_id)
    out = q.new_zeros(q.shape[0], spec.num_heads, spec.v_head_dim)
    for start, new, req_row, seq_len in rows:
        slots = batch.req_to_token[req_row, :seq_len]
        out[start : start + new] = causal_attention(
            q[start : start + new], k_buf[slots], v_buf[slots], spec.scaling
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


def torch_mla(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    layer_id: int,
    spec: MLASpec,
    batch: ForwardBatch,
    rows: RequestRows,
) -> torch.Tensor:
    """Causal attention of each request's new rows over its cached latents, in float32;
    padding rows stay zero."""
    (cache,) = batch.kv_pool.layer(layer_id)
    out = q_latent.new_zeros(q_latent.shape)
    for start, new, req_row, seq_len in rows:
        kv = cache[batch.req_to_token[req_row, :seq_len], 0].float()
        ckv, kpe = kv[:, : spec.kv_lora_rank], kv[:, spec.kv_lora_rank :]
        part = slice(start, start + new)
        scores = torch.einsum("qhc,kc->hqk", q_latent[part].float(), ckv)
        scores = (scores + torch.einsum("qhd,kd->hqk", q_pe[part].float(), kpe)) * spec.scaling
        query_pos = torch.arange(seq_len - new, seq_len, device=kv.device)
        visible = torch.arange(seq_len, device=kv.device)[None, :] <= query_pos[:, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[part] = torch.einsum("hqk,kc->qhc", probs, ckv).to(out.dtype)
    return out
