"""Multi-head latent attention (DeepSeek-V2/V3, transformers 5.23 `DeepseekV3Attention`).

KV cache: one buffer per layer with one row per slot, ``latent ‖ k_pe`` of width
``kv_lora_rank + qk_rope_head_dim`` (the normalized compressed KV and the roped shared key),
the layout of SGLang's MLA pool. FlashInfer's `BatchMLAPagedAttentionWrapper` reads it as
two views, ``buf[..., :kv_lora_rank]`` (ckv) and ``buf[..., kv_lora_rank:]`` (kpe).

Attention runs in the absorbed form FlashInfer computes, so a GPU backend replaces exactly
the middle of it: q_nope is folded through W_UK (per head, from `kv_b_proj`) into latent
space; the kernel scores ``q_latent·ckv + q_pe·kpe``, softmaxes and returns the weighted
sum of ckv [rows, heads, kv_lora_rank]; W_UV maps that to per-head values. The batch's
attention backend computes the middle (`AttentionBackend.forward_mla`).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from engine.model_api import MLASpec, ModelContext
from engine.model_api.config import rope_parameters
from engine.model_api.forward_batch import ForwardBatch
from models.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    linear_shapes,
)
from models.layers.norm import RMSNorm
from models.layers.rotary import RotaryEmbedding, yarn_softmax_scale

# transformers builds q_a_layernorm / kv_a_layernorm with the RMSNorm default, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


class MLAAttention(nn.Module):
    """Heads sharded over attention-TP; the output is all-reduced over it (every rank of
    the group ends with the full attention output of all rows)."""

    def __init__(self, config: types.SimpleNamespace, layer_id: int, ctx: ModelContext) -> None:
        super().__init__()
        hidden, bias = config.hidden_size, getattr(config, "attention_bias", False)
        group = ctx.parallel.attn_tp
        self.layer_id = layer_id
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        heads = config.num_attention_heads
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * qk_dim, group)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_dim, group)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope_dim, bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_lora_rank, heads * (self.nope_dim + self.v_dim), group
        )
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, group, bias)
        self.num_heads = self.kv_b_proj.weight.shape[0] // (self.nope_dim + self.v_dim)
        rope = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(
            self.rope_dim,
            rope,
            config.max_position_embeddings,
            interleaved=getattr(config, "rope_interleave", True),
        )
        self.scaling = yarn_softmax_scale(rope, qk_dim**-0.5)
        self.spec = MLASpec(self.num_heads, self.kv_lora_rank, self.rope_dim, self.scaling)

    def kv_cache_shapes(self) -> list[tuple[int, ...]]:
        return [(1, self.kv_lora_rank + self.rope_dim)]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [heads, nope_dim, kv_lora_rank] and W_UV [heads, v_dim, kv_lora_rank]:
        views of this rank's `kv_b_proj` rows, which are whole heads."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, -1)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """[rows, hidden] -> [rows, hidden], reduced over attention-TP."""
        rows = hidden.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        head = self.nope_dim + self.rope_dim
        q_nope, q_pe = q.view(rows, self.num_heads, head).split([self.nope_dim, self.rope_dim], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope_dim], -1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe.unsqueeze(1))
        kv = torch.cat([latent.unsqueeze(1), k_pe], dim=-1)
        batch.kv_pool.store(self.layer_id, batch.out_cache_loc, kv)

        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("rhd,hdc->rhc", q_nope, w_uk)
        o_latent = batch.attn_backend.forward_mla(q_latent, q_pe, self.layer_id, self.spec, batch)
        out = torch.einsum("rhc,hvc->rhv", o_latent, w_uv)
        return self.o_proj(out.reshape(rows, self.num_heads * self.v_dim))


def mla_shapes(config: types.SimpleNamespace, prefix: str) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of `MLAAttention` named `prefix` (``attention_bias`` gives
    only the replicated down-projections and `o_proj` a bias, as in transformers)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    bias = getattr(config, "attention_bias", False)
    nope, rope, v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    q_rank, kv_rank = config.q_lora_rank, config.kv_lora_rank
    if q_rank is None:
        shapes = linear_shapes(prefix + "q_proj.", hidden, heads * (nope + rope))
    else:
        shapes = (
            linear_shapes(prefix + "q_a_proj.", hidden, q_rank, bias)
            | {prefix + "q_a_layernorm.weight": (q_rank,)}
            | linear_shapes(prefix + "q_b_proj.", q_rank, heads * (nope + rope))
        )
    return (
        shapes
        | linear_shapes(prefix + "kv_a_proj_with_mqa.", hidden, kv_rank + rope, bias)
        | {prefix + "kv_a_layernorm.weight": (kv_rank,)}
        | linear_shapes(prefix + "kv_b_proj.", kv_rank, heads * (nope + v_dim))
        | linear_shapes(prefix + "o_proj.", heads * v_dim, hidden, bias)
    )
