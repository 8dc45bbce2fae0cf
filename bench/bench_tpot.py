"""Figure (a): decode TPOT per batch size, plan `auto` vs `--attn-tp-gather on`, side by side.

For each model and TP size, one engine per mode (same card, same run, back to back). Every
batch size runs a warm-up round (first all of them, then again right before its timing),
then `--repeats` timed rounds: all requests submitted at once, so after the shared prefill
every step decodes exactly that batch. TPOT is the mean over the
requests of (last token time - first token time) / (tokens - 1), as the front end sees it
(`engine.frontend.results.Result.tpot`); the step time, the median gap between one request's
consecutive tokens, is the same figure without the odd host stall. Both modes run with the
all2all MoE backend, the topology where the gather question arises at every TP size
(`--attn-tp-gather on` needs it).

    PYTHONPATH=. python bench/bench_tpot.py --tp 1 2 4 --out tpot.json --markdown tpot.md

`--model-dir DIR` (repeatable) adds a realistic shape from a config.json folder (e.g.
bench/models/moonlight-16b-a3b), with seeded random weights drawn on the GPU; `--models`
picks the benchmark shapes (`bench.configs.GPU_CONFIGS`), `--models` with no name none.

A model whose module is missing is skipped (noted in the output), as is a TP size above the
number of visible GPUs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.configs import GPU_CONFIGS, MODELS, available, model_config, publish, setup
from bench.tpot_pairs import pooled
from engine.frontend.llm_engine import LLMEngine
from engine.messages import SamplingParams
from registry import PlanRefused

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
MODES = ("auto", "on")


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def timed_round(engine: LLMEngine, ids: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Submit every request at once; TPOT (mean over requests, from the times the ranks
    sampled the tokens) and the decode step time (median gap between one request's
    consecutive tokens as this process receives them; all rows share each step)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    rids = engine.submit_many(ids, params, keep=True)
    arrivals: dict[int, list[float]] = {rid: [] for rid in rids}
    pending = set(rids)
    while pending:
        event = engine.poll()
        if event.rid in arrivals and event.token_id is not None:
            arrivals[event.rid].append(time.monotonic())
        if event.finished:
            pending.discard(event.rid)
    tpots = [engine.take(rid).tpot for rid in rids]
    first = arrivals[rids[0]]
    gaps = [b - a for a, b in zip(first, first[1:])]
    return {
        "tpot_ms": 1000 * statistics.mean(tpots),
        "step_ms": 1000 * statistics.median(gaps),
        "max_gap_ms": 1000 * max(gaps),
    }


def run_engine(
    arch: str, config: dict[str, Any], tp: int, mode: str, ns: argparse.Namespace
) -> dict[str, Any]:
    """One launch: TPOT for every batch size, and the launch's plan and counters."""
    largest = max(ns.batch_sizes)
    argv = [
        "--device", "cuda", "--dtype", "bfloat16", "--tp-size", str(tp),
        "--moe-a2a-backend", "all2all", "--attn-tp-gather", mode,
        "--cuda-graph-max-bs", str(largest), "--max-running-requests", str(largest),
        "--max-total-tokens", str(largest * (ns.prompt_len + ns.new_tokens) + 64),
    ]  # fmt: skip
    if ns.disable_cuda_graph:
        argv.append("--disable-cuda-graph")
    try:
        s = setup(arch, config, argv)
    except PlanRefused as e:
        return {"refused": str(e)}
    start = time.perf_counter()
    rows = []
    with LLMEngine(s.launch.args, setup=s) as engine:
        load_s = time.perf_counter() - start
        # this process only times events: keep collections of its startup heap out of it
        gc.collect()
        gc.freeze()
        warmup = SamplingParams(max_new_tokens=ns.warmup_tokens, ignore_eos=True)
        batches = {
            bs: prompts(bs, ns.prompt_len, config["vocab_size"], seed=bs) for bs in ns.batch_sizes
        }
        for ids in batches.values():  # every shape once before any timing
            engine.generate(ids, warmup)
        for bs, ids in batches.items():
            engine.generate(ids, warmup)
            rounds = [timed_round(engine, ids, ns.new_tokens) for _ in range(ns.repeats)]
            r = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
            rows.append({"batch_size": bs, **r, "rounds": rounds})
            print(
                f"{arch} tp{tp} {mode:>4} bs{bs:>3}: TPOT {r['tpot_ms']:.3f} ms, step "
                f"{r['step_ms']:.3f} ms (longest gap {r['max_gap_ms']:.1f} ms)",
                flush=True,
            )
    report = engine.report()  # after shutdown: rank 0's final counters
    if engine.error:  # after the timings, e.g. ranks that did not exit: said, not hidden
        print(f"{arch} tp{tp} {mode}: {engine.error}", file=sys.stderr, flush=True)
    return {
        "shutdown_error": engine.error,
        "load_s": load_s,
        "rows": rows,
        "plan": report["plan"]["plan"],
        "counters": report["counters"],
    }


