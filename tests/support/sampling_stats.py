"""The exact next-token distribution of temperature / top-k / top-p sampling, written apart
from the engine's sampler, and a chi-square goodness-of-fit test of observed draws.

Semantics (those of transformers' logits warpers and vLLM): the logits are divided by the
temperature; top-k keeps the k most likely tokens; top-p then keeps the smallest set of the
most likely remaining tokens whose renormalised mass reaches p (always at least one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def exact_distribution(
    logits: Sequence[float], temperature: float, top_k: int = 0, top_p: float = 1.0
) -> list[float]:
    """Probability of each token, in float64 with plain Python loops (logits must be
    distinct, so that top-k and top-p have no ties to break)."""
    assert len(set(logits)) == len(logits), "distinct logits only"
    scaled = [z / temperature for z in logits]
    top = max(scaled)
    weights = [math.exp(z - top) for z in scaled]
    order = sorted(range(len(logits)), key=lambda i: -scaled[i])
    kept = order[:top_k] if 0 < top_k < len(order) else order
    mass = sum(weights[i] for i in kept)
    if top_p < 1:
        prefix, before = [], 0.0
        for i in kept:
            if before >= top_p:
                break
            prefix.append(i)
            before += weights[i] / mass
        kept = prefix
        mass = sum(weights[i] for i in kept)
    probs = [0.0] * len(logits)
    for i in kept:
        probs[i] = weights[i] / mass
    return probs


def chi_square_p_value(counts: Sequence[int], probs: Sequence[float]) -> float:
    """P-value of Pearson's chi-square test that `counts` were drawn from `probs`.

    Tokens of probability 0 are left out (the caller checks they were never drawn); tokens
    expected fewer than 5 times are pooled into one bin, as the chi-square approximation
    needs. The survival function of chi-square with d degrees of freedom at x is the
    regularised upper incomplete gamma function Q(d/2, x/2)."""
    n = sum(counts)
    bins: list[tuple[float, float]] = []  # (observed, expected)
    pooled_obs = pooled_exp = 0.0
    for count, p in zip(counts, probs, strict=True):
        if p == 0:
            continue
        if n * p < 5:
            pooled_obs, pooled_exp = pooled_obs + count, pooled_exp + n * p
        else:
            bins.append((count, n * p))
    if pooled_exp > 0:
        bins.append((pooled_obs, pooled_exp))
    if len(bins) < 2:
        return 1.0
    stat = sum((o - e) ** 2 / e for o, e in bins)
    return chi_square_sf(stat, len(bins) - 1)


def chi_square_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X chi-square with `dof` degrees of freedom."""
    a = torch.tensor(dof / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(stat / 2, dtype=torch.float64)))
