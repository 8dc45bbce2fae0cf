"""Figure (d), CPU: the gathered buffer's bytes per plan, for each model and topology.

For every model x topology x `--attn-tp-gather` mode the plan is resolved (refusals are
listed as such), the engine is launched on CPU with the model's embedded config and one
short request, and `gathered_buffer_bytes` is read from its report. The same bytes are
computed from the plan alone (the model runner's allocation, on the meta device) and must
agree; the
last column gives them for the GPU benchmark shapes (`bench.configs.GPU_CONFIGS`, bf16) at
`--cuda-graph-max-bs`.

    PYTHONPATH=. python bench/bench_gathered_buffer.py --out gathered.json --markdown g.md
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from bench.configs import GPU_CONFIGS, MODELS, available, model_config, publish
from engine.frontend.llm_engine import LLMEngine
from engine.messages import SamplingParams
from engine.runtime.model_runner import gathered_buffer
from engine.runtime.step_layout import capture_sizes
from engine.server_args import ServerArgs
from registry import PlanRefused, get_model_class, get_model_info, resolve_plan

TOPOLOGIES = {
    "tp1": [],
    "tp1 all2all": ["--moe-a2a-backend", "all2all"],
    "tp2": ["--tp-size", "2"],
    "tp2 all2all": ["--tp-size", "2", "--moe-a2a-backend", "all2all"],
    "tp2 dense-tp1": ["--tp-size", "2", "--moe-dense-tp-size", "1"],
    "tp4 all2all": ["--tp-size", "4", "--moe-a2a-backend", "all2all"],
    "tp4 dp2 dp-attn": ["--tp-size", "4", "--dp-size", "2", "--enable-dp-attention"],
    "tp4 dp2 dp-attn all2all": [
        "--tp-size", "4", "--dp-size", "2", "--enable-dp-attention", "--moe-a2a-backend", "all2all",
    ],
}  # fmt: skip
MODES = ("auto", "on", "off")


def planned_bytes(plan: Any, args: ServerArgs, hidden: int, dtype: torch.dtype) -> int:
    max_bs = args.cuda_graph_max_bs
    sizes = [] if args.disable_cuda_graph else capture_sizes(max_bs, plan.token_alignment)
    buf = gathered_buffer(plan, sizes, max_bs, hidden, dtype, torch.device("meta"))
    return 0 if buf is None else buf.numel() * buf.element_size()


def launched_bytes(args: ServerArgs) -> int:
    with LLMEngine(args) as engine:
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    # rank 0's last counters arrive by the time the ranks have exited
    return int(engine.report()["counters"]["gathered_buffer_bytes"])


def measure(arch: str, topology: list[str], mode: str, ns: argparse.Namespace) -> dict[str, Any]:
    argv = ["--model", arch, *topology, "--attn-tp-gather", mode,
            "--cuda-graph-max-bs", str(ns.cuda_graph_max_bs)]  # fmt: skip
    args = ServerArgs.from_cli(argv)
    try:
        plan = resolve_plan(get_model_info(arch).capabilities, args, model=arch)
    except PlanRefused as e:
        return {"refused": str(e)}
    tiny = get_model_class(arch).tiny_config()
    row: dict[str, Any] = {
        "attn_tp_gather": plan.attn_tp_gather.value,
        "mlp_tp_gather": plan.mlp_tp_gather.value,
        "gathered_buffer": plan.gathered_buffer.value,
        "token_alignment": plan.token_alignment,
        "planned_bytes": planned_bytes(plan, args, tiny["hidden_size"], torch.float32),
        "gpu_shape_bytes": planned_bytes(
            plan, args, model_config(arch, GPU_CONFIGS.get(arch))["hidden_size"], torch.bfloat16
        ),
    }
    if ns.launch:
        try:
            row["engine_bytes"] = launched_bytes(args)
        except Exception as e:  # noqa: BLE001 - report it in the table, go on
            row["engine_error"] = " ".join(str(e).split())
    return row


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Gathered-buffer bytes per plan; engine: embedded tiny configs on CPU (fp32); GPU "
        f"shapes: `bench.configs.GPU_CONFIGS` in bf16; `--cuda-graph-max-bs "
        f"{r['cuda_graph_max_bs']}`.",
        "",
        "| model | topology | mode | attn_tp_gather | mlp_tp_gather | alignment "
        "| engine report | from the plan | GPU shapes |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        head = f"| {row['model']} | {row['topology']} | {row['mode']} "
        if "skipped" in row:
            lines.append(head + f"| skipped: {row['skipped']} | | | | | |")
        elif "refused" in row:
            lines.append(head + "| refused | | | | | |")
        else:
            engine = row.get("engine_bytes", "not launched")
            if "engine_error" in row:
                engine = f"launch failed ({row['engine_error'][:64]}...)"
            lines.append(
                head + f"| {row['attn_tp_gather']} | {row['mlp_tp_gather']} "
                f"| {row['token_alignment']} | {engine} | {row['planned_bytes']} "
                f"| {row['gpu_shape_bytes']:,} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
    p.add_argument("--cuda-graph-max-bs", type=int, default=32)
    p.add_argument("--no-launch", dest="launch", action="store_false",
                   help="plan only: skip the engine launches")  # fmt: skip
    p.add_argument("--out", default="gathered_buffer.json")
    p.add_argument("--markdown")
    ns = p.parse_args(argv)
    result: dict[str, Any] = {
        "cuda_graph_max_bs": ns.cuda_graph_max_bs,
        "command": "PYTHONPATH=. python bench/bench_gathered_buffer.py "
        + " ".join(argv or sys.argv[1:]),
        "rows": [],
    }
    mismatches = 0
    for arch in ns.models:
        missing = available(arch)
        for name in ns.topologies:
            for mode in MODES:
                row = {"model": arch, "topology": name, "mode": mode}
                if missing:
                    row["skipped"] = missing
                else:
                    row |= measure(arch, TOPOLOGIES[name], mode, ns)
                if "engine_bytes" in row and row["engine_bytes"] != row["planned_bytes"]:
                    mismatches += 1
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    result["mismatches"] = mismatches
    publish(result, markdown(result), ns.out, ns.markdown)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
