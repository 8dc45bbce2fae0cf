"""A rank's main loop: take requests, schedule, (sync,) run one forward, report tokens.

Requests reach the attention-TP leader of each attention-DP group through its inbox; the
leader broadcasts what it took to its group, so every rank of a group schedules alike.
Token events, counters and errors leave through one outbox.

Overlap (the default; `--disable-overlap-schedule` turns it off). A step is launched
without waiting for its tokens: they go to the device's token board, where the next decode
step reads its input ids, and to the host asynchronously. The loop launches step N+1, then
reads step N's tokens, so the host's scheduling and preparation of N+1 run while the
device computes N. The scheduler counts tokens in flight, so a request is never scheduled
past max_new_tokens; one that stops on EOS costs at most one wasted step, whose tokens
are dropped. A step with rows drawn on the host (sampling with a seed) waits for them.

mlp_sync accounting. Under `plan.mlp_sync` every loop iteration that syncs runs exactly
one forward (real, or idle for a group without work), so `mlp_sync_calls == steps`. When
a sync shows every group idle after the step and told of the same submissions
(`step_sync.all_quiet`), all groups go quiet: no more syncs until a leader is told of a
new submission, which every other leader is told of too. A request that ends early on
EOS costs one idle step before the groups go quiet. Without mlp_sync there is a single
group and no collective besides the intake broadcast.

Counters (`Worker.counters`, reported from global rank 0):
- steps: loop iterations that ran a forward, real or idle.
- mlp_sync_calls: all-gathers made for mlp_sync (equal to steps under it, else 0).
- attn_tp_padding_tokens: over steps and attention-DP groups, round_up(n, token_alignment)
  - n for the group's real tokens n (0 in an idle batch): the rows alignment alone adds.
- gathered_buffer_bytes, capture_sizes: fixed at start.
"""

from __future__ import annotations

import os
import queue
import signal
import time

import torch
from attrs import frozen

from engine.messages import (
    Abort,
    Close,
    Counters,
    Event,
    Inbox,
    Launch,
    Outbox,
    Request,
    Submit,
    TokenEvents,
)
from engine.model_api.forward_batch import ForwardMode
from engine.runtime.model_runner import ModelRunner
from engine.runtime.process_groups import (
    broadcast_ints,
    broadcast_object,
    destroy_parallel,
    init_parallel,
)
from engine.runtime.scheduler import Batch, Scheduler
from engine.runtime.step_io import DeviceClock, SampledStep
from engine.runtime.step_layout import StepLayout
from engine.runtime.step_sync import all_quiet, exchange

# The longest a leader without work waits on its inbox before broadcasting to its group:
# short, so an idle group's peers never come near the collective timeout.
IDLE_WAIT_S = 0.2
# Test hook: "RANK:STEPS" makes that rank SIGKILL itself after that many forward steps.
KILL_HOOK = "PARCAP_TEST_KILL_RANK_AFTER_STEPS"


@frozen
class Intake:
    """What a group's leader took from its inbox for one loop iteration."""

    requests: tuple[Request, ...]
    aborts: tuple[int, ...]
    seen: int
    closed: bool


