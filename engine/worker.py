"""A rank's main loop: take requests, schedule, (sync,) run one forward, report tokens.

Requests reach the attention-TP leader of each attention-DP group through its inbox; the
leader broadcasts what it took to its group, so every rank of a group schedules alike.
Token events, counters and errors leave through one outbox.

mlp_sync accounting. Under `plan.mlp_sync` every loop iteration that syncs runs exactly
one forward (real, or idle for a group without work), so `mlp_sync_calls == steps`. The
sync vector is [num_tokens, can_run_graph, is_extend, has_work, idle_after, seen]:
`idle_after` says the group surely has nothing left once this step ran, `seen` counts the
submissions its leader has been told of (every submission reaches every leader). When a
sync shows every group idle after the step, with equal `seen`, all groups go quiet: no
more syncs until a leader is told of a new submission, which every other leader is told
of too. A request that ends early on EOS costs one idle step before the groups go quiet.
Without mlp_sync there is a single group and no collective besides the intake broadcast.

Counters (`Worker.counters`, reported from global rank 0):
- steps: loop iterations that ran a forward, real or idle.
- mlp_sync_calls: all-gathers made for mlp_sync (equal to steps under it, else 0).
- attn_tp_padding_tokens: over steps and attention-DP groups, round_up(n, token_alignment)
  - n for the group's real tokens n (0 in an idle batch): the rows alignment alone adds.
- gathered_buffer_bytes, capture_sizes: from the graph runner, fixed at start.
"""

from __future__ import annotations

import os
import queue
import signal
import time
from typing import Any

from attrs import frozen

from engine.distributed import (
    broadcast_ints,
    broadcast_object,
    cpu_all_gather_ints,
    destroy_parallel,
    init_parallel,
)
from engine.forward_batch import ForwardMode
from engine.model_runner import ModelRunner, ModelSource
from engine.scheduler import Batch, Limits, Scheduler
from engine.sequence import Event, Request
from engine.tokenizer import eos_ids

# The longest a leader without work waits on its inbox before broadcasting to its group:
# short, so an idle group's peers never come near the collective timeout.
IDLE_WAIT_S = 0.2
# Test hook: "RANK:STEPS" makes that rank SIGKILL itself after that many forward steps.
KILL_HOOK = "PARCAP_TEST_KILL_RANK_AFTER_STEPS"


@frozen
class Launch:
    """What every rank is started with (pickled to spawned ranks)."""

    args: Any  # engine.server_args.ServerArgs
    plan: Any  # registry.ParallelPlan
    source: ModelSource
    init_method: str


@frozen
class Submit:
    """Requests for this leader's group, out of `count` submitted to all groups at once."""

    requests: tuple[Request, ...]
    count: int


@frozen
class Abort:
    rid: int


CLOSE = "close"  # no submissions follow; finish the work, then exit


@frozen
class Intake:
    requests: tuple[Request, ...]
    aborts: tuple[int, ...]
    seen: int
    closed: bool


def limits_of(launch: Launch) -> Limits:
    a = launch.args
    return Limits(
        a.max_running_requests, a.max_prefill_tokens, a.max_total_tokens, launch.source.context_len
    )


