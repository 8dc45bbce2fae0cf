"""From final hidden states to the float32 logits the sampler reads."""

from __future__ import annotations

import torch
from torch import nn

from engine.model_api import ForwardBatch
from models.layers.embedding import ParallelLMHead


class LogitsProcessor(nn.Module):
    def forward(
        self, hidden: torch.Tensor, lm_head: ParallelLMHead, batch: ForwardBatch
    ) -> torch.Tensor:
        """[batch_size, vocab] float32, one row per request, taken at `batch.sample_rows`."""
        return lm_head(hidden[batch.sample_rows]).float()
