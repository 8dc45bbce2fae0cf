"""`parcap generate` under torchrun: this process is the rank torchrun says, and the run's
front end is global rank 0, which gathers every group's results."""

from __future__ import annotations

import os
import queue
import time

from engine.frontend.launcher import RankError, Setup
from engine.frontend.rank_process import LEAVE_TIMEOUT_S, failure_line, start_rank, within
from engine.frontend.results import Result, Timings
from engine.messages import CLOSE, Counters, Request, SamplingParams, Submit, TokenEvents
from engine.runtime.process_groups import gather_object
from engine.runtime.worker import Worker


class ListOutbox:
    """An in-process outbox: the messages, in order."""

    def __init__(self) -> None:
        self.items: list[object] = []

    def put(self, msg: object) -> None:
        self.items.append(msg)


def run_torchrun(
    setup: Setup, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[list[Result], Counters, Timings] | None:
    """Run this process as the rank torchrun says; every rank reads the same prompts and
    keeps its group's round-robin share. Results, counters and timings on global rank 0,
    else None."""
    launch = setup.launch
    rank = int(os.environ["RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    device = start_rank(launch.args.device, int(os.environ.get("LOCAL_RANK", 0)), local_world)
    groups = launch.plan.attn_dp_size
    group = rank // launch.plan.attn_tp_size
    requests = [
        Request.make(i, p, q, launch.args.seed)
        for i, (p, q) in enumerate(zip(prompts, params, strict=True))
    ]
    inbox, outbox = queue.Queue(), ListOutbox()
    inbox.put(Submit(tuple(r for r in requests if r.rid % groups == group), len(requests)))
    inbox.put(CLOSE)
    try:
        worker = Worker(rank, launch, inbox, outbox, device)
        start = time.monotonic()
        worker.run()
    except Exception as e:
        raise RankError(failure_line(rank, e)) from e
    results: dict[int, Result] = {}
    for message in outbox.items:
        if isinstance(message, TokenEvents):
            for event in message.events:
                results.setdefault(event.rid, Result(start)).add(event, message.stamp)
    everyone = gather_object(results if worker.leader else {})
    counters = worker.counters()
    within(worker.close, LEAVE_TIMEOUT_S)
    if rank != 0:
        return None
    merged = {rid: r for part in everyone for rid, r in part.items()}
    timings = Timings()
    for result in merged.values():
        timings.add(result)
    return [merged[r.rid] for r in requests], counters, timings
