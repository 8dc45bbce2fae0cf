"""Llama (2, 3, 3.x) as transformers 5.23 `LlamaForCausalLM`, tensor-parallel."""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from engine.model_api import (
    AttentionSpec,
    Divides,
    ForwardBatch,
    ModelContext,
    MoeSettings,
    Weights,
    load_params,
)
from engine.model_api.communicator import LayerCommunicator, ScatterMode, final_norm, mlp_mode
from engine.model_api.config import head_dim, num_kv_heads, rope_parameters
from models.causal_lm import (
    TINY_COMMON,
    CausalLM,
    causal_lm_shapes,
    head_constraints,
    mlp_constraints,
)
from models.layers.attention import Attention
from models.layers.embedding import VocabParallelEmbedding
from models.layers.linear import QKVParallelLinear, RowParallelLinear, linear_shapes
from models.layers.mlp import GatedMLP, gated_mlp_shapes
from models.layers.norm import RMSNorm
from models.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config: types.SimpleNamespace, layer_id: int, ctx: ModelContext) -> None:
        super().__init__()
        dim = head_dim(config)
        bias = getattr(config, "attention_bias", False)
        group = ctx.parallel.attn_tp
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, dim, config.num_attention_heads, num_kv_heads(config), group, bias
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * dim, config.hidden_size, group, bias, reduce_results=False
        )
        self.rotary_emb = RotaryEmbedding(
            dim, rope_parameters(config), config.max_position_embeddings
        )
        self.attn = Attention(
            self.qkv_proj.num_heads, dim, self.qkv_proj.num_kv_heads, dim**-0.5, layer_id
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """Partial sums over attention-TP ranks; the decoder layer reduces them."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        return self.o_proj(self.attn.rope_and_attend(self.rotary_emb, q, k, v, batch))


def llama_attention_shapes(
    config: types.SimpleNamespace, prefix: str
) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of `LlamaAttention` named `prefix`: q/k/v/o_proj."""
    hidden, dim = config.hidden_size, head_dim(config)
    q, kv = config.num_attention_heads * dim, num_kv_heads(config) * dim
    bias = getattr(config, "attention_bias", False)
    return (
        linear_shapes(prefix + "q_proj.", hidden, q, bias)
        | linear_shapes(prefix + "k_proj.", hidden, kv, bias)
        | linear_shapes(prefix + "v_proj.", hidden, kv, bias)
        | linear_shapes(prefix + "o_proj.", q, hidden, bias)
    )


def llama_mlp(config: types.SimpleNamespace, ctx: ModelContext) -> GatedMLP:
    """TP-sharded over "tp", or replicated under ``--moe-dense-tp-size 1`` (then it runs on
    the rank's scattered rows)."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"dense MLP supports hidden_act 'silu' (got {config.hidden_act!r})")
    replicated = mlp_mode(False, ctx.moe) is ScatterMode.SCATTERED
    bias = getattr(config, "mlp_bias", False)
    return GatedMLP(config.hidden_size, config.intermediate_size, ctx.parallel.tp, replicated, bias)


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: types.SimpleNamespace, layer_id: int, ctx: ModelContext) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id, ctx)
        self.is_moe = self.is_moe_layer(config, layer_id)
        self.mlp = self.make_mlp(config, ctx)
        # transformers' default for both Llama and Qwen3-MoE configs
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.comm = LayerCommunicator(
            self.input_layernorm,
            self.post_attention_layernorm,
            mlp_mode(self.is_moe, ctx.moe),
            ctx.parallel,
        )

    def is_moe_layer(self, config: types.SimpleNamespace, layer_id: int) -> bool:
        return False

    def make_mlp(self, config: types.SimpleNamespace, ctx: ModelContext) -> nn.Module:
        return llama_mlp(config, ctx)

    def run_mlp(
        self, hidden: torch.Tensor, num_valid: int | torch.Tensor | None, batch: ForwardBatch
    ):
        return self.mlp(hidden)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.comm.prepare_attn(hidden, residual, batch)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual, num_valid = self.comm.prepare_mlp(hidden, residual, batch)
        hidden = self.run_mlp(hidden, num_valid, batch)
        return self.comm.postprocess_mlp(hidden, residual, batch)


class LlamaModel(nn.Module):
    layer_cls: type[nn.Module] = LlamaDecoderLayer

    def __init__(self, config: types.SimpleNamespace, ctx: ModelContext) -> None:
        super().__init__()
        # vocab-parallel over attention-TP: each attention-DP group embeds its own rows
        self.attn_tp = ctx.parallel.attn_tp
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, self.attn_tp
        )
        self.layers = nn.ModuleList(
            self.layer_cls(config, i, ctx) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, getattr(config, "rms_norm_eps", 1e-6))

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            hidden, residual = layer(batch.positions, hidden, residual, batch)
        return final_norm(self.norm, hidden, residual, batch, self.attn_tp)


class LlamaForCausalLM(CausalLM):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    model_cls: type[nn.Module] = LlamaModel

    def __init__(self, config: types.SimpleNamespace, ctx: ModelContext) -> None:
        super().__init__(config, ctx, self.model_cls(config, ctx))

    def load_weights(self, weights: Weights) -> None:
        load_params(self, weights, self.packed_modules_mapping)

    def kv_cache_shapes(self) -> list[list[tuple[int, ...]]]:
        return [layer.self_attn.attn.kv_cache_shapes() for layer in self.model.layers]

    def attention_spec(self) -> AttentionSpec:
        return self.model.layers[0].self_attn.attn.spec

    @staticmethod
    def parallel_constraints(config: types.SimpleNamespace, moe: MoeSettings) -> list[Divides]:
        return head_constraints(config) + mlp_constraints(moe, config.intermediate_size)

    @staticmethod
    def tiny_config() -> dict[str, Any]:
        return TINY_COMMON | {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 8,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "attention_bias": False,
            "mlp_bias": False,
        }

    @staticmethod
    def checkpoint_shapes(config: types.SimpleNamespace) -> dict[str, tuple[int, ...]]:
        hidden, inter = config.hidden_size, config.intermediate_size
        mlp = gated_mlp_shapes("mlp.", hidden, inter, getattr(config, "mlp_bias", False))
        layer = llama_attention_shapes(config, "self_attn.") | mlp
        return causal_lm_shapes(config, lambda i: layer)
