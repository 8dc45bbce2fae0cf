"""DeepSeek-V3 as transformers 5.23 `DeepseekV3ForCausalLM`, managing its own sequence
parallelism the way SGLang's DeepSeek-V4 does (DESIGN.md, Models).

Every rank of an attention-TP group holds all of the group's rows in the residual stream.
A decoder layer runs MLA attention head-parallel over attention-TP on all rows, ending in an
all-reduce. Its MLP then runs in one of two ways, fixed when the layer is built:

- token-parallel (routed experts over all-to-all; dense layers at ``--moe-dense-tp-size 1``):
  the layer splits the group's real rows (`batch.num_token_non_padded`, always the group's
  global count for this model) across the attention-TP ranks, unevenly and without padding,
  runs the post-attention norm and the MLP on its shard, and all-gathers the shards over
  attention-TP; padding rows come back as zeros.
- TP-sharded (MoE backend none; dense layers otherwise): every row through the
  intermediate-sharded MLP, all-reduced over "tp". Under DP attention the layer first
  gathers every attention-DP group's rows itself (`batch.global_num_tokens`).

So the model never reads `batch.gathered_buffer` and declares ``self_managed_sp=True``; the
plan then keeps `num_token_non_padded` the group's count (`shard_local_token_count`).
"""

from __future__ import annotations

import re
import types
from typing import Any

import torch
from torch import nn

from engine.model_api import (
    Divides,
    ForwardBatch,
    MLASpec,
    ModelContext,
    MoeSettings,
    ParallelState,
    Weights,
)
from engine.model_api.parallel import all_gather_uneven, all_reduce, dp_group_shard, token_shard
from models.causal_lm import TINY_COMMON, CausalLM, causal_lm_shapes, mlp_constraints
from models.layers.embedding import VocabParallelEmbedding
from models.layers.mla import MLAAttention, mla_shapes
from models.layers.mlp import GatedMLP, gated_mlp_shapes
from models.layers.moe import MoE
from models.layers.moe_weights import load_with_experts, moe_shapes
from models.layers.norm import RMSNorm
from models.layers.router import grouped_topk
from registry import ParallelCapabilities

MTP_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def is_moe_layer(config: types.SimpleNamespace, layer_id: int) -> bool:
    # transformers ignores moe_layer_freq (always 1 in DeepSeek-V3); SGLang's rule with it
    freq = getattr(config, "moe_layer_freq", None) or 1
    return (
        bool(getattr(config, "n_routed_experts", None))
        and layer_id >= (getattr(config, "first_k_dense_replace", None) or 0)
        and layer_id % freq == 0
    )


