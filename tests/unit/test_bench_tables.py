"""The statistics figure (a) reports: ratios per launch pair, pooled, and the test that
separates a plan's effect from launch-to-launch noise."""

from __future__ import annotations

import math

import pytest

from bench.tpot_pairs import collect, markdown, pair_ratios, permutation_p, pooled, u_statistic


def rows(per_batch: list[list[float]]) -> list[dict]:
    return [
        {"batch_size": 2**i, "tpot_ms": sorted(launches)[len(launches) // 2],
         "launch_tpot_ms": launches}
        for i, launches in enumerate(per_batch)
    ]  # fmt: skip


def entry(model: str, tp: int, auto: list[list[float]], on: list[list[float]], differ: bool):
    plan = {"attn_tp_gather": {"value": True}}
    return {
        "model": model,
        "tp": tp,
        "auto": {"rows": rows(auto), "plan": {"attn_tp_gather": {"value": not differ}}},
        "on": {"rows": rows(on), "plan": plan},
    }


def test_pair_ratio_is_the_geometric_mean_over_batch_sizes_of_one_launch_pair() -> None:
    e = entry("M", 2, auto=[[1.0, 2.0], [4.0, 2.0]], on=[[2.0, 2.0], [1.0, 2.0]], differ=True)
    first, second = pair_ratios(e)
    assert first == pytest.approx(math.sqrt(0.5 * 4.0))
    assert second == pytest.approx(1.0)


def test_pooled_line_counts_cells_and_pairs() -> None:
    e = entry("M", 2, auto=[[1.0, 3.0], [1.0, 3.0]], on=[[2.0, 2.0], [2.0, 2.0]], differ=True)
    line = pooled(e["auto"]["rows"], e["on"]["rows"])
    assert "Over 4 cells" in line
    assert "below 1 in 2 of 4" in line
    assert "range 0.500-1.500" in line
    assert "per launch pair: 0.500, 1.500." in line


def test_collect_groups_by_whether_the_plans_differ() -> None:
    result = {
        "runs": [
            entry("D", 2, [[1.0]], [[2.0]], differ=True),
            entry("C", 2, [[2.0]], [[2.0]], differ=False),
            {"model": "X", "tp": 8, "skipped": "tp 8 needs 8 GPUs, 4 visible"},
        ]
    }
    assert collect([result, result]) == {("D", 2, True): [0.5, 0.5], ("C", 2, False): [1.0, 1.0]}


def test_u_statistic_counts_ties_half() -> None:
    assert u_statistic([1.0, 2.0], [2.0, 3.0]) == 3.5


def test_permutation_test_separates_a_shift_and_not_noise() -> None:
    control = [0.95, 1.0, 1.05, 0.97, 1.03, 1.01, 0.99]
    assert permutation_p([0.80, 0.82, 0.85, 0.84, 0.79, 0.83], control, 2000) < 0.01
    assert permutation_p([0.96, 1.02, 1.0, 0.98, 1.04, 1.01], control, 2000) > 0.1


def test_markdown_reports_the_test_only_with_both_groups() -> None:
    pairs = {("D", 2, True): [0.8, 0.85, 0.82], ("C", 2, False): [1.0, 0.97, 1.04]}
    text = markdown(pairs, min_tp=2, rounds=500)
    assert "| D | 2 | yes | 3 | 0.800, 0.850, 0.820 |" in text
    assert "Mann-Whitney U = 9 of 9" in text
    assert "Mann-Whitney" not in markdown({("D", 2, True): [0.8]}, min_tp=2, rounds=10)
