"""Qwen3-MoE as transformers 5.23 `Qwen3MoeForCausalLM`: GQA attention with per-head q/k
RMSNorm, softmax top-k routed experts, dense MLP layers where the config says so.

Tensor-parallel through the engine's layer communicator (`engine.model_api.communicator`), so it
declares no capabilities: the plan's attn_tp_gather applies to it as is.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from engine.model_api import Divides, ForwardBatch, ModelContext, MoeSettings, Weights
from engine.model_api.config import head_dim
from models.causal_lm import TINY_COMMON, causal_lm_shapes, head_constraints, mlp_constraints
from models.layers.mlp import gated_mlp_shapes
from models.layers.moe import MoE
from models.layers.moe_weights import load_with_experts, moe_shapes
from models.layers.norm import RMSNorm
from models.layers.router import softmax_topk
from models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    llama_attention_shapes,
    llama_mlp,
)


def num_experts(config: types.SimpleNamespace) -> int:
    # transformers saves `num_experts` under its attribute-map name
    value = getattr(config, "num_experts", None)
    return int(getattr(config, "num_local_experts", 0) if value is None else value)


def is_sparse_layer(config: types.SimpleNamespace, layer_id: int) -> bool:
    return (
        layer_id not in (getattr(config, "mlp_only_layers", None) or [])
        and num_experts(config) > 0
        and (layer_id + 1) % getattr(config, "decoder_sparse_step", 1) == 0
    )


class Qwen3MoeAttention(LlamaAttention):
    """Llama's attention with an RMSNorm over each q and k head before RoPE."""

    def __init__(self, config: types.SimpleNamespace, layer_id: int, ctx: ModelContext) -> None:
        if getattr(config, "use_sliding_window", False):
            raise ValueError("Qwen3MoeForCausalLM: use_sliding_window is not supported")
        super().__init__(config, layer_id, ctx)
        dim, eps = head_dim(config), getattr(config, "rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(dim, eps)
        self.k_norm = RMSNorm(dim, eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """Partial sums over attention-TP ranks; the communicator reduces them."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = self.q_norm(q.reshape(-1, self.attn.num_heads, self.attn.head_dim))
        k = self.k_norm(k.reshape(-1, self.attn.num_kv_heads, self.attn.head_dim))
        return self.o_proj(self.attn.rope_and_attend(self.rotary_emb, q, k, v, batch))


class Qwen3MoeSparseMoeBlock(MoE):
    def __init__(self, config: types.SimpleNamespace, ctx: ModelContext) -> None:
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(
                f"Qwen3-MoE experts support hidden_act 'silu' (got {config.hidden_act!r})"
            )
        top_k = config.num_experts_per_tok
        renormalize = bool(getattr(config, "norm_topk_prob", False))
        super().__init__(
            config.hidden_size,
            num_experts(config),
            config.moe_intermediate_size,
            route=lambda logits, num_valid: softmax_topk(logits, top_k, renormalize, num_valid),
            ctx=ctx,
        )


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3MoeAttention

    def is_moe_layer(self, config: types.SimpleNamespace, layer_id: int) -> bool:
        return is_sparse_layer(config, layer_id)

    def make_mlp(self, config: types.SimpleNamespace, ctx: ModelContext) -> nn.Module:
        return Qwen3MoeSparseMoeBlock(config, ctx) if self.is_moe else llama_mlp(config, ctx)

    def run_mlp(
        self, hidden: torch.Tensor, num_valid: int | torch.Tensor | None, batch: ForwardBatch
    ):
        if self.is_moe:
            return self.mlp(hidden, num_valid, batch.max_rows_per_rank)
        return self.mlp(hidden)


class Qwen3MoeModel(LlamaModel):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3MoeModel

    def load_weights(self, weights: Weights) -> None:
        load_with_experts(self, weights, self.packed_modules_mapping)

    @staticmethod
    def parallel_constraints(config: types.SimpleNamespace, moe: MoeSettings) -> list[Divides]:
        layers = range(config.num_hidden_layers)
        dense = any(not is_sparse_layer(config, i) for i in layers)
        sparse = any(is_sparse_layer(config, i) for i in layers)
        return head_constraints(config) + mlp_constraints(
            moe,
            config.intermediate_size if dense else None,
            num_experts(config) if sparse else None,
            config.moe_intermediate_size,
        )

    @staticmethod
    def tiny_config() -> dict[str, Any]:
        return TINY_COMMON | {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 8,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "attention_bias": False,
        }

    @staticmethod
    def checkpoint_shapes(config: types.SimpleNamespace) -> dict[str, tuple[int, ...]]:
        hidden, dim = config.hidden_size, head_dim(config)
        attn = llama_attention_shapes(config, "self_attn.") | {
            "self_attn.q_norm.weight": (dim,),
            "self_attn.k_norm.weight": (dim,),
        }

        def layer(i: int) -> dict[str, tuple[int, ...]]:
            if is_sparse_layer(config, i):
                inter = config.moe_intermediate_size
                return attn | moe_shapes("mlp.", hidden, num_experts(config), inter)
            return attn | gated_mlp_shapes("mlp.", hidden, config.intermediate_size)

        return causal_lm_shapes(config, layer)