class DeepseekV3MoE(MoE):
    """Sigmoid grouped top-k routing with the correction bias, plus the shared experts."""

    def __init__(self, config: types.SimpleNamespace, ctx: ModelContext, replicated: bool) -> None:
        shared = None
        if getattr(config, "n_shared_experts", None):
            inter = config.moe_intermediate_size * config.n_shared_experts
            shared = GatedMLP(config.hidden_size, inter, ctx.parallel.tp, replicated)
        super().__init__(
            config.hidden_size,
            config.n_routed_experts,
            config.moe_intermediate_size,
            self.route_tokens,
            ctx,
            shared,
            logits_fp32=True,
        )
        self.top_k = config.num_experts_per_tok
        self.n_group = getattr(config, "n_group", None) or 1
        self.topk_group = getattr(config, "topk_group", None) or 1
        self.scaling = config.routed_scaling_factor
        self.renormalize = bool(getattr(config, "norm_topk_prob", True))
        # transformers keeps it in float32 whatever the model dtype
        bias = torch.zeros(config.n_routed_experts, dtype=torch.float32)
        self.gate.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)

    def route_tokens(
        self, logits: torch.Tensor, num_valid: int | torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return grouped_topk(
            logits,
            self.top_k,
            self.n_group,
            self.topk_group,
            self.gate.e_score_correction_bias,
            self.scaling,
            self.renormalize,
            num_valid,
        )


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, config: types.SimpleNamespace, layer_id: int, ctx: ModelContext) -> None:
        super().__init__()
        self.parallel: ParallelState = ctx.parallel
        self.self_attn = MLAAttention(config, layer_id, ctx)
        self.is_moe = is_moe_layer(config, layer_id)
        if self.is_moe:
            self.token_parallel = ctx.moe.a2a_backend == "all2all"
            self.mlp = DeepseekV3MoE(config, ctx, replicated=self.token_parallel)
        else:
            self.token_parallel = ctx.moe.dense_tp_size == 1
            self.mlp = GatedMLP(
                config.hidden_size, config.intermediate_size, ctx.parallel.tp, self.token_parallel
            )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """The residual stream [rows, hidden], all of the group's rows, in and out."""
        x = x + self.self_attn(positions, self.input_layernorm(x), batch)
        if self.token_parallel:
            return self.mlp_on_token_shard(x, batch)
        if self.parallel.attn_dp_size > 1:
            return self.mlp_over_dp_groups(x, batch.global_num_tokens)
        h = self.run_mlp(self.post_attention_layernorm(x), batch.valid_rows())
        return x + all_reduce(h, self.parallel.tp)

    def run_mlp(
        self, h: torch.Tensor, num_valid: int | torch.Tensor | None, max_rows: int | None = None
    ) -> torch.Tensor:
        return self.mlp(h, num_valid, max_rows) if self.is_moe else self.mlp(h)

    def mlp_on_token_shard(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """This rank's share of the group's `num_tokens` real rows through the whole MLP,
        then all-gathered over attention-TP. A shard-local count here would drop the other
        ranks' rows (SGLang issue #38606), so the plan keeps the group's. `max_rows`
        bounds every "tp" rank's share (the all-to-all MoE's exchange); inside a replayed
        graph the shard's padding rows are masked out of the routing."""
        p, num_tokens = self.parallel, batch.num_token_non_padded
        start, sizes = token_shard(num_tokens, p)
        size = sizes[p.attn_tp_rank]
        shard = x[start : start + size]
        valid, max_rows = batch.real_in(start, size), batch.max_rows_per_rank
        shard = shard + self.run_mlp(self.post_attention_layernorm(shard), valid, max_rows)
        out = all_gather_uneven(shard, sizes, p.attn_tp)
        padding = x.shape[0] - num_tokens
        return torch.cat([out, out.new_zeros(padding, out.shape[1])]) if padding else out

    def mlp_over_dp_groups(self, x: torch.Tensor, group_rows: list[int]) -> torch.Tensor:
        """The TP-sharded MLP over every attention-DP group's rows (padding included: only
        `global_num_tokens` is known of other groups). Each attention-TP rank contributes a
        slice of its group's rows, so the "tp" gather holds each group's rows once, in
        group order; after the all-reduce this group's rows are sliced back."""
        p = self.parallel
        rows, sizes = dp_group_shard(x.shape[0], group_rows, p)
        h = self.post_attention_layernorm(x[rows])
        h = all_reduce(self.run_mlp(all_gather_uneven(h, sizes, p.tp), None), p.tp)
        offset = sum(group_rows[: p.attn_dp_rank])
        return x + h[offset : offset + x.shape[0]]


class DeepseekV3Model(nn.Module):
    def __init__(self, config: types.SimpleNamespace, ctx: ModelContext) -> None:
        super().__init__()
        # Over attention-TP: under DP attention each group embeds and samples its own rows.
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, ctx.parallel.attn_tp
        )
        self.layers = nn.ModuleList(
            DeepseekV3DecoderLayer(config, i, ctx) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = layer(batch.positions, x, batch)
        return self.norm(x)


class DeepseekV3ForCausalLM(CausalLM):
    parallel_capabilities = ParallelCapabilities(self_managed_sp=True)
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: types.SimpleNamespace, ctx: ModelContext) -> None:
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(
                f"DeepseekV3ForCausalLM supports hidden_act 'silu' (got {config.hidden_act!r})"
            )
        super().__init__(config, ctx, DeepseekV3Model(config, ctx))

    def load_weights(self, weights: Weights) -> None:
        load_with_experts(self, weights, self.packed_modules_mapping)

    def ignores_tensor(self, name: str) -> bool:
        """Multi-token-prediction layers (``model.layers.{num_hidden_layers}...`` in the
        released checkpoints) serve speculative decoding, which parcap does not run."""
        layer = MTP_LAYER.match(name)
        return layer is not None and int(layer.group(1)) >= self.config.num_hidden_layers

    def kv_cache_shapes(self) -> list[list[tuple[int, ...]]]:
        return [layer.self_attn.kv_cache_shapes() for layer in self.model.layers]

    def attention_spec(self) -> MLASpec:
        return self.model.layers[0].self_attn.spec

    @staticmethod
    def parallel_constraints(config: types.SimpleNamespace, moe: MoeSettings) -> list[Divides]:
        layers = range(config.num_hidden_layers)
        dense = any(not is_moe_layer(config, i) for i in layers)
        experts = config.n_routed_experts if any(is_moe_layer(config, i) for i in layers) else 0
        out = [Divides("num_attention_heads", config.num_attention_heads, "attn_tp")]
        out += mlp_constraints(
            moe, config.intermediate_size if dense else None, experts, config.moe_intermediate_size
        )
        shared = getattr(config, "n_shared_experts", None)
        if experts and shared and moe.a2a_backend == "none":  # replicated next to all2all
            out.append(
                Divides("the shared experts' size", config.moe_intermediate_size * shared, "tp")
            )
        return out

    @staticmethod
    def tiny_config() -> dict[str, Any]:
        return TINY_COMMON | {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 3,
            "first_k_dense_replace": 1,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "q_lora_rank": 32,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            # DeepSeek-V3's yarn: mscale == mscale_all_dim, so cos/sin are unscaled and the
            # softmax scale takes mscale(factor)**2
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 512,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
            "rope_interleave": True,
            "attention_bias": False,
        }

    @staticmethod
    def checkpoint_shapes(config: types.SimpleNamespace) -> dict[str, tuple[int, ...]]:
        hidden, attn = config.hidden_size, mla_shapes(config, "self_attn.")

        def layer(i: int) -> dict[str, tuple[int, ...]]:
            if not is_moe_layer(config, i):
                return attn | gated_mlp_shapes("mlp.", hidden, config.intermediate_size)
            inter, experts = config.moe_intermediate_size, config.n_routed_experts
            shapes = attn | moe_shapes("mlp.", hidden, experts, inter)
            shapes["mlp.gate.e_score_correction_bias"] = (experts,)
            if getattr(config, "n_shared_experts", None):
                shared = inter * config.n_shared_experts
                shapes |= gated_mlp_shapes("mlp.shared_experts.", hidden, shared)
            return shapes

        return causal_lm_shapes(config, layer)
