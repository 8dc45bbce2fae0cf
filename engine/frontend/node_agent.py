"""A node other than 0 of a multi-host launch (`--node-rank R > 0`): join node 0, start this
host's ranks (global ranks R*L .. R*L+L-1, L = tp_size / nnodes) from the same `Launch`,
and relay between them and node 0's front end until node 0 closes the launch.

The agent writes nothing but one status line and, if the launch failed, its error. It
exits 0 when node 0 closed the launch after this node's ranks had finished, 1 when the
launch failed or node 0 was lost (its ranks are killed first: nothing is left running).
SIGINT or SIGTERM asks node 0 to stop the launch as if it had been signalled itself; a
second one stops this node at once.
"""

from __future__ import annotations

import signal
import sys
import threading

from engine.frontend.launcher import Setup
from engine.frontend.nodes import (
    HEARTBEAT_S,
    Closing,
    Died,
    NodeError,
    Stop,
    ToGroup,
    join_node0,
    relay_address,
    say,
)
from engine.frontend.ranks import Ranks
from engine.messages import Ready
from registry.args import UsageError


class _FromNode0:
    """The reading side of the link: inbox messages to this node's leaders; how it ended."""

    def __init__(self, link: object, ranks: Ranks) -> None:
        self.link, self.ranks = link, ranks
        self.ended = threading.Event()
        self.reason: str | None = None  # why node 0 ended the launch: its failure, or a loss
        self.clean = False
        threading.Thread(target=self._run, name="parcap-from-node-0", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                message = self.link.recv(HEARTBEAT_S)
            except NodeError as e:
                self.reason = self.reason or str(e)
                break
            if isinstance(message, ToGroup):
                self.ranks.inboxes[message.group].put(message.item)
            elif isinstance(message, Closing):
                self.reason, self.clean = message.reason, message.reason is None
                break
        self.ended.set()


def run_node(setup: Setup, command: str) -> int:
    """Run this host's part of the launch; the exit code."""
    launch = setup.launch
    args = launch.args
    try:
        link = join_node0(launch)
    except UsageError as e:
        return _error(e, 2)
    except NodeError as e:
        return _error(e)
    signals: list[int] = []
    previous = {s: signal.signal(s, lambda n, _: signals.append(n)) for s in _SIGNALS}
    ranks = Ranks(launch)
    node0 = _FromNode0(link, ranks)
    ready: set[int] = set()
    told: set[int] = set()
    asked = 0
    try:
        while not node0.ended.is_set():
            for message in ranks.drain(0.1):
                link.send(message)
                if isinstance(message, Ready):
                    ready.add(message.rank)
                    if len(ready) == len(ranks.local):
                        host, port = relay_address(launch)
                        say(f"parcap {command}: node {args.node_rank} of {args.nnodes}: ranks "
                            f"{ranks.local.start}-{ranks.local.stop - 1} ready, working for "
                            f"node 0 at {host}:{port}")  # fmt: skip
            reported = {rank for rank, _ in ranks.errors}
            for rank, line in ranks.deaths().items():
                if rank not in told and rank not in reported:
                    told.add(rank)
                    link.send(Died(rank, line))
            if len(signals) > asked:
                asked = len(signals)
                if asked > 1:
                    break
                link.send(Stop(signals[0]))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        ranks.kill(grace=5.0 if node0.clean else 0.0)
        link.close()
    if len(signals) > 1:
        name = signal.Signals(signals[-1]).name
        return _error(f"node {args.node_rank}: stopped by {name}", 128 + signals[-1])
    finished = ranks.byes >= set(ranks.local) and not ranks.deaths()
    if node0.clean and finished:
        return 0
    failed = [line for _, line in ranks.errors] + list(ranks.deaths().values())
    return _error(node0.reason or (failed[0] if failed else "node 0 closed the launch early"))


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _error(message: object, code: int = 1) -> int:
    print(f"parcap: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return code
