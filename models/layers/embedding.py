"""Vocab-parallel embedding and LM head: each rank owns a contiguous block of the (padded) vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_api.parallel import RankGroup, all_gather_last_dim, all_reduce
from engine.model_api.weights import WeightSource


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, group: RankGroup) -> None:
        super().__init__()
        self.group = group
        self.tp_rank, self.tp_size = group.rank, group.size
        self.num_embeddings = num_embeddings
        self.padded_size = -(-num_embeddings // self.tp_size) * self.tp_size
        self.shard_size = self.padded_size // self.tp_size
        self.vocab_start = self.tp_rank * self.shard_size
        self.real_rows = max(0, min(self.shard_size, num_embeddings - self.vocab_start))
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, source: WeightSource) -> None:
        param.data.zero_()
        if self.real_rows:
            param.data[: self.real_rows].copy_(source.narrow(0, self.vocab_start, self.real_rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        out = F.embedding(torch.where(mine, local, 0), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return all_reduce(out, self.group)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits gathered over the vocab, so every rank holds identical full rows."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        logits = all_gather_last_dim(logits, self.group)
        return logits[..., : self.num_embeddings]

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
