"""DeepSeek-V4 as transformers 5.23 `DeepseekV4ForCausalLM`, managing its own sequence
parallelism exactly as `models.deepseek_v3` does (and SGLang's DeepSeek-V4).

The residual stream is `hc_mult` streams per token ([rows, n, D], mHC): around each block a
hyper-connection collapses them into the block's input and expands the block's output
back. The streams stay replicated on every rank of an attention-TP group, on all of the
group's rows. Per decoder layer:

- attention (`models.layers.dsv4_attention`) runs head-parallel over attention-TP on all
  rows and returns complete rows;
- the MoE runs, fixed when the layer is built, either token-parallel (``--moe-a2a-backend
  all2all``: the group's real rows, `batch.num_token_non_padded`, split unevenly over the
  attention-TP ranks, then all-gathered; padding rows come back as zeros) or TP-sharded on
  all rows with an all-reduce over "tp" (backend none; under DP attention over every
  attention-DP group's rows, gathered by the layer itself).

Hash-routed layers read the token ids of exactly the rows their MoE computes, so the ids
are sliced and gathered with the rows. The model never reads `batch.gathered_buffer` and
declares ``self_managed_sp=True``.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from engine.model_api import ForwardBatch, ModelContext, ParallelState, Weights
from engine.model_api.parallel import all_gather_uneven, all_reduce, dp_group_shard, token_shard
from models import deepseek_v4_weights as ckpt
from models.causal_lm import TINY_COMMON, CausalLM
from models.deepseek_v4_config import normalize_config, parallel_constraints
from models.layers.dsv4_attention import DeepseekV4Attention
from models.layers.embedding import VocabParallelEmbedding
from models.layers.hyper_connection import HyperConnection, HyperHead, hc_post
from models.layers.mlp import GatedMLP
from models.layers.moe import MoE
from models.layers.moe_weights import load_with_experts
from models.layers.norm import Fp32RMSNorm
from models.layers.router import hash_route, sqrtsoftplus_topk
from registry import ParallelCapabilities


class DeepseekV4MoE(MoE):
    """sqrt(softplus) routing, by top-k with the correction bias ("moe") or by the frozen
    `tid2eid` table ("hash_moe"), clamped SwiGLU experts and one clamped shared expert."""

    def __init__(
        self, config: types.SimpleNamespace, layer_id: int, ctx: ModelContext, replicated: bool
    ) -> None:
        hidden, inter, limit = config.hidden_size, config.moe_intermediate_size, config.swiglu_limit
        shared = GatedMLP(hidden, inter, ctx.parallel.tp, replicated, swiglu_limit=limit)
        super().__init__(
            hidden,
            config.n_routed_experts,
            inter,
            self._route_needs_ids,
            ctx,
            shared,
            swiglu_limit=limit,
        )
        self.top_k = config.num_experts_per_tok
        self.scaling = config.routed_scaling_factor
        self.is_hash = config.mlp_layer_types[layer_id] == "hash_moe"
        if self.is_hash:
            experts = config.n_routed_experts
            self.gate.tid2eid = ckpt.tid2eid_param(config.vocab_size, self.top_k, experts)
        else:
            # transformers keeps it in float32 whatever the model dtype
            bias = torch.zeros(config.n_routed_experts, dtype=torch.float32)
            self.gate.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)

    # MoE's route(logits, num_valid) cannot see token ids, which hash layers route by; so
    # forward() routes itself and this callback must never run
    def _route_needs_ids(self, logits: torch.Tensor, num_valid: int | None):
        raise TypeError("DeepseekV4MoE routes in forward(hidden, input_ids, ...)")

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        num_valid: int | torch.Tensor | None = None,
        max_rows: int | None = None,
    ) -> torch.Tensor:
        """`input_ids`: the token ids of `hidden`'s rows (read by hash layers only)."""
        logits = self.router_logits(hidden)
        if self.is_hash:
            weights, ids = hash_route(logits, self.gate.tid2eid, input_ids, self.scaling, num_valid)
        else:
            bias = self.gate.e_score_correction_bias
            weights, ids = sqrtsoftplus_topk(logits, self.top_k, bias, self.scaling, num_valid)
        return self.experts(hidden, weights, ids, max_rows) + self.shared_experts(hidden)


