"""Host-side micro-benchmarks of one decode step, comparable across commits:

    pytest bench --benchmark-only --benchmark-autosave          # save this commit's numbers
    pytest bench --benchmark-only --benchmark-compare            # against the last saved

- `test_step_host_work`: what the host does for one decode step of the tiny Llama besides
  the forward (schedule, layout, the step's input tensors), at 1, 8 and 32 requests;
- `test_decode_forward`: one eager decode forward on the CPU, with the number of torch
  operators it dispatches (a proxy for kernel launches per step) in `extra_info`;
- `test_mlp_sync_all_gather`, `test_intake_broadcast`: the per-step gloo collectives at
  tp 2, against peers in spawned processes that make exactly as many calls.
"""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch

from engine.messages import Launch, ModelSource, Request, SamplingParams
from engine.model_api import ParallelState
from engine.runtime.model_runner import ModelRunner
from engine.runtime.scheduler import Scheduler
from engine.server_args import ServerArgs
from models.llama import LlamaForCausalLM
from registry import ParallelCapabilities, resolve_plan

ROUNDS, WARMUP = 200, 20
SYNC_VECTOR = [8, 1, 0, 1, 0, 3]


def tiny_runner(max_requests: int) -> tuple[ModelRunner, Launch]:
    args = ServerArgs.from_cli(
        ["--model", "LlamaForCausalLM", "--max-running-requests", str(max_requests)]
    )
    plan = resolve_plan(ParallelCapabilities(), args)
    source = ModelSource("LlamaForCausalLM", LlamaForCausalLM.tiny_config(), None)
    launch = Launch(args, plan, source, "", frozenset())
    return ModelRunner(launch, ParallelState.single()), launch


def decoding(runner: ModelRunner, launch: Launch, n: int) -> Scheduler:
    """A scheduler with `n` requests past their prefill."""
    scheduler = Scheduler(runner.kv, runner.table, launch.limits, frozenset())
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    for rid in range(n):
        scheduler.add(Request.make(rid, [256, *b"host work"], params, 0))
    batch = scheduler.schedule()
    scheduler.update(batch, [1] * n, [0.0] * n)
    return scheduler


@pytest.mark.parametrize("requests", [1, 8, 32])
def test_step_host_work(benchmark, requests):
    runner, launch = tiny_runner(32)
    scheduler = decoding(runner, launch, requests)

    def host_work():
        batch = scheduler.schedule()
        layout = runner.layouter.local(batch.mode, batch.num_tokens)
        runner.prepare(batch, layout)
        for seq in batch.seqs:  # as if the step's token were read back and dropped
            seq.in_flight -= 1

    benchmark.pedantic(host_work, rounds=ROUNDS, warmup_rounds=WARMUP)


def test_decode_forward(benchmark):
    runner, launch = tiny_runner(1)
    batch = decoding(runner, launch, 1).schedule()
    fb = runner.prepare(batch, runner.layouter.local(batch.mode, batch.num_tokens))

    def forward():
        with torch.inference_mode():
            runner.backend.plan(fb)
            runner.model.forward(fb)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        forward()
    benchmark.extra_info["torch_ops_per_step"] = sum(
        1 for e in prof.events() if e.name.startswith("aten::")
    )
    benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=WARMUP)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peer(rank: int, tp: int, init: str, op: str, calls: int) -> None:
    from engine.runtime.process_groups import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    init_parallel(rank, tp, 1, torch.device("cpu"), init, 60)
    for _ in range(calls):
        _collective(op, leader=False)
    destroy_parallel()


def _collective(op: str, leader: bool) -> None:
    from engine.runtime.process_groups import broadcast_ints, cpu_all_gather_ints

    if op == "sync":
        cpu_all_gather_ints(SYNC_VECTOR, "tp")
    else:
        broadcast_ints([0, 3, 0] if leader else None, 3, "attn_tp")


@pytest.fixture(params=["sync", "intake"])
def collective(request):
    """Rank 0 of a tp-2 gloo group in this process; rank 1 spawned, making the same calls."""
    from engine.runtime.process_groups import destroy_parallel, init_parallel

    tp, calls = 2, ROUNDS + WARMUP
    init = f"tcp://127.0.0.1:{_free_port()}"
    peer = mp.get_context("spawn").Process(
        target=_peer, args=(1, tp, init, request.param, calls), daemon=True
    )
    peer.start()
    init_parallel(0, tp, 1, torch.device("cpu"), init, 60)
    yield request.param
    destroy_parallel()
    peer.join(timeout=30)


def test_per_step_collective_at_tp2(benchmark, collective):
    benchmark.extra_info["collective"] = collective
    benchmark.pedantic(
        lambda: _collective(collective, leader=True), rounds=ROUNDS, warmup_rounds=WARMUP
    )
