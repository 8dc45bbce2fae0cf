"""Figure (a), pooled: the auto / on TPOT ratio per launch pair, over one or more runs of
`bench_tpot.py`, and whether the plan's choice is faster beyond launch-to-launch noise.

A launch pair is one `auto` launch and the `on` launch next to it; its ratio is the
geometric mean over the batch sizes of TPOT auto / TPOT on. Cells of one pair share that
pair's host speed, so pairs, not cells, are the samples. Pairs of models whose two plans
differ (DeepSeek-V3: auto drops the gather) are compared with pairs of models that run the
same plan in both modes (the controls: their ratios are noise alone), by the Mann-Whitney
U statistic and a seeded permutation test of it (one-sided: differing-plan ratios lower).

    PYTHONPATH=. python bench/tpot_pairs.py bench/results/tpot_run4_*.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

Key = tuple[str, int, bool]  # model, tp, plans differ


def cell_ratios(
    auto_rows: list[dict[str, Any]], on_rows: list[dict[str, Any]]
) -> list[list[float]]:
    """TPOT auto / on per launch pair (outer) and batch size (inner)."""

    def tpots(row: dict[str, Any]) -> list[float]:
        return row.get("launch_tpot_ms", [row["tpot_ms"]])

    per_batch = [
        [x / y for x, y in zip(tpots(a), tpots(o), strict=True)]
        for a, o in zip(auto_rows, on_rows, strict=True)
    ]
    return [list(pair) for pair in zip(*per_batch, strict=True)]


def pair_ratios(entry: dict[str, Any]) -> list[float]:
    pairs = cell_ratios(entry["auto"]["rows"], entry["on"]["rows"])
    return [statistics.geometric_mean(pair) for pair in pairs]


def pooled(auto_rows: list[dict[str, Any]], on_rows: list[dict[str, Any]]) -> str:
    """One line under a table: the ratios over every (batch size, launch pair) cell, and the
    geometric mean of each launch pair."""
    pairs = cell_ratios(auto_rows, on_rows)
    cells = [r for pair in pairs for r in pair]
    means = ", ".join(f"{statistics.geometric_mean(pair):.3f}" for pair in pairs)
    return (
        f"Over {len(cells)} cells (batch size x launch pair): auto / on geometric mean "
        f"{statistics.geometric_mean(cells):.3f}, range {min(cells):.3f}-{max(cells):.3f}, "
        f"below 1 in {sum(r < 1 for r in cells)} of {len(cells)}; per launch pair: {means}."
    )


def plans_differ(entry: dict[str, Any]) -> bool:
    def values(plan: dict[str, Any]) -> dict[str, Any]:
        return {name: decision["value"] for name, decision in plan.items()}

    return values(entry["auto"]["plan"]) != values(entry["on"]["plan"])


def collect(results: list[dict[str, Any]]) -> dict[Key, list[float]]:
    pairs: dict[Key, list[float]] = {}
    for result in results:
        for entry in result["runs"]:
            if "rows" in entry.get("auto", {}) and "rows" in entry.get("on", {}):
                key = (entry["model"], entry["tp"], plans_differ(entry))
                pairs.setdefault(key, []).extend(pair_ratios(entry))
    return pairs


def u_statistic(low: list[float], high: list[float]) -> float:
    """How many (x, y) with x from `low`, y from `high` have x < y (ties count half)."""
    return sum((x < y) + 0.5 * (x == y) for x in low for y in high)


def permutation_p(low: list[float], high: list[float], rounds: int, seed: int = 0) -> float:
    observed = u_statistic(low, high)
    pool, rng, hits = low + high, random.Random(seed), 0
    for _ in range(rounds):
        rng.shuffle(pool)
        hits += u_statistic(pool[: len(low)], pool[len(low) :]) >= observed
    return (hits + 1) / (rounds + 1)


def markdown(pairs: dict[Key, list[float]], min_tp: int, rounds: int) -> str:
    lines = [
        "| model | tp | plans differ | launch pairs | auto / on per pair | geometric mean |",
        "| --- | ---: | --- | ---: | --- | ---: |",
    ]
    for (model, tp, differ), ratios in sorted(pairs.items(), key=lambda kv: (not kv[0][2], kv[0])):
        lines.append(
            f"| {model} | {tp} | {'yes' if differ else 'no (control)'} | {len(ratios)} "
            f"| {', '.join(f'{r:.3f}' for r in ratios)} "
            f"| {statistics.geometric_mean(ratios):.3f} |"
        )
    test = [r for (_, tp, d), rs in pairs.items() if d and tp >= min_tp for r in rs]
    control = [r for (_, tp, d), rs in pairs.items() if not d and tp >= min_tp for r in rs]
    if test and control:
        u = u_statistic(test, control)
        lines += [
            "",
            f"At tp >= {min_tp}: plans differ, {len(test)} pairs, geometric mean "
            f"{statistics.geometric_mean(test):.3f} ({min(test):.3f}-{max(test):.3f}); "
            f"controls, {len(control)} pairs, {statistics.geometric_mean(control):.3f} "
            f"({min(control):.3f}-{max(control):.3f}). Mann-Whitney U = {u:g} of "
            f"{len(test) * len(control)}; one-sided permutation p = "
            f"{permutation_p(test, control, rounds):.1e} ({rounds} permutations).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="JSON files written by bench_tpot.py --out")
    p.add_argument("--min-tp", type=int, default=2, help="pool pairs at this TP size and above")
    p.add_argument("--permutations", type=int, default=100_000)
    ns = p.parse_args(argv)
    try:
        results = [json.loads(Path(f).read_text()) for f in ns.results]
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(collect(results), ns.min_tp, ns.permutations), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