class DeepseekV4DecoderLayer(nn.Module):
    def __init__(self, config: types.SimpleNamespace, layer_id: int, ctx: ModelContext) -> None:
        super().__init__()
        self.parallel: ParallelState = ctx.parallel
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.attn = DeepseekV4Attention(config, layer_id, ctx)
        self.token_parallel = ctx.moe.a2a_backend == "all2all"
        self.ffn = DeepseekV4MoE(config, layer_id, ctx, replicated=self.token_parallel)
        self.attn_norm = Fp32RMSNorm(hidden, eps)
        self.ffn_norm = Fp32RMSNorm(hidden, eps)
        hc = (hidden, config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps, eps)
        self.attn_hc = HyperConnection(*hc)
        self.ffn_hc = HyperConnection(*hc)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """The streams [rows, n, D], all of the group's rows, in and out."""
        post, comb, h = self.attn_hc(x)
        x = hc_post(x, self.attn(positions, self.attn_norm(h), batch), post, comb)
        post, comb, h = self.ffn_hc(x)
        return hc_post(x, self.mlp(h, batch), post, comb)

    def mlp(self, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The MoE's output for every row of the group (collapsed input `h` [rows, D])."""
        if self.token_parallel:
            return self.mlp_on_token_shard(h, batch)
        if self.parallel.attn_dp_size > 1:
            return self.mlp_over_dp_groups(h, batch)
        out = self.ffn(self.ffn_norm(h), batch.input_ids, batch.num_token_non_padded)
        return all_reduce(out, self.parallel.tp)

    def mlp_on_token_shard(self, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """This rank's uneven share of the group's real rows (the group's count: a
        shard-local one would drop the other ranks' rows, SGLang #38606) through the
        all-to-all MoE, then all-gathered over attention-TP."""
        p, num_tokens = self.parallel, batch.num_token_non_padded
        start, sizes = token_shard(num_tokens, p)
        rows = slice(start, start + sizes[p.attn_tp_rank])
        valid = batch.real_in(start, sizes[p.attn_tp_rank])
        shard = self.ffn(
            self.ffn_norm(h[rows]), batch.input_ids[rows], valid, batch.max_rows_per_rank
        )
        out = all_gather_uneven(shard, sizes, p.attn_tp)
        padding = h.shape[0] - num_tokens
        return torch.cat([out, out.new_zeros(padding, out.shape[1])]) if padding else out

    def mlp_over_dp_groups(self, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The TP-sharded MoE over every attention-DP group's rows (padding included), as
        `DeepseekV3DecoderLayer.mlp_over_dp_groups`: each attention-TP rank contributes a
        disjoint slice of its group's rows and of their token ids (never an all-reduced
        copy, SGLang #31699), and this group's rows are sliced back after the all-reduce."""
        p, group_rows = self.parallel, batch.global_num_tokens
        rows, sizes = dp_group_shard(h.shape[0], group_rows, p)
        normed = all_gather_uneven(self.ffn_norm(h[rows]), sizes, p.tp)
        ids = all_gather_uneven(batch.input_ids[rows], sizes, p.tp)
        out = all_reduce(self.ffn(normed, ids, None), p.tp)
        offset = sum(group_rows[: p.attn_dp_rank])
        return out[offset : offset + h.shape[0]]


class DeepseekV4Model(nn.Module):
    def __init__(self, config: types.SimpleNamespace, ctx: ModelContext) -> None:
        super().__init__()
        hidden = config.hidden_size
        # Over attention-TP: under DP attention each group embeds and samples its own rows.
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, ctx.parallel.attn_tp)
        self.layers = nn.ModuleList(
            DeepseekV4DecoderLayer(config, i, ctx) for i in range(config.num_hidden_layers)
        )
        self.hc_mult = config.hc_mult
        self.hc_head = HyperHead(hidden, config.hc_mult, config.hc_eps, config.rms_norm_eps)
        self.norm = Fp32RMSNorm(hidden, config.rms_norm_eps)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        x = x.unsqueeze(1).expand(-1, self.hc_mult, -1).contiguous()
        for layer in self.layers:
            x = layer(batch.positions, x, batch)
        return self.norm(self.hc_head(x))


class DeepseekV4ForCausalLM(CausalLM):
    parallel_capabilities = ParallelCapabilities(self_managed_sp=True)
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: types.SimpleNamespace, ctx: ModelContext) -> None:
        config = normalize_config(config)
        for key, supported in (("hidden_act", "silu"), ("scoring_func", "sqrtsoftplus")):
            if getattr(config, key) != supported:
                raise ValueError(
                    f"DeepseekV4ForCausalLM supports {key} {supported!r} "
                    f"(got {getattr(config, key)!r})"
                )
        super().__init__(config, ctx, DeepseekV4Model(config, ctx))
        self._saved_names = frozenset(ckpt.checkpoint_shapes(config))

    def load_weights(self, weights: Weights) -> None:
        """Saved names (`checkpoint_shapes`) renamed to parameters: ``head`` -> `lm_head`,
        ``hc_attn_fn`` -> `attn_hc.fn`, ``w1/w3/w2`` -> gate/up/down (experts fused into
        `w13`/`w2`, the shared expert's gate/up into `gate_up_proj`), ``gate.bias`` ->
        `gate.e_score_correction_bias`; `tid2eid` loads as int64."""
        renamed = ((ckpt.param_name(name), source) for name, source in weights)
        load_with_experts(self, renamed, self.packed_modules_mapping)

    def checkpoint_name(self, name: str) -> str | None:
        """Transformers-saved names as they are; DeepSeek's released names (``embed.weight``,
        ``layers.{i}...``, ``hc_head_fn``, ``mtp.*``) mapped to them, or skipped."""
        if name in self._saved_names:
            return name
        return ckpt.hub_to_saved(name, self.config.num_hidden_layers)

    def ignores_tensor(self, name: str) -> bool:
        """Multi-token-prediction weights (``mtp.*``, layers >= num_hidden_layers) serve
        speculative decoding, which parcap does not run."""
        return ckpt.is_unused(name, self.config)

    def kv_cache_shapes(self) -> list[list[Any]]:
        return [layer.attn.kv_cache_shapes() for layer in self.model.layers]

    def attention_spec(self) -> None:
        """V4's attention runs in torch in the model and calls no backend."""
        return None

    @staticmethod
    def tiny_config() -> dict[str, Any]:
        """Every attention type, both MLP types, yarn in the compress RoPE, rates and window
        small enough that short prompts evict, close entries and bind the indexer's top-k,
        and a clamp that fires (brief section 5)."""
        return TINY_COMMON | {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "layer_types": [
                "sliding_attention",
                "compressed_sparse_attention",
                "heavily_compressed_attention",
                "compressed_sparse_attention",
            ],
            "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe"],
            "compress_rates": {
                "compressed_sparse_attention": 4,
                "heavily_compressed_attention": 8,
            },
            "sliding_window": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "partial_rotary_factor": 0.25,
            "q_lora_rank": 32,
            "o_groups": 4,
            "o_lora_rank": 16,
            "index_n_heads": 4,
            "index_head_dim": 16,
            "index_topk": 3,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "scoring_func": "sqrtsoftplus",
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.5,
            "swiglu_limit": 1.0,
            "hidden_act": "silu",
            "hc_mult": 4,
            "hc_sinkhorn_iters": 20,
            "hc_eps": 1e-6,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 128,
            "rope_theta": 10000.0,
            "compress_rope_theta": 160000.0,
            # the compress RoPE's yarn (attention factor forced to 1.0); main stays default
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 32,
                "beta_slow": 1,
            },
            "num_nextn_predict_layers": 0,
        }

    parallel_constraints = staticmethod(parallel_constraints)

    @staticmethod
    def checkpoint_shapes(config: types.SimpleNamespace) -> dict[str, tuple[int, ...]]:
        return ckpt.checkpoint_shapes(config)
