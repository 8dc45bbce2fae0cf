"""Seeded frequency tests of the sampler: temperature (not 1), top-k and top-p draw tokens
with exactly the distribution they define, never a token outside it, and a request's draws
depend on its seed alone.

Each case draws N = 6000 tokens (200 seeded requests x 30 steps) from fixed logits over 16
tokens and compares the counts with `exact_distribution` by Pearson's chi-square test at
significance ALPHA = 1e-3: a correct sampler fails a case with probability 1e-3, and the
seeds make every run draw the same tokens. With these logits a sampler that multiplies by
the temperature instead of dividing, or applies top-p before the temperature, moves the
expected counts by hundreds, far beyond what chi-square tolerates at this N.
"""

from __future__ import annotations

import pytest
import torch

from engine.messages import Request, SamplingParams
from engine.runtime.sampling import sample
from engine.runtime.sequence import Sequence
from tests.support.sampling_stats import chi_square_p_value, chi_square_sf, exact_distribution

ALPHA = 1e-3
REQUESTS, STEPS = 200, 30
# distinct values, not sorted by token id, so that a sampler mixing up sorted positions and
# token ids draws the wrong tokens
LOGITS = [0.3, 2.0, -1.2, 1.1, -0.2, 1.6, -2.5, 0.8, -0.5, 1.3, -3.1, 0.0, -0.9, 0.5, -1.6, -2.0]
CASES = {
    "cold": SamplingParams(temperature=0.5),
    "hot": SamplingParams(temperature=1.8),
    "top-k": SamplingParams(temperature=0.8, top_k=4),
    "top-p": SamplingParams(temperature=1.5, top_p=0.7),
    "top-k-top-p": SamplingParams(temperature=0.7, top_k=6, top_p=0.8),
}


def requests(params: SamplingParams, n: int, seed: int) -> list[Sequence]:
    return [Sequence(Request.make(i, [1], params, seed)) for i in range(n)]


def draw_tokens(params: SamplingParams, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """[STEPS, REQUESTS] tokens drawn from LOGITS on `device` by REQUESTS seeded requests."""
    seqs = requests(params, REQUESTS, seed)
    logits = torch.tensor([LOGITS] * REQUESTS, device=device)
    return torch.tensor([sample(logits, seqs)[0] for _ in range(STEPS)])


def counts_of(tokens: torch.Tensor) -> list[int]:
    return torch.bincount(tokens.flatten(), minlength=len(LOGITS)).tolist()


def check_distribution(counts: list[int], params: SamplingParams) -> None:
    probs = exact_distribution(LOGITS, params.temperature, params.top_k, params.top_p)
    outside = {t: c for t, (c, p) in enumerate(zip(counts, probs, strict=True)) if p == 0 and c}
    assert not outside, f"drew tokens outside the allowed set: {outside}"
    p_value = chi_square_p_value(counts, probs)
    expected = [round(p * sum(counts)) for p in probs]
    assert p_value > ALPHA, f"chi-square p = {p_value:.2e}: counts {counts}, expected {expected}"


@pytest.mark.parametrize("case", list(CASES))
def test_draws_follow_the_exact_distribution(case):
    check_distribution(counts_of(draw_tokens(CASES[case])), CASES[case])


def test_each_case_would_catch_the_temperature_applied_the_wrong_way():
    """Power: drawing with logits * T instead of logits / T (the same top-k and top-p) puts
    expected mass on excluded tokens, or gives the chi-square statistic a noncentrality
    lambda whose mean (dof + lambda) lies 4 standard deviations (sqrt(2 (dof + 2 lambda)))
    beyond the critical value at ALPHA: the bug fails the case all but surely."""
    n = REQUESTS * STEPS
    for name, p in CASES.items():
        right = exact_distribution(LOGITS, p.temperature, p.top_k, p.top_p)
        wrong = exact_distribution(LOGITS, 1 / p.temperature, p.top_k, p.top_p)
        outside = n * sum(w for w, r in zip(wrong, right, strict=True) if r == 0)
        lam = n * sum((w - r) ** 2 / r for w, r in zip(wrong, right, strict=True) if r > 0)
        dof = sum(r > 0 for r in right) - 1
        low = dof + lam - 4 * (2 * (dof + 2 * lam)) ** 0.5
        assert outside > 20 or chi_square_sf(low, dof) < ALPHA, (name, outside, lam)


def test_a_requests_draws_depend_on_its_seed_alone():
    """The same seed draws the same tokens alone or among other requests, at any row."""
    params = SamplingParams(temperature=0.9, top_p=0.95)
    alone = Sequence(Request.make(0, [1], params, 77))
    crowd = requests(params, 5, 1000)
    crowd[3] = Sequence(Request.make(3, [1], params, 77 - 3))  # seed 77 at row 3
    logits = torch.tensor([LOGITS] * 5)
    mine, theirs = [], []
    for _ in range(40):
        mine.append(sample(logits[:1], [alone])[0][0])
        theirs.append(sample(logits, crowd)[0][3])
    assert mine == theirs
    assert len(set(mine)) > 3  # drawn, not greedy


def test_top_k_one_and_temperature_zero_are_greedy():
    logits = torch.tensor([LOGITS] * 2)
    seqs = [
        Sequence(Request.make(0, [1], SamplingParams(temperature=0.0), 5)),
        Sequence(Request.make(1, [1], SamplingParams(temperature=3.0, top_k=1), 5)),
    ]
    for _ in range(20):
        assert sample(logits, seqs)[0] == [LOGITS.index(max(LOGITS))] * 2