class Worker:
    def __init__(
        self,
        rank: int,
        launch: Launch,
        inbox: Inbox | None,
        outbox: Outbox,
        device: torch.device,
    ) -> None:
        args, plan = launch.args, launch.plan
        self.state = init_parallel(
            rank, args.tp_size, plan.attn_dp_size, device, launch.init_method, args.dist_timeout
        )
        self.runner = ModelRunner(launch, self.state)
        self.scheduler = Scheduler(self.runner.kv, self.runner.table, launch.limits, launch.eos_ids)
        self.inbox, self.outbox = inbox, outbox
        self.sync = plan.mlp_sync.value
        if not self.sync and plan.attn_dp_size > 1:
            raise ValueError("attention-DP groups need the plan's mlp_sync")
        self.overlap = not args.disable_overlap_schedule
        # launched and not read back: the batch, its tokens, its decode step's device span
        self.pending: tuple[Batch, SampledStep, tuple | None] | None = None
        self.clock = DeviceClock(device)
        self.seen = 0
        self.closed = False
        self.quiet, self.quiet_seen = True, 0
        self.steps = self.sync_calls = self.padding_tokens = 0
        self.reported_steps = -1
        self.kill_after = _kill_hook(rank)

    @property
    def leader(self) -> bool:
        return self.state.is_attn_tp_leader

    def counters(self) -> Counters:
        return Counters(
            steps=self.steps,
            gathered_buffer_bytes=self.runner.gathered_buffer_bytes,
            mlp_sync_calls=self.sync_calls,
            attn_tp_padding_tokens=self.padding_tokens,
            capture_sizes=tuple(self.runner.layouter.sizes),
            decode_steps=self.clock.steps,
            decode_device_ms=self.clock.mean_ms,
        )

    def close(self) -> None:
        """Leave the process groups; the graphs first, as NCCL requires (see `release`).
        Safe in another thread: it names this rank's device."""
        if self.state.device.type == "cuda":
            torch.cuda.set_device(self.state.device)
        self.runner.graphs.release()
        destroy_parallel()

    def report_counters(self) -> None:
        """Rank 0 tells the front end its counters whenever it runs out of work (after a
        step, or when aborts emptied it without one), once per change."""
        if self.state.rank == 0 and self.steps != self.reported_steps:
            self.outbox.put(self.counters())
            self.reported_steps = self.steps

    def run(self) -> None:
        while True:
            intake = self.intake()
            events = [e for r in intake.requests if (e := self.scheduler.add(r))]
            events += [e for rid in intake.aborts if (e := self.scheduler.abort(rid))]
            batch = self.scheduler.schedule()
            idle = self.quiet and intake.seen == self.quiet_seen if self.sync else batch is None
            if idle:
                events += self.read_pending()
                self.emit(events)
                self.report_counters()
                if intake.closed and not self.scheduler.has_work:
                    return
                continue
            layout = self.layout(batch, intake)
            start = self.clock.start() if layout.mode is ForwardMode.DECODE else None
            sampled = self.runner.launch(batch, layout)
            span = self.clock.stop(start)
            self.steps += 1
            self.padding_tokens += layout.padding_tokens
            events += self.read_pending()  # the previous step's, while this one runs
            if sampled is not None:
                self.pending = (batch, sampled, span)
                if not self.overlap or sampled.must_wait:
                    events += self.read_pending()
            self.emit(events)
            if self.quiet if self.sync else not self.scheduler.has_work:
                self.report_counters()
            if self.steps == self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    def read_pending(self) -> list[Event]:
        """Read back the launched step's tokens (waiting for the device if need be) and
        apply them: events, stops, freed KV."""
        if self.pending is None:
            return []
        batch, sampled, span = self.pending
        self.pending = None
        events = self.scheduler.update(batch, *sampled.resolve())
        self.clock.add(span)
        return events

    def layout(self, batch: Batch | None, intake: Intake) -> StepLayout:
        mode = batch.mode if batch is not None else ForwardMode.IDLE
        n = batch.num_tokens if batch is not None else 0
        layouter = self.runner.layouter
        if not self.sync:
            return layouter.local(mode, n)
        mine = layouter.info(mode, n, self.scheduler.idle_after(), intake.seen)
        infos = exchange(mine, self.state.attn_tp_size)
        self.sync_calls += 1
        self.quiet, self.quiet_seen = all_quiet(infos), intake.seen
        return layouter.synced(mode, n, infos)

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
                elif isinstance(item, Close):
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

    def receive(self, wait: bool) -> list[object]:
        items = []
        try:
            if wait and not self.closed:
                items.append(self.inbox.get(timeout=IDLE_WAIT_S))
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            return items

    def emit(self, events: list[Event]) -> None:
        if events and self.leader:
            # stamped here: the front end may drain several steps at once
            self.outbox.put(TokenEvents(tuple(events), time.monotonic()))


def _kill_hook(rank: int) -> int | None:
    spec = os.environ.get(KILL_HOOK)
    if not spec:
        return None
    who, _, steps = spec.partition(":")
    return int(steps) if int(who) == rank else None
