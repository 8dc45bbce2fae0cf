"""Host time per decode step: end-to-end TPOT minus the decode step's device time, per
model, TP size, batch size, with the overlap scheduler on and off.

One engine per (model, tp, overlap), run in this process's front end as a user's would be;
each batch size is one warm-up round and one timed round, all requests submitted at once,
so after the shared prefill every step decodes exactly that batch. TPOT is the front end's
(mean over the requests of (last - first token time) / (tokens - 1)); the device time of a
decode step comes from the ranks' CUDA events around each step (`decode_device_ms`,
`decode_steps` in the counters), read as the difference over the timed round. Models are
the realistic shapes of `bench/models/*/config.json` (`--model-dir`, seeded random
weights drawn on the GPU) or the engine's benchmark shapes (`--model ARCH`,
`bench.configs.GPU_CONFIGS`). MoE models run `--moe-a2a-backend all2all` at tp > 1.

    PYTHONPATH=. python bench/bench_host_time.py --model-dir bench/models/llama-3.1-8b \
        --tp 1 2 --out host.json --markdown host.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.configs import GPU_CONFIGS, model_config, publish, setup
from engine.frontend.llm_engine import LLMEngine
from engine.messages import SamplingParams

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
MOE = ("Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV4ForCausalLM")


def counters(engine: LLMEngine, decode_steps: int, timeout_s: float = 20.0) -> dict[str, Any]:
    """Rank 0's counters once they show `decode_steps` (they arrive when it runs idle)."""
    deadline = time.monotonic() + timeout_s
    while True:
        c = engine.report()["counters"]
        if c["decode_steps"] >= decode_steps or time.monotonic() > deadline:
            return c


def device_total_ms(c: dict[str, Any]) -> float:
    return (c["decode_device_ms"] or 0.0) * c["decode_steps"]


def run(name: str, arch: str, config: dict[str, Any], tp: int, overlap: bool, ns) -> dict:
    largest = max(ns.batch_sizes)
    argv = ["--device", ns.device, "--tp-size", str(tp),
            "--cuda-graph-max-bs", str(largest), "--max-running-requests", str(largest),
            "--max-total-tokens", str(largest * (ns.prompt_len + ns.new_tokens) + 64)]  # fmt: skip
    if arch in MOE and tp > 1:
        argv += ["--moe-a2a-backend", "all2all"]
    if not overlap:
        argv.append("--disable-overlap-schedule")
    s = setup(arch, config, argv)
    rows = []
    gen = torch.Generator().manual_seed(tp)
    with LLMEngine(s.launch.args, setup=s) as engine:
        warm = SamplingParams(max_new_tokens=4, ignore_eos=True)
        timed = SamplingParams(max_new_tokens=ns.new_tokens, ignore_eos=True)
        for bs in ns.batch_sizes:
            ids = torch.randint(0, config["vocab_size"], (bs, ns.prompt_len), generator=gen)
            engine.generate(ids.tolist(), warm)
            before = counters(engine, 0)
            results = engine.generate(ids.tolist(), timed)
            after = counters(engine, before["decode_steps"] + ns.new_tokens - 1)
            steps = after["decode_steps"] - before["decode_steps"]
            device = (device_total_ms(after) - device_total_ms(before)) / max(steps, 1) or 1e-9
            tpot = 1000 * statistics.mean(r.tpot for r in results)
            row = {"batch_size": bs, "tpot_ms": tpot, "device_ms": device}
            row |= {"host_ms": tpot - device, "tpot_over_device": tpot / device}
            rows.append(row | {"decode_steps": steps})
            mode = "on" if overlap else "off"
            print(
                f"{name} tp{tp} overlap {mode} bs{bs}: TPOT {tpot:.3f} ms, device "
                f"{device:.3f} ms, host {tpot - device:.3f} ms",
                flush=True,
            )
    sizes = engine.report()["counters"]["capture_sizes"]
    return {"model": name, "tp": tp, "overlap": overlap, "rows": rows, "capture_sizes": sizes}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Host time per decode step on {result['device']}: TPOT (front end) minus the decode "
        f"step's device time (CUDA events in the ranks); {result['new_tokens']} tokens per "
        f"request after a {result['prompt_len']}-token prompt, bf16, CUDA graphs.",
        "",
        "| model | tp | batch | overlap | TPOT ms | device ms | host ms | TPOT / device |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for run_ in result["runs"]:
        if "error" in run_:
            lines.append(f"| {run_['model']} | {run_['tp']} | | | {run_['error']} | | | |")
            continue
        for r in run_["rows"]:
            lines.append(
                f"| {run_['model']} | {run_['tp']} | {r['batch_size']} | "
                f"{'on' if run_['overlap'] else 'off'} | {r['tpot_ms']:.3f} | "
                f"{r['device_ms']:.3f} | {r['host_ms']:.3f} | {r['tpot_over_device']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", action="append", default=[], help="a config.json folder")
    p.add_argument("--model", action="append", default=[], help="ARCH at its bench shape")
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    p.add_argument("--overlap", nargs="+", choices=("on", "off"), default=["on", "off"])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default="host_time.json")
    p.add_argument("--markdown")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    ns = p.parse_args(argv)
    if ns.device == "cuda" and not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    models = [
        (Path(d).name, json.loads((Path(d) / "config.json").read_text())) for d in ns.model_dir
    ]
    models += [(a, model_config(a, GPU_CONFIGS.get(a))) for a in ns.model]
    card = torch.cuda.get_device_name() if ns.device == "cuda" else "cpu"
    result = {"device": f"{torch.cuda.device_count()} x {card}",
              "torch": torch.__version__, "prompt_len": ns.prompt_len,
              "new_tokens": ns.new_tokens, "command": "PYTHONPATH=. python "
              "bench/bench_host_time.py " + " ".join(argv or sys.argv[1:]), "runs": []}  # fmt: skip
    for name, config in models:
        arch = config["architectures"][0]
        for tp in ns.tp:
            if ns.device == "cuda" and tp > torch.cuda.device_count():
                continue
            for mode in ns.overlap:
                try:
                    result["runs"].append(run(name, arch, config, tp, mode == "on", ns))
                except Exception as e:  # noqa: BLE001 - one failed launch must not stop the rest
                    error = f"{type(e).__name__}: {' '.join(str(e).split())}"
                    result["runs"].append({"model": name, "tp": tp, "error": error})
                    print(f"{name} tp{tp} {mode}: {error}", flush=True)
                Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    publish(result, markdown(result), ns.out, ns.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
