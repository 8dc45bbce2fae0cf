"""Resolve a launch once in the front end, then start its ranks: spawned here, or by torchrun.

A spawned rank that fails stops the whole launch: its one-line error (or how it died)
is kept, every other rank is killed, and nothing is left running.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import time
from typing import Any

import torch
from attrs import frozen

from engine.attention.registry import BackendUnavailable, check_available
from engine.frontend.model_source import ModelSourceError, model_source
from engine.frontend.rank_process import run_rank
from engine.frontend.tokenizer import Tokenizer, TokenizerError, eos_ids, load_tokenizer
from engine.messages import CLOSE, Bye, Launch, ModelSource, RankFailed
from engine.model_api.contract import MoeSettings
from engine.server_args import ServerArgs
from registry import (
    ModelInfo,
    ModelLoadError,
    ParallelPlan,
    PlanRefused,
    UnknownArchitecture,
    explain_json,
    get_model_info,
    resolve_plan,
)
from registry.args import UsageError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
# After the first sign of failure, how long to wait for the other ranks' news, so the
# report names the rank that failed first rather than a peer whose collective broke.
GRACE_S = 0.5


# What `prepare` raises for a user's mistake: one line, exit code 2, before any rank starts.
USER_ERRORS = (
    UnknownArchitecture,
    ModelLoadError,
    ModelSourceError,
    PlanRefused,
    TokenizerError,
    UsageError,
    BackendUnavailable,
)


class RankError(RuntimeError):
    """A rank failed; the message names it (``rank N: Error: ...``)."""


def is_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


@frozen
class Setup:
    """A launch resolved in the front end, before any rank starts."""

    launch: Launch
    info: ModelInfo
    tokenizer: Tokenizer | None

    @property
    def explain(self) -> dict[str, Any]:
        return explain_json(self.info, self.launch.plan)


def prepare(args: ServerArgs) -> Setup:
    """Model source, plan and tokenizer for `args`.

    Raises one of USER_ERRORS for a user's mistake.
    """
    if args.dp_size > 1 and not args.enable_dp_attention:
        raise UsageError(
            f"--dp-size {args.dp_size} without --enable-dp-attention would ask for "
            "data-parallel replicas, which parcap does not run; add --enable-dp-attention "
            "or drop --dp-size"
        )
    check_available(
        args.attention_backend, getattr(torch, args.resolved_dtype), torch.device(args.device)
    )
    source = model_source(args.model, args.model_path)
    info = get_model_info(source.architecture)
    plan = resolve_plan(info.capabilities, args, model=source.architecture)
    check_divisible(info.cls, source, args, plan)
    tokenizer = load_tokenizer(args.model_path, source.namespace)
    launch = Launch(args, plan, source, init_method(args), eos_ids(source.namespace))
    return Setup(launch, info, tokenizer)


def check_divisible(cls: type, source: ModelSource, args: ServerArgs, plan: ParallelPlan) -> None:
    """Every config size the model splits over a parallel group splits evenly: else the
    flag and the numbers, as a user mistake (not a rank's error after the spawn)."""
    sizes = {"tp": (args.tp_size, "TP"), "attn_tp": (plan.attn_tp_size, "attention-TP")}
    flags = f"--tp-size {args.tp_size}"
    if plan.attn_dp_size > 1:
        flags += f" --dp-size {args.dp_size} --enable-dp-attention"
    for c in cls.parallel_constraints(source.namespace, MoeSettings.from_args(args)):
        size, label = sizes[c.group]
        if not c.holds(size):
            either = " (or divide it)" if c.either_way else ""
            raise UsageError(
                f"{flags}: {source.architecture}'s {c.name} ({c.value}) must be divisible "
                f"by the {label} size ({size}){either}"
            )


def init_method(args: ServerArgs) -> str:
    if is_torchrun():
        return "env://"
    if args.dist_init_addr:
        return f"tcp://{args.dist_init_addr}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _start_quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with its stderr on /dev/null.

    A rank killed mid-run leaves its queues' semaphores to the tracker, whose cleanup then
    warns about each (names already unlinked, "leaked" objects) after our one-line error.
    The tracker inherits stderr when it starts, so it is started here, once, without it."""
    from multiprocessing import resource_tracker

    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Ranks:
    """The spawned rank processes of one launch and their queues."""

    def __init__(self, launch: Launch) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        _start_quiet_resource_tracker()
        self.inboxes = [ctx.Queue() for _ in range(launch.plan.attn_dp_size)]
        self.outbox = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=run_rank,
                args=(rank, launch, self.inboxes, self.outbox),
                name=f"parcap-rank-{rank}",
                daemon=True,
            )
            for rank in range(launch.args.tp_size)
        ]
        for p in self.procs:
            p.start()
        self.pids = [p.pid for p in self.procs]
        self.errors: list[tuple[int, str]] = []
        self._codes: list[int | None] = [None] * len(self.procs)
        self.byes: set[int] = set()
        self._failing_since: float | None = None

    def receive(self, timeout: float) -> list[object]:
        """Messages from the ranks; failures and farewells are kept here, not returned."""
        self._codes = [p.exitcode for p in self.procs]  # first: a clean exit's bye is queued
        out = []
        try:
            out.append(self.outbox.get(timeout=timeout))
            while True:
                out.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        for msg in out:
            if isinstance(msg, RankFailed):
                self.errors.append((msg.rank, msg.line))
            elif isinstance(msg, Bye):
                self.byes.add(msg.rank)
        return [m for m in out if not isinstance(m, RankFailed | Bye)]

    def failure(self) -> str | None:
        """The launch's failure once known, else None.

        A rank that died without a word (a signal, a crash) is the cause over a rank
        that reported an error, whose collective may have broken because of it; among
        reports, the first.
        """
        died = {
            rank: describe_exit(rank, code)
            for rank, code in enumerate(self._codes)
            if code is not None and (code != 0 or rank not in self.byes)
        }
        if not (died or self.errors):
            return None
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if now - self._failing_since < GRACE_S and None in self._codes:
            return None
        reported = {rank for rank, _ in self.errors}
        silent = [line for rank, line in died.items() if rank not in reported]
        return (silent or [line for _, line in self.errors])[0]

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(CLOSE)

    def kill(self, grace: float = 0.0) -> None:
        """Give ranks `grace` seconds to exit, then kill the rest; returns once all are gone."""
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
        for p in self.procs:
            p.join()
        for q in [*self.inboxes, self.outbox]:
            q.cancel_join_thread()


def describe_exit(rank: int, code: int) -> str:
    if code < 0:
        return f"rank {rank}: killed by {signal.Signals(-code).name}"
    if code == 0:
        return f"rank {rank}: exited before the run ended"
    return f"rank {rank}: exited with code {code}"
