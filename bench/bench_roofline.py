"""Figure (b): the fraction of the HBM roofline one decode step reaches at batch 1.

Builds the engine's `ModelRunner` in this process (tp 1, one GPU, bf16, FlashInfer decode,
CUDA graphs) for a Llama-3-8B-sized layer stack (`bench.configs.ROOFLINE_LLAMA`), prefills
one request of `--context` tokens and decodes. A decode step must read every weight once
(the embedding only its one row) and the KV cache of the context; the roofline time is those
bytes over the bandwidth of a large device-to-device copy measured here (bytes read +
written). Reported against it:

- the graph replay alone (device events): the GPU time of the step;
- the whole engine step (host clock): batch tensors, FlashInfer plan, replay, sampling;
- `parcap generate` end to end (a subprocess, as a user runs it, `--load-format dummy`):
  its TPOT at batch 1, and the decode step's device time the ranks measured;
- an eager step's kernels, profiled and split into GEMM/GEMV, attention and the rest,
  with the bandwidth each GEMM family reaches on its weight bytes.

`--model-dir DIR` runs a checkpoint folder's config.json (e.g. bench/models/llama-3.1-8b)
instead of figure (b)'s 8-layer stack.

    PYTHONPATH=. python bench/bench_roofline.py --out roofline.json --markdown roofline.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.configs import ROOFLINE_LLAMA, model_config, publish, setup
from engine.messages import Request, SamplingParams
from engine.model_api import ParallelState
from engine.model_api.parallel import set_parallel
from engine.runtime.model_runner import ModelRunner
from engine.runtime.scheduler import Scheduler

ARCH = "LlamaForCausalLM"
COPY_BYTES = 2 * 1024**3
KERNEL_FAMILIES = (
    ("attention", ("flashinfer", "batchdecode", "decode")),
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, read + written (median of 10)."""
    src = torch.randn(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / (median_device_s(lambda: dst.copy_(src), 10) or float("nan"))


def median_device_s(fn: Any, reps: int, inner: int = 1) -> float:
    """Median over `reps` of the device time of `inner` back-to-back calls, per call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / inner)
    return statistics.median(times)


class Session:
    """One request decoding through the runner, stepped as a worker steps it."""

    def __init__(
        self, runner: ModelRunner, launch: Any, context: int, vocab: int, steps: int
    ) -> None:
        self.runner = runner
        self.scheduler = Scheduler(runner.kv, runner.table, launch.limits, frozenset())
        prompt = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(0))
        params = SamplingParams(max_new_tokens=steps, ignore_eos=True)
        refused = self.scheduler.add(Request.make(0, prompt.tolist(), params, 0))
        if refused is not None:
            raise ValueError(refused.error)

    def step(self) -> Any:
        batch = self.scheduler.schedule()
        layout = self.runner.layouter.local(batch.mode, batch.num_tokens)
        tokens, logprobs = self.runner.step(batch, layout)
        self.scheduler.update(batch, tokens, logprobs)
        return batch, layout.rows


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes a batch-1 step reads per weight family: the embedding contributes one row."""
    out = {"gemm": 0, "embedding_row": 0, "norm": 0}
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.endswith("embed_tokens.weight"):
            out["embedding_row"] += p.shape[1] * p.element_size()
        elif p.dim() == 2:
            out["gemm"] += size
        else:
            out["norm"] += size
    return out


def profile_eager(runner: ModelRunner, session: Session) -> dict[str, Any]:
    """Kernel time of one eager decode forward, by family."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    batch = session.scheduler.schedule()
    fb = runner.prepare(batch, runner.layouter.local(batch.mode, batch.num_tokens))
    with torch.inference_mode():
        runner.backend.plan(fb)
        runner.model.forward(fb)  # warm
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.backend.plan(fb)
            runner.model.forward(fb)
            torch.cuda.synchronize()
    families: dict[str, float] = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    kernels = 0
    top: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        lower = e.name.lower()
        family = next((f for f, keys in KERNEL_FAMILIES if any(k in lower for k in keys)), "other")
        if "memcpy" in lower or "memset" in lower:
            family = "other"
        families[family] += us / 1e6
        kernels += 1
        top[e.name] = top.get(e.name, 0.0) + us / 1e6
    heaviest = sorted(top.items(), key=lambda kv: -kv[1])[:8]
    return {"family_s": families, "kernels": kernels, "heaviest": heaviest}


def end_to_end(config: dict[str, Any], context: int, new_tokens: int) -> dict[str, Any]:
    """`parcap generate` at batch 1 on `config` with dummy weights: its report."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(config))
        prompt = torch.randint(0, config["vocab_size"], (context,),
                               generator=torch.Generator().manual_seed(1)).tolist()  # fmt: skip
        (folder / "p.jsonl").write_text(json.dumps({"input_ids": prompt}) + "\n")
        argv = [sys.executable, "-m", "engine.cli", "generate", "--model-path", str(folder),
                "--load-format", "dummy", "--device", "cuda", "--dtype", "bfloat16",
                "--cuda-graph-max-bs", "1", "--max-running-requests", "1",
                "--max-total-tokens", str(context + new_tokens + 64), "--max-prefill-tokens",
                str(context), "--input", str(folder / "p.jsonl"), "--max-new-tokens",
                str(new_tokens), "--ignore-eos", "--output", str(folder / "out.jsonl"),
                "--report-json", str(folder / "report.json")]  # fmt: skip
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1:]}
        report = json.loads((folder / "report.json").read_text())
        return {"tpot_ms": report["timings"]["tpot_ms"], "counters": report["counters"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=1024, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=50, help="timed engine steps")
    p.add_argument("--e2e-tokens", type=int, default=128, help="tokens of the generate run")
    p.add_argument("--model-dir", help="a folder with the config.json to run")
    p.add_argument("--out", default="roofline.json")
    p.add_argument("--markdown", help="also write the table here")
    ns = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    torch.cuda.set_device(0)
    parallel = ParallelState.single(torch.device("cuda", 0))
    set_parallel(parallel)
    if ns.model_dir:
        config = json.loads((Path(ns.model_dir) / "config.json").read_text())
    else:
        config = model_config(ARCH, ROOFLINE_LLAMA)
    # first, before this process holds the weights: the command a user runs
    e2e = end_to_end(config, ns.context, ns.e2e_tokens)
    argv_engine = ["--device", "cuda", "--dtype", "bfloat16", "--cuda-graph-max-bs", "1",
                   "--max-running-requests", "1", "--max-total-tokens", str(ns.context + 4096),
                   "--max-prefill-tokens", str(ns.context)]  # fmt: skip
    s = setup(config["architectures"][0], config, argv_engine)
    start = time.perf_counter()
    runner = ModelRunner(s.launch, parallel)
    load_s = time.perf_counter() - start
    if 1 not in runner.graphs.graphs:
        print("no CUDA graph was captured at batch 1; the figure needs one", file=sys.stderr)
        return 1
    session = Session(runner, s.launch, ns.context, config["vocab_size"], ns.steps + 64)
    session.step()  # prefill
    for _ in range(5):
        session.step()
    step_s = []
    for _ in range(ns.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        session.step()
        step_s.append(time.perf_counter() - t0)
    graph = runner.graphs.graphs[1]
    replay_s = median_device_s(graph.graph.replay, 20, inner=10)
    profile = profile_eager(runner, session)
    bandwidth = copy_bandwidth()
    context = len(session.scheduler.running[0])
    kv_per_token = sum(
        b[0].numel() * b.element_size() for layer in runner.kv.buffers for b in layer
    )
    weights = weight_bytes(runner.model)
    kv_bytes = context * kv_per_token
    total = sum(weights.values()) + kv_bytes
    ideal_s = total / bandwidth
    step_med = statistics.median(step_s)
    fam = profile["family_s"]
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "PYTHONPATH=. python bench/bench_roofline.py " + " ".join(argv or sys.argv[1:]),
        "config": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "e2e": e2e,
        "load_s": load_s,
        "context_tokens": context,
        "bytes": {**weights, "kv": kv_bytes, "total": total},
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "roofline_ms": 1e3 * ideal_s,
        "graph_replay_ms": 1e3 * replay_s,
        "engine_step_ms": 1e3 * step_med,
        "fraction_graph": ideal_s / replay_s,
        "fraction_engine_step": ideal_s / step_med,
        "e2e_tpot_ms": e2e.get("tpot_ms"),
        # the e2e context grows over the run: its roofline at the mean context
        "fraction_e2e": (
            (total + ns.e2e_tokens / 2 * kv_per_token) / bandwidth / (e2e["tpot_ms"] / 1e3)
            if e2e.get("tpot_ms")
            else None
        ),
        "eager_kernels": profile["kernels"],
        "eager_kernel_ms": {k: 1e3 * v for k, v in fam.items()},
        "gemm_bandwidth_gbps": weights["gemm"] / fam["gemm"] / 1e9 if fam["gemm"] else None,
        "attention_bandwidth_gbps": kv_bytes / fam["attention"] / 1e9 if fam["attention"] else None,
        "heaviest_kernels_ms": [(name, 1e3 * t) for name, t in profile["heaviest"]],
    }
    publish(result, markdown(result), ns.out, ns.markdown)
    return 0


def markdown(r: dict[str, Any]) -> str:
    b, k = r["bytes"], r["eager_kernel_ms"]
    kernel_total = sum(k.values())
    gemm_bw = r["gemm_bandwidth_gbps"]
    attn_bw = r["attention_bandwidth_gbps"]
    return "\n".join([
        f"Decode step at batch 1 on {r['device']}: Llama, hidden {r['config']['hidden_size']}, "
        f"vocab {r['config']['vocab_size']}, {r['config']['num_hidden_layers']} layers, bf16, "
        f"context {r['context_tokens']} tokens.",
        "",
        "| quantity | value |",
        "| --- | ---: |",
        f"| bytes read per step (weights {b['gemm'] / 1e9:.3f} GB + KV {b['kv'] / 1e6:.1f} MB) "
        f"| {b['total'] / 1e9:.3f} GB |",
        f"| copy bandwidth (read + write) | {r['copy_bandwidth_gbps']:.0f} GB/s |",
        f"| roofline time | {r['roofline_ms']:.3f} ms |",
        f"| CUDA-graph replay (device) | {r['graph_replay_ms']:.3f} ms |",
        f"| **roofline fraction, replay** | **{r['fraction_graph']:.1%}** |",
        f"| engine step (host clock) | {r['engine_step_ms']:.3f} ms |",
        f"| roofline fraction, engine step | {r['fraction_engine_step']:.1%} |",
        f"| `parcap generate` TPOT, end to end ({r['e2e'].get('counters', {}).get('decode_steps')}"
        f" decode steps, device {r['e2e'].get('counters', {}).get('decode_device_ms')} ms each)"
        f" | {r['e2e_tpot_ms'] or 0:.3f} ms |",
        f"| **roofline fraction, end to end** | **{r['fraction_e2e'] or 0:.1%}** |",
        f"| eager step: {r['eager_kernels']} kernels, busy | {kernel_total:.3f} ms |",
        f"| of which GEMM/GEMV ({gemm_bw or 0:.0f} GB/s on weights) | {k['gemm']:.3f} ms |",
        f"| of which attention ({attn_bw or 0:.0f} GB/s on KV) | {k['attention']:.3f} ms |",
        f"| of which other kernels (norms, rope, activation, KV store, copies) "
        f"| {k['other']:.3f} ms |",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
