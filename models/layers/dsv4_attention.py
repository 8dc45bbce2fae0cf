"""DeepSeek-V4 attention (transformers 5.23 `DeepseekV4Attention`) over the paged KV pool.

A single-KV-head MQA in which K is V: ``kv = rope(norm(wkv(h)))``, one d-wide row per token.
Queries go through a low-rank path with a per-head unweighted norm; each head has a sink
logit; the output is rotated back (``-sin``) at the query position, projected per group of
heads (`wo_a`, block-diagonal) and mixed by `wo_b`. Each query sees the last
`sliding_window` tokens including itself, plus by layer type:

- "sliding_attention": nothing more (main rope table);
- "heavily_compressed_attention" (HCA): every closed compressed entry w < (t+1)//m;
- "compressed_sparse_attention" (CSA): the indexer's top-k of those entries;

the two compressed types use the compress rope table everywhere (q, kv, entries, output).

Order within a step: kv rows and every state row of all requests are written first, then
the windows this step closes become entries (and index keys), then each request attends.

Sharding (SGLang `MQALayer`): heads over attention-TP (`wq_b` by heads, `attn_sink` sliced,
`wo_a` by output groups, `wo_b` by its input, then all-reduced); the KV head, the
compressors and the indexer are replicated, so every rank keeps the same cache.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from engine.model_api import ModelContext
from engine.model_api.contract import KVBufferSpec
from engine.model_api.forward_batch import ForwardBatch
from engine.model_api.weights import WeightSource
from models.layers.dsv4_compressor import ClosedWindows, DeepseekV4Compressor, entry_slots
from models.layers.dsv4_indexer import DeepseekV4Indexer
from models.layers.dsv4_rotary import DeepseekV4Rotary, apply_dsv4_rotary
from models.layers.dsv4_sink_attention import sink_attention
from models.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from models.layers.norm import Fp32RMSNorm, rms_norm_unweighted

SLIDING, CSA, HCA = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)


class DeepseekV4Attention(nn.Module):
    """Parameter names are those of a transformers-saved checkpoint below
    ``model.layers.{i}.attn.``; the output is complete on every attention-TP rank."""

    def __init__(self, config: types.SimpleNamespace, layer_id: int, ctx: ModelContext) -> None:
        super().__init__()
        group = ctx.parallel.attn_tp
        heads, groups = config.num_attention_heads, config.o_groups
        if heads % group.size or groups % group.size:
            raise ValueError(
                f"DeepSeek-V4 attention needs num_attention_heads ({heads}) and o_groups "
                f"({groups}) divisible by the attention-TP size ({group.size})"
            )
        self.layer_id = layer_id
        self.layer_type = config.layer_types[layer_id]
        if self.layer_type not in (SLIDING, CSA, HCA):
            raise ValueError(f"unknown DeepSeek-V4 layer type {self.layer_type!r}")
        hidden, d = config.hidden_size, config.head_dim
        self.head_dim, self.window = d, config.sliding_window
        self.num_heads, self.num_groups = heads // group.size, groups // group.size
        self.eps, self.scale = config.rms_norm_eps, d**-0.5
        self.group_rank = group.rank

        self.wq_a = ReplicatedLinear(hidden, config.q_lora_rank)
        self.q_norm = Fp32RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = ColumnParallelLinear(config.q_lora_rank, heads * d, group)
        self.wkv = ReplicatedLinear(hidden, d)
        self.norm = Fp32RMSNorm(d, config.rms_norm_eps)
        # block-diagonal: group g maps its heads' H*d/G outputs to rows g*R_o:(g+1)*R_o
        self.wo_a = ColumnParallelLinear(heads * d // groups, groups * config.o_lora_rank, group)
        self.wo_b = RowParallelLinear(groups * config.o_lora_rank, hidden, group)
        # transformers keeps the sinks in float32 whatever the model dtype
        self.attn_sink = nn.Parameter(
            torch.zeros(self.num_heads, dtype=torch.float32), requires_grad=False
        )
        self.attn_sink.weight_loader = self._load_sinks

        table = config.rope_main if self.layer_type == SLIDING else config.rope_compress
        self.rotary = DeepseekV4Rotary(
            table, config.qk_rope_head_dim, config.max_position_embeddings
        )
        self.rate = config.compress_rates[self.layer_type] if self.layer_type != SLIDING else 0
        if self.layer_type != SLIDING:
            self.compressor = DeepseekV4Compressor(
                hidden, d, self.rate, self.layer_type == CSA, config.rms_norm_eps, self.rotary
            )
        if self.layer_type == CSA:
            self.indexer = DeepseekV4Indexer(config, self.rate, self.rotary)

    def _load_sinks(self, param: nn.Parameter, source: WeightSource) -> None:
        n = param.shape[0]
        param.data.copy_(source.narrow(0, self.group_rank * n, n))

    def kv_cache_shapes(self) -> list[KVBufferSpec]:
        """``kv (1,d)``; HCA adds its state ``((1,2d), f32)`` and entry ``(1,d)`` rows; CSA
        its state ``((1,4d), f32)``, entry ``(1,d)``, then the indexer's state
        ``((1,4d_I), f32)`` and key ``(1,d_I)`` rows."""
        shapes: list[KVBufferSpec] = [(1, self.head_dim)]
        if self.layer_type != SLIDING:
            shapes += self.compressor.kv_cache_shapes()
        if self.layer_type == CSA:
            shapes += self.indexer.compressor.kv_cache_shapes()
        return shapes

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """[rows, hidden] -> [rows, hidden], all-reduced over attention-TP; padding rows
        come out as zeros."""
        rows, d = hidden.shape[0], self.head_dim
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        q_residual = self.q_norm(self.wq_a(hidden))
        q = self.wq_b(q_residual).view(rows, self.num_heads, d)
        q = apply_dsv4_rotary(rms_norm_unweighted(q, self.eps), cos, sin)
        kv = apply_dsv4_rotary(self.norm(self.wkv(hidden)), cos, sin)

        buffers = batch.kv_pool.layer(self.layer_id)
        slots = batch.out_cache_loc
        buffers[0][slots] = kv.unsqueeze(1).to(buffers[0].dtype)
        index_q = index_w = None
        if self.layer_type != SLIDING:
            self.compressor.write_state(hidden, positions, slots, buffers[1])
            if self.layer_type == CSA:
                self.indexer.compressor.write_state(hidden, positions, slots, buffers[3])
            windows = ClosedWindows(batch, self.rate)
            self.compressor.close(windows, buffers[1], buffers[2])
            if self.layer_type == CSA:
                self.indexer.compressor.close(windows, buffers[3], buffers[4])
                index_q, index_w = self.indexer.queries(q_residual, hidden, cos, sin)

        out = q.new_zeros((rows, self.num_heads, d))
        start = 0
        for i, (seq_len, new) in enumerate(zip(batch.seq_lens, batch.extend_lens)):
            span = slice(start, start + new)
            start += new
            table = batch.req_to_token[batch.req_pool_indices[i]]
            keys, allowed = self._keys(table, seq_len, new, buffers, index_q, index_w, span)
            out[span] = sink_attention(q[span], keys, allowed, self.attn_sink, self.scale)

        out = apply_dsv4_rotary(out, cos, sin, inverse=True)
        grouped = out.view(rows, self.num_groups, self.num_heads * d // self.num_groups)
        w_a = self.wo_a.weight.view(self.num_groups, -1, grouped.shape[-1])
        return self.wo_b(torch.einsum("tgi,gri->tgr", grouped, w_a).flatten(1))

    def _keys(
        self,
        table: torch.Tensor,
        seq_len: int,
        new: int,
        buffers: list[torch.Tensor],
        index_q: torch.Tensor | None,
        index_w: torch.Tensor | None,
        span: slice,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's keys (window kv rows, then compressed entries) and which of them
        each of its new queries may attend to."""
        device = table.device
        q_pos = torch.arange(seq_len - new, seq_len, device=device)[:, None]
        first = max(0, seq_len - new - self.window + 1)
        k_pos = torch.arange(first, seq_len, device=device)[None]
        keys = buffers[0][table[first:seq_len]].flatten(1)
        allowed = (k_pos <= q_pos) & (k_pos > q_pos - self.window)
        num_entries = seq_len // self.rate if self.rate else 0
        if num_entries == 0:
            return keys, allowed
        entry = entry_slots(table, num_entries, self.rate)
        # entry w closes at token (w+1)m - 1, so query t sees it iff w < (t+1) // m
        visible = torch.arange(num_entries, device=device)[None] < (q_pos + 1) // self.rate
        if self.layer_type == CSA:
            index_keys = buffers[4][entry].flatten(1)
            visible = self.indexer.select(index_q[span], index_w[span], index_keys, visible)
        entries = buffers[2][entry].flatten(1)
        return torch.cat((keys, entries.to(keys.dtype))), torch.cat((allowed, visible), dim=1)


