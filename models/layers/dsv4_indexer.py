"""The DeepSeek-V4 Lightning indexer (transformers 5.23 `DeepseekV4Indexer` and
`DeepseekV4IndexerScorer`): which compressed entries a CSA query attends to.

It owns a CSA-style (overlapping) compressor at `index_head_dim` whose entries are the index
keys, one per closed window, stored at the closing token's slot like the main entries. A
query t scores every entry w it may see (``w < (t+1) // m``),

    s(t, w) = Σ_h weights_proj(h_t)[h] / sqrt(n_I) · relu(q_I[t, h] · K_w) / sqrt(d_I)

in float32, with ``q_I = rope_compress(wq_b(q_residual))`` at t, and keeps the top
``k = min(index_topk, #visible)``. Replicated over attention-TP (SGLang does not shard it).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from models.layers.dsv4_compressor import DeepseekV4Compressor
from models.layers.dsv4_rotary import DeepseekV4Rotary, apply_dsv4_rotary
from models.layers.linear import ReplicatedLinear


class DeepseekV4Indexer(nn.Module):
    """Parameter names are the saved checkpoint's: `compressor.*`, `wq_b`, `weights_proj`."""

    def __init__(self, config: types.SimpleNamespace, rate: int, rotary: DeepseekV4Rotary) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        if self.head_dim < rotary.rotary_dim:
            # the index q and keys rotate their trailing qk_rope_head_dim channels
            # (transformers fails on such a config too)
            raise ValueError(
                f"index_head_dim ({self.head_dim}) must be at least qk_rope_head_dim "
                f"({rotary.rotary_dim})"
            )
        self.topk = config.index_topk
        self.rate = rate
        self.compressor = DeepseekV4Compressor(
            config.hidden_size, self.head_dim, rate, True, config.rms_norm_eps, rotary
        )
        self.wq_b = ReplicatedLinear(config.q_lora_rank, self.num_heads * self.head_dim)
        self.weights_proj = ReplicatedLinear(config.hidden_size, self.num_heads)
        self.rotary = rotary
        self.softmax_scale = self.head_dim**-0.5
        self.weights_scaling = self.num_heads**-0.5

    def queries(
        self,
        q_residual: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Index queries [rows, n_I, d_I] (compress-roped at the row's position, the
        compress table's cos/sin) and head weights [rows, n_I] in float32."""
        q = self.wq_b(q_residual).view(-1, self.num_heads, self.head_dim)
        q = apply_dsv4_rotary(q, cos, sin)
        weights = self.weights_proj(hidden).float() * self.weights_scaling
        return q, weights

    def scores(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Index scores [queries, entries] of one request's queries against its keys."""
        dots = torch.einsum("qhd,ed->qhe", q.float(), keys.float())
        return (torch.relu(dots) * self.softmax_scale * weights[..., None]).sum(dim=1)

    def select(
        self,
        q: torch.Tensor,
        weights: torch.Tensor,
        keys: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """[queries, entries] bool: the top-k visible entries of each query, by score."""
        num_entries = keys.shape[0]
        scores = self.scores(q, weights, keys).masked_fill(~visible, float("-inf"))
        picked = scores.topk(min(self.topk, num_entries), dim=-1).indices
        # a query with fewer than k visible entries also picks invisible ones: drop them
        picked = torch.where(visible.gather(1, picked), picked, num_entries)
        chosen = visible.new_zeros((visible.shape[0], num_entries + 1))
        chosen.scatter_(1, picked, True)
        return chosen[:, :num_entries]
