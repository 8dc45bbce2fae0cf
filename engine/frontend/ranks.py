"""The rank processes of one launch on this host, spawned with their queues and watched.

A rank that fails stops the whole launch: its one-line error (or how it died) is kept,
every other rank is killed, and nothing is left running. Ranks ignore SIGINT and SIGTERM
from their first instruction, so a signal to the whole process group (Ctrl-C, systemd,
a container runtime) reaches only the front end, which closes them.

On node 0 of a multi-host launch the other nodes' ranks join through links
(`engine.frontend.nodes`): the inbox of a group led on another node is a proxy, and that
node's messages arrive in the same outbox as this host's.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator

from engine.frontend.nodes import Closing, RemoteInbox, accept_nodes, relay
from engine.frontend.rank_process import run_rank
from engine.messages import CLOSE, Bye, Launch, RankFailed

# After the first sign of failure, how long to wait for the other ranks' news, so the
# report names the rank that failed first rather than a peer whose collective broke.
GRACE_S = 0.5
GROUP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


@contextlib.contextmanager
def _children_ignore_group_signals() -> Iterator[None]:
    """Processes started inside inherit SIG_IGN for SIGINT and SIGTERM through exec, so a
    rank cannot die of a group signal even while its interpreter starts. Meanwhile this
    thread holds the signals back (delivered on exit) rather than ignoring them itself."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal.signal works in the main thread only; run_rank ignores them anyway
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    handlers = {s: signal.signal(s, signal.SIG_IGN) for s in GROUP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class Ranks:
    """This host's rank processes of one launch, their queues, and (node 0) the links."""

    def __init__(self, launch: Launch) -> None:
        import torch.multiprocessing as mp

        args, plan = launch.args, launch.plan
        self.size = args.tp_size  # ranks of the whole launch
        per_node = args.tp_size // args.nnodes
        self.local = range(args.node_rank * per_node, (args.node_rank + 1) * per_node)
        links = accept_nodes(launch) if args.nnodes > 1 and args.node_rank == 0 else {}
        ctx = mp.get_context("spawn")
        _start_quiet_resource_tracker()
        leaders = [g * plan.attn_tp_size for g in range(plan.attn_dp_size)]
        self.inboxes = [ctx.Queue() if leader in self.local else None for leader in leaders]
        self.outbox = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=run_rank,
                args=(rank, launch, self.inboxes, self.outbox),
                name=f"parcap-rank-{rank}",
                daemon=True,
            )
            for rank in self.local
        ]
        with _children_ignore_group_signals():
            for p in self.procs:
                p.start()
        self.pids = [p.pid for p in self.procs]
        self.errors: list[tuple[int, str]] = []
        self._codes: list[int | None] = [None] * len(self.procs)
        self.byes: set[int] = set()
        self._failing_since: float | None = None
        self.remote_deaths: dict[object, str] = {}  # rank or ("node", n) -> line; set by relays
        self.links = links
        for node, link in links.items():
            for group, leader in enumerate(leaders):
                if leader // per_node == node:
                    self.inboxes[group] = RemoteInbox(link, group)
            ranks = range(node * per_node, (node + 1) * per_node)
            threading.Thread(
                target=relay,
                args=(link, node, ranks, self),
                name=f"parcap-node-{node}",
                daemon=True,
            ).start()

    def drain(self, timeout: float) -> list[object]:
        """Every message from the ranks, failures and farewells noted."""
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
        return out

    def receive(self, timeout: float) -> list[object]:
        """Messages from the ranks; failures and farewells are kept here, not returned."""
        return [m for m in self.drain(timeout) if not isinstance(m, RankFailed | Bye)]

    def deaths(self) -> dict[int, str]:
        """This host's ranks that exited without a word (a signal, a crash, no goodbye)."""
        return {
            rank: describe_exit(rank, code)
            for rank, code in zip(self.local, self._codes, strict=True)
            if code is not None and (code != 0 or rank not in self.byes)
        }

    def remote_died(self, rank: int, line: str) -> None:
        self.remote_deaths[rank] = line

    def lost(self, node: int, line: str) -> None:
        self.remote_deaths[("node", node)] = line

    def failure(self) -> str | None:
        """The launch's failure once known, else None.

        A rank that died without a word (a signal, a crash, a lost node) is the cause over
        a rank that reported an error, whose collective may have broken because of it;
        among reports, the first.
        """
        died = {**self.deaths(), **self.remote_deaths}
        if not (died or self.errors):
            return None
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        # other hosts' news takes a network trip: wait for it even when no local rank runs
        waiting = None in self._codes or bool(self.links)
        if now - self._failing_since < GRACE_S and waiting:
            return None
        reported = {rank for rank, _ in self.errors}
        silent = [line for key, line in died.items() if key not in reported]
        return (silent or [line for _, line in self.errors])[0]

    def close(self) -> None:
        """No submissions follow: every group (here, or through its node's link) finishes."""
        for inbox in self.inboxes:
            if inbox is not None:  # None: led on another node, whose node 0 closes it
                inbox.put(CLOSE)

    def kill(self, grace: float = 0.0, reason: str | None = None) -> None:
        """Give ranks `grace` seconds to exit, then kill the rest; returns once all are gone.
        The other nodes are told why (`reason`, None for a clean end) and let go."""
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
        for p in self.procs:
            p.join()
        for q in [*self.inboxes, self.outbox]:
            if hasattr(q, "cancel_join_thread"):
                q.cancel_join_thread()
        for link in self.links.values():
            link.close(Closing(reason))


def describe_exit(rank: int, code: int) -> str:
    if code < 0:
        return f"rank {rank}: killed by {signal.Signals(-code).name}"
    if code == 0:
        return f"rank {rank}: exited before the run ended"
    return f"rank {rank}: exited with code {code}"
