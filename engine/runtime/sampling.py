"""Next-token choice from logits: greedy, or temperature / top-k / top-p with a seeded generator.

Every rank of a group holds the same logits and the same per-request CPU generator, so
every rank draws the same token without communicating.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from engine.runtime.sequence import Sequence


def sample(logits: torch.Tensor, seqs: Seq[Sequence]) -> tuple[list[int], list[float]]:
    """Tokens for each row, and their log-probability under the model's (raw) distribution."""
    tokens, chosen = sample_on_device(logits, seqs)
    both = torch.stack([tokens.double(), chosen.double()]).cpu()  # one copy; ids < 2**53
    return [int(t) for t in both[0].tolist()], both[1].tolist()


def sample_on_device(
    logits: torch.Tensor, seqs: Seq[Sequence]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (int64) and their log-probabilities (float32), one per sequence, on the
    logits' device. Greedy rows never leave it; only the rows that draw (seeded generators
    live on the host) go to the host and back."""
    logits = logits[: len(seqs)].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
    if drawn:
        rows = logits[drawn].cpu()
        picks = [_draw(row, seqs[i]) for row, i in zip(rows, drawn, strict=True)]
        tokens[drawn] = torch.tensor(picks, device=tokens.device)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _draw(logits: torch.Tensor, seq: Sequence) -> int:
    params = seq.params
    if seq.generator is None:
        seq.generator = torch.Generator().manual_seed(seq.seed)
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