class Worker:
    def __init__(self, rank: int, launch: Launch, inbox: Any, outbox: Any, device: Any) -> None:
        args, plan = launch.args, launch.plan
        self.state = init_parallel(
            rank, args.tp_size, plan.attn_dp_size, device, launch.init_method, args.dist_timeout
        )
        self.runner = ModelRunner(launch.source, args, plan, self.state)
        self.scheduler = Scheduler(
            self.runner.kv, self.runner.table, limits_of(launch), eos_ids(launch.source.namespace)
        )
        self.inbox, self.outbox = inbox, outbox
        self.sync = plan.mlp_sync.value
        if not self.sync and plan.attn_dp_size > 1:
            raise ValueError("attention-DP groups need the plan's mlp_sync")
        self.seen = 0
        self.closed = False
        self.quiet, self.quiet_seen = True, 0
        self.steps = self.sync_calls = 0
        self.reported_steps = -1
        self.kill_after = _kill_hook(rank)

    @property
    def leader(self) -> bool:
        return self.state.is_attn_tp_leader

    def counters(self) -> dict[str, Any]:
        g = self.runner.graphs
        return {
            "steps": self.steps,
            "gathered_buffer_bytes": g.buffer_bytes,
            "mlp_sync_calls": self.sync_calls,
            "attn_tp_padding_tokens": g.padding_tokens,
            "capture_sizes": list(g.sizes),
        }

    def close(self) -> None:
        """Leave the process groups; the graphs first, as NCCL requires (see `release`).
        Safe in another thread: it names this rank's device."""
        if self.state.device.type == "cuda":
            import torch

            torch.cuda.set_device(self.state.device)
        self.runner.graphs.release()
        destroy_parallel()

    def report_counters(self) -> None:
        """Rank 0 tells the front end its counters whenever it runs out of work (after a
        step, or when aborts emptied it without one), once per change."""
        if self.state.rank == 0 and self.steps != self.reported_steps:
            self.outbox.put(("counters", self.counters()))
            self.reported_steps = self.steps

    def run(self) -> None:
        while True:
            intake = self.intake()
            events = [e for r in intake.requests if (e := self.scheduler.add(r))]
            events += [e for rid in intake.aborts if (e := self.scheduler.abort(rid))]
            batch = self.scheduler.schedule()
            idle = self.quiet and intake.seen == self.quiet_seen if self.sync else batch is None
            if idle:
                self.emit(events)
                self.report_counters()
                if intake.closed:
                    return
                continue
            if self.sync:
                rows, global_rows = self.sync_step(batch, intake)
            else:
                rows, global_rows = self.local_step(batch)
            tokens, logprobs = self.runner.step(batch, rows, global_rows)
            self.steps += 1
            if batch is not None:
                events += self.scheduler.update(batch, tokens, logprobs)
            self.emit(events)
            if self.quiet if self.sync else not self.scheduler.has_work:
                self.report_counters()
            if self.steps == self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    def intake(self) -> Intake:
        if self.leader:
            wait = not self.scheduler.has_work and (self.quiet or not self.sync)
            requests, aborts = [], []
            for item in self.receive(wait):
                if isinstance(item, Submit):
                    requests += item.requests
                    self.seen += item.count
                elif isinstance(item, Abort):
                    aborts.append(item.rid)
                elif item == CLOSE:
                    self.closed = True
            intake = Intake(tuple(requests), tuple(aborts), self.seen, self.closed)
            head = [int(bool(requests or aborts)), self.seen, int(self.closed)]
        else:
            intake = head = None
        # most steps bring nothing new: then a few ints say so, without pickling
        news, seen, closed = broadcast_ints(head, 3, "attn_tp")
        if not news:
            return Intake((), (), seen, bool(closed))
        return broadcast_object(intake, "attn_tp")

    def receive(self, wait: bool) -> list[Any]:
        items = []
        try:
            if wait and not self.closed:
                items.append(self.inbox.get(timeout=IDLE_WAIT_S))
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            return items

    def local_step(self, batch: Batch) -> tuple[int, list[int]]:
        g = self.runner.graphs
        n = batch.num_tokens
        graph = g.can_run(n, batch.mode is ForwardMode.DECODE)
        g.count_padding([n])
        rows = g.padded(n, n if graph else None)
        return rows, [rows]

    def sync_step(self, batch: Batch | None, intake: Intake) -> tuple[int, list[int]]:
        g = self.runner.graphs
        n = batch.num_tokens if batch else 0
        extend = batch is not None and batch.mode is ForwardMode.EXTEND
        mine = [
            n,
            g.can_run(n, not extend),
            extend,
            batch is not None,
            self.scheduler.idle_after(batch),
            intake.seen,
        ]
        gathered = cpu_all_gather_ints([int(v) for v in mine], "tp")
        self.sync_calls += 1
        groups = gathered[:: self.state.attn_tp_size]
        tokens = [row[0] for row in groups]
        # one extending group makes the step eager everywhere, as SGLang does
        graph = all(r[1] and not r[2] for r in groups) and any(r[3] for r in groups)
        global_rows = [g.padded(t, max(tokens) if graph else None) for t in tokens]
        g.count_padding(tokens)
        self.quiet = all(r[4] for r in groups) and len({r[5] for r in groups}) == 1
        self.quiet_seen = intake.seen
        return global_rows[self.state.attn_dp_rank], global_rows

    def emit(self, events: list[Event]) -> None:
        if events and self.leader:
            # stamped here: the front end may drain several steps at once
            self.outbox.put(("events", events, time.monotonic()))


def _kill_hook(rank: int) -> int | None:
    spec = os.environ.get(KILL_HOOK)
    if not spec:
        return None
    who, _, steps = spec.partition(":")
    return int(steps) if int(who) == rank else None