def attention_shapes(config: types.SimpleNamespace, layer_id: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors (full, unsharded) of layer `layer_id`'s attention, named relative
    to it as transformers saves them (``model.layers.{i}.attn.`` + name)."""
    layer_type = config.layer_types[layer_id]
    hidden, d, heads, groups = (
        config.hidden_size,
        config.head_dim,
        config.num_attention_heads,
        config.o_groups,
    )
    q_rank, o_rank = config.q_lora_rank, config.o_lora_rank
    shapes = {
        "wq_a.weight": (q_rank, hidden),
        "q_norm.weight": (q_rank,),
        "wq_b.weight": (heads * d, q_rank),
        "wkv.weight": (d, hidden),
        "norm.weight": (d,),
        "wo_a.weight": (groups * o_rank, heads * d // groups),
        "wo_b.weight": (hidden, groups * o_rank),
        "attn_sink": (heads,),
    }
    if layer_type == SLIDING:
        return shapes
    rate = config.compress_rates[layer_type]
    shapes |= _compressor_shapes("compressor.", hidden, d, rate, layer_type == CSA)
    if layer_type == CSA:
        n_i, d_i = config.index_n_heads, config.index_head_dim
        shapes |= _compressor_shapes("indexer.compressor.", hidden, d_i, rate, True)
        shapes["indexer.wq_b.weight"] = (n_i * d_i, q_rank)
        shapes["indexer.weights_proj.weight"] = (n_i, hidden)
    return shapes


def _compressor_shapes(
    prefix: str, hidden: int, width: int, rate: int, overlap: bool
) -> dict[str, tuple[int, ...]]:
    proj = (2 if overlap else 1) * width
    return {
        prefix + "wkv.weight": (proj, hidden),
        prefix + "wgate.weight": (proj, hidden),
        prefix + "ape": (rate, proj),
        prefix + "norm.weight": (width,),
    }
