"""Decode TPOT of two checkouts of parcap side by side, on the CPU or a GPU.

Each launch is `parcap generate` run from one checkout (its own tree on PYTHONPATH, this
interpreter) with `--report-json`; the TPOT is the report's mean over the requests. Launches
alternate between the checkouts in ABBA order per (model, tp) cell, so drift of the machine
hits both alike; the ratio per cell is the median TPOT of B over that of A.

    PYTHONPATH=. python bench/bench_ab.py --tree before=/path/to/old --tree after=. \\
        --models LlamaForCausalLM Qwen3MoeForCausalLM --tp 1 2 --launches 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PROMPT_IDS = [256, *b"The quick brown fox jumps over the lazy dog"]


def launch(tree: Path, model: str, tp: int, ns: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        prompts, report = Path(tmp) / "p.jsonl", Path(tmp) / "r.json"
        prompts.write_text(json.dumps({"input_ids": PROMPT_IDS}) + "\n")
        argv = [sys.executable, "-m", "engine.cli", "generate", "--model", model,
                "--tp-size", str(tp), "--input", str(prompts), "--max-new-tokens",
                str(ns.new_tokens), "--ignore-eos", "--report-json", str(report),
                "--output", str(Path(tmp) / "out.jsonl"), *ns.extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{tree}: {model} tp {tp}: {done.stderr.strip().splitlines()[-1]}")
        doc = json.loads(report.read_text())
        out = json.loads((Path(tmp) / "out.jsonl").read_text())
        return {"tpot_ms": doc["timings"]["tpot_ms"], "tokens": out["output_ids"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--models", nargs="+", default=["LlamaForCausalLM"])
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    p.add_argument("--launches", type=int, default=4, help="per checkout and cell (ABBA)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("extra", nargs="*", help="more `parcap generate` flags, after --")
    ns = p.parse_args(argv)
    trees = [(name, Path(d).resolve()) for name, _, d in (t.partition("=") for t in ns.tree)]
    if len(trees) != 2:
        p.error("give exactly two --tree NAME=DIR")
    (a, tree_a), (b, tree_b) = trees
    rows = []
    for model in ns.models:
        for tp in ns.tp:
            tpots: dict[str, list[float]] = {a: [], b: []}
            tokens = {}
            for i in range(ns.launches):
                order = [(a, tree_a), (b, tree_b)] if i % 2 == 0 else [(b, tree_b), (a, tree_a)]
                for name, tree in order:
                    r = launch(tree, model, tp, ns)
                    tpots[name].append(r["tpot_ms"])
                    tokens[name] = r["tokens"]
            ratio = statistics.median(tpots[b]) / statistics.median(tpots[a])
            rows.append({"model": model, "tp": tp, a: tpots[a], b: tpots[b],
                         "ratio": ratio, "same_tokens": tokens[a] == tokens[b]})  # fmt: skip
            print(
                f"{model:<24} tp {tp}  {a} {statistics.median(tpots[a]):7.2f} ms  "
                f"{b} {statistics.median(tpots[b]):7.2f} ms  {b}/{a} {ratio:.3f}  "
                f"same tokens: {tokens[a] == tokens[b]}",
                flush=True,
            )
    if ns.out:
        Path(ns.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