def merge(launches: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's launches as one: per batch size the median over every timed round."""
    bad = [r for r in launches if "rows" not in r]
    if bad:
        return bad[0]
    rows = []
    for per_launch in zip(*(r["rows"] for r in launches), strict=True):
        rounds = [x for row in per_launch for x in row["rounds"]]
        medians = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
        per = [row["tpot_ms"] for row in per_launch]
        rows.append(
            {"batch_size": per_launch[0]["batch_size"], **medians, "launch_tpot_ms": per,
             "rounds": rounds}
        )  # fmt: skip
    first = launches[0]
    return {
        "load_s": [r["load_s"] for r in launches],
        "shutdown_errors": [e for r in launches if (e := r.get("shutdown_error"))],
        "rows": rows,
        "plan": first["plan"],
        "counters": first["counters"],
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Decode TPOT (ms) on {result['device']}; {result['new_tokens']} tokens per request "
        f"after a {result['prompt_len']}-token prompt; bf16, `--moe-a2a-backend all2all`. "
        "TPOT: mean over the requests of (last - first token time) / (tokens - 1); step: "
        "median gap between consecutive tokens (robust to a stray host stall); each the "
        f"median of {result['repeats']} timed rounds in each of "
        f"{result.get('launches', 1)} launches per mode, launched "
        f"{result.get('order', 'auto, on, auto, on, ...')}",
        "",
    ]
    for entry in result["runs"]:
        head = f"**{entry['model']}**, tp {entry['tp']}"
        if "skipped" in entry:
            lines += [f"{head}: skipped ({entry['skipped']})", ""]
            continue
        auto, on = entry["auto"], entry["on"]
        failed = [
            f"{m}: {r.get('refused') or r.get('error')}"
            for m, r in (("auto", auto), ("on", on))
            if "rows" not in r
        ]
        if failed:
            lines += [f"{head}: not measured ({'; '.join(failed)})", ""]
            continue
        gather = f"auto -> attn_tp_gather {auto['plan']['attn_tp_gather']['value']}"
        ca, co = auto["counters"], on["counters"]
        lines += [
            f"{head} ({gather}; padding tokens auto {ca['attn_tp_padding_tokens']}, on "
            f"{co['attn_tp_padding_tokens']}; gathered-buffer bytes auto "
            f"{ca['gathered_buffer_bytes']}, on {co['gathered_buffer_bytes']})",
            "",
            "| batch | TPOT auto | TPOT on | auto / on | step auto | step on | auto / on "
            "| TPOT auto / on, per launch pair |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for a, o in zip(auto["rows"], on["rows"], strict=True):
            pairs = zip(a.get("launch_tpot_ms", []), o.get("launch_tpot_ms", []), strict=True)
            lines.append(
                f"| {a['batch_size']} | {a['tpot_ms']:.3f} | {o['tpot_ms']:.3f} "
                f"| {a['tpot_ms'] / o['tpot_ms']:.3f} | {a['step_ms']:.3f} | {o['step_ms']:.3f} "
                f"| {a['step_ms'] / o['step_ms']:.3f} "
                f"| {', '.join(f'{x / y:.3f}' for x, y in pairs)} |"
            )
        lines += ["", pooled(auto["rows"], on["rows"])]
        errors = auto.get("shutdown_errors", []) + on.get("shutdown_errors", [])
        if errors:
            lines += ["", f"After the timings: {'; '.join(sorted(set(errors)))}"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--model-dir", action="append", default=[], help="a config.json folder")
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup-tokens", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size (median)")
    p.add_argument(
        "--launches",
        type=int,
        default=1,
        help="launches per mode, in the order auto, on, on, auto, ...",
    )
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--out", default="tpot.json")
    p.add_argument("--markdown", help="also write the tables here")
    ns = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    result: dict[str, Any] = {
        "device": f"{gpus} x {torch.cuda.get_device_name()}",
        "torch": torch.__version__,
        "prompt_len": ns.prompt_len,
        "new_tokens": ns.new_tokens,
        "repeats": ns.repeats,
        "launches": ns.launches,
        "order": "auto, on, on, auto, auto, on, ...",
        "command": "PYTHONPATH=. python bench/bench_tpot.py " + " ".join(argv or sys.argv[1:]),
        "runs": [],
    }
    shapes = [(arch, model_config(arch, GPU_CONFIGS.get(arch))) for arch in ns.models]
    for folder in ns.model_dir:
        shapes.append((Path(folder).name, json.loads((Path(folder) / "config.json").read_text())))
    for name, config in shapes:
        arch = config["architectures"][0]
        missing = available(arch)
        for tp in ns.tp:
            entry: dict[str, Any] = {"model": name, "tp": tp}
            if missing or tp > gpus:
                entry["skipped"] = missing or f"tp {tp} needs {tp} GPUs, {gpus} visible"
                print(f"{name} tp{tp}: skipped: {entry['skipped']}", flush=True)
            else:
                launches: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
                for i in range(ns.launches):
                    # ABBA: a drift over the run (clocks, caches) hits both modes alike
                    for mode in MODES if i % 2 == 0 else MODES[::-1]:
                        try:
                            launches[mode].append(run_engine(arch, config, tp, mode, ns))
                        except Exception as e:  # noqa: BLE001 - one failed launch must not stop the rest
                            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
                            launches[mode].append({"error": error})
                            print(f"{arch} tp{tp} {mode}: {error}", flush=True)
                for mode in MODES:
                    entry[mode] = merge(launches[mode])
            result["runs"].append(entry)
            Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    publish(result, markdown(result), ns.out, ns.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
