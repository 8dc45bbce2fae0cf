"""Figure (c), CPU: what the scheduler's mlp_sync costs per step, on vs off, at tp 2 and 4.

Two measurements per TP size:

- the collectives alone, timed on rank 0 over `--calls` calls each, interleaved:
  `cpu_all_gather_ints` of the 6-int sync vector over the gloo CPU group (what a step with
  mlp_sync adds), and the per-step intake broadcast both ways (a pickled object, and the
  three ints a step with nothing new now sends);
- the engine: the embedded tiny DeepSeek-V3 decoding `--batch` requests on CPU with
  `--moe-a2a-backend all2all`, under `auto` (the model manages its own SP: no gather, no
  gathered buffer, so no mlp_sync) and `--attn-tp-gather on` (gather decided, so mlp_sync).
  The model computes the same either way (it never reads the gathered buffer) and the batch
  is a multiple of the alignment (no padding): the difference is the per-step sync. TPOT is
  the median of `--repeats` timed rounds per launch.

    PYTHONPATH=. python bench/bench_sync_overhead.py --out sync.json --markdown sync.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from bench.configs import publish
from engine.frontend.llm_engine import LLMEngine
from engine.messages import SamplingParams
from engine.server_args import ServerArgs

SYNC_VECTOR = [8, 1, 0, 1, 0, 3]  # num_tokens, can_run_graph, is_extend, has_work, idle, seen


def _collective_loop(rank: int, tp: int, init: str, calls: int, out: Any) -> None:
    from engine.runtime.process_groups import (
        broadcast_ints,
        broadcast_object,
        cpu_all_gather_ints,
        destroy_parallel,
        init_parallel,
    )
    from engine.runtime.worker import Intake

    torch.set_num_threads(1)
    init_parallel(rank, tp, 1, torch.device("cpu"), init, 60)
    leader = rank == 0
    empty = Intake((), (), 3, False)
    ops = {
        "sync": lambda: cpu_all_gather_ints(SYNC_VECTOR, "tp"),
        "intake_object": lambda: broadcast_object(empty if leader else None, "attn_tp"),
        "intake_ints": lambda: broadcast_ints([0, 3, 0] if leader else None, 3, "attn_tp"),
    }
    for op in ops.values():
        for _ in range(50):
            op()
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(calls):
        for name, op in ops.items():  # interleaved: the machine's drift hits each alike
            t0 = time.perf_counter()
            op()
            times[name].append(time.perf_counter() - t0)
    if leader:
        out.put(times)
    destroy_parallel()


def collective_us(tp: int, calls: int) -> dict[str, dict[str, float]]:
    """Per collective a step may run, its time on rank 0: median and quartiles, in µs."""
    from engine.frontend.launcher import init_method

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = init_method(ServerArgs.from_cli(["--model", "LlamaForCausalLM"]))
    procs = [
        ctx.Process(target=_collective_loop, args=(r, tp, init, calls, out)) for r in range(tp)
    ]
    for p in procs:
        p.start()
    times = out.get(timeout=300)
    for p in procs:
        p.join()
    stats = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        stats[name] = {"median_us": 1e6 * statistics.median(ts), "p25_us": 1e6 * q[0],
                       "p75_us": 1e6 * q[2]}  # fmt: skip
    return stats


def engine_tpot(tp: int, mode: str, ns: argparse.Namespace) -> dict[str, Any]:
    args = ServerArgs.from_cli(
        ["--model", ns.model, "--tp-size", str(tp), "--moe-a2a-backend", "all2all",
         "--attn-tp-gather", mode]
    )  # fmt: skip
    gen = torch.Generator().manual_seed(tp)
    prompts = torch.randint(0, 256, (ns.batch, 8), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=ns.new_tokens, ignore_eos=True)
    with LLMEngine(args) as engine:
        engine.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
        tpots = []
        for _ in range(ns.repeats):
            results = engine.generate(prompts, params)
            tpots.append(statistics.mean(r.tpot for r in results))
    report = engine.report()  # after shutdown: rank 0's final counters
    return {
        "tpot_ms": 1e3 * statistics.median(tpots),
        "tpot_ms_rounds": [1e3 * t for t in tpots],
        "mlp_sync": report["plan"]["plan"]["mlp_sync"]["value"],
        "counters": report["counters"],
    }


def _us(c: dict[str, float]) -> str:
    return f"{c['median_us']:.0f} µs [{c['p25_us']:.0f}, {c['p75_us']:.0f}]"


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"mlp_sync per-step overhead on CPU ({r['cpus']} cores, {r['machine']}); tiny "
        f"{r['model']}, all2all, auto (sync off) vs --attn-tp-gather on (sync on), "
        f"batch {r['batch']}, {r['new_tokens']} tokens per request, median of "
        f"{r['repeats']} rounds.",
        "",
        "| tp | all-gather of the sync vector (median [p25, p75]) | TPOT sync off | TPOT sync on "
        "| on / off | on - off | sync calls / steps, off; on |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        c, off, on = row["collectives"]["sync"], row["off"], row["on"]
        lines.append(
            f"| {row['tp']} | {_us(c)} "
            f"| {off['tpot_ms']:.2f} ms | {on['tpot_ms']:.2f} ms "
            f"| {on['tpot_ms'] / off['tpot_ms']:.3f} | {on['tpot_ms'] - off['tpot_ms']:+.2f} ms "
            f"| {off['counters']['mlp_sync_calls']} / {off['counters']['steps']}; "
            f"{on['counters']['mlp_sync_calls']} / {on['counters']['steps']} |"
        )
    lines += [
        "",
        "Every step also shares the leader's intake (new requests, aborts) with its "
        "attention-TP group. On a step with nothing new, three ints now do "
        "(`broadcast_ints`); before, a pickled object did (`broadcast_object`: two "
        "collectives). Both were timed interleaved in the same ranks:",
        "",
        "| tp | intake as an object | intake as 3 ints | ints / object |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        obj, ints = row["collectives"]["intake_object"], row["collectives"]["intake_ints"]
        lines.append(
            f"| {row['tp']} | {_us(obj)} | {_us(ints)} "
            f"| {ints['median_us'] / obj['median_us']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DeepseekV3ForCausalLM")
    p.add_argument("--tp", nargs="+", type=int, default=[2, 4])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="sync_overhead.json")
    p.add_argument("--markdown")
    ns = p.parse_args(argv)
    result: dict[str, Any] = {
        "model": ns.model,
        "cpus": os.cpu_count(),
        "machine": os.uname().machine,
        "batch": ns.batch,
        "new_tokens": ns.new_tokens,
        "repeats": ns.repeats,
        "command": "PYTHONPATH=. python bench/bench_sync_overhead.py "
        + " ".join(argv or sys.argv[1:]),
        "rows": [],
    }
    for tp in ns.tp:
        if ns.batch % tp:
            raise SystemExit(f"--batch {ns.batch} must be a multiple of tp {tp} (no padding)")
        row = {"tp": tp, "collectives": collective_us(tp, ns.calls)}
        row["off"] = engine_tpot(tp, "auto", ns)
        row["on"] = engine_tpot(tp, "on", ns)
        assert not row["off"]["mlp_sync"] and row["on"]["mlp_sync"]
        result["rows"].append(row)
        us = row["collectives"]["sync"]["median_us"]
        off, on = row["off"]["tpot_ms"], row["on"]["tpot_ms"]
        print(f"tp {tp}: {us:.0f} us/sync, TPOT off {off:.2f} ms, on {on:.2f} ms", flush=True)
    publish(result, markdown(result), ns.out, ns.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
