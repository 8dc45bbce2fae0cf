"""The links of a multi-host launch: node 0's front end and one agent on every other node,
joined by one TCP connection each (`multiprocessing.connection`, HMAC-authenticated with a
key derived from the launch, so a node started with other flags or another model is
refused at the door).

Node 0 listens on PORT+1 of `--dist-init-addr HOST:PORT` (the ranks' rendezvous is PORT).
Over a link, node 0 sends `ToGroup` (an inbox message for an attention-DP group whose leader
runs on that node) and `Closing` when it ends the launch; a node sends its ranks' outbox
messages as they are, `Died` for a rank that exited without a word, and `Stop` when a signal
asked it to stop. Both sides ping while idle; a link that closes, or stays silent longer
than the collective timeout, is lost: "node 1: connection lost".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import attrs
from attrs import frozen

from engine.frontend.preflight import split_address
from engine.messages import Bye, Launch, TokenEvents
from registry.args import UsageError

# How long node 0 waits for every node to join, and a node for node 0 to listen: operators
# start hosts by hand or through a scheduler, so minutes, not the collective timeout.
NODE_WAIT_S = 300.0
HEARTBEAT_S = 1.0
SECRET_ENV = "PARCAP_NODE_SECRET"


class NodeError(RuntimeError):
    """A node that could not join, or was lost; the message names it."""


@frozen
class Hello:
    node: int


@frozen
class Welcome:
    pass


@frozen
class Refused:
    reason: str


@frozen
class ToGroup:
    group: int
    item: object


@frozen
class Died:
    rank: int
    line: str


@frozen
class Stop:
    signum: int


@frozen
class Closing:
    reason: str | None  # None: a clean end; else the launch's failure


@frozen
class Ping:
    pass


PING = Ping()


def relay_address(launch: Launch) -> tuple[str, int]:
    host, port = split_address(launch.args.dist_init_addr)
    return host, port + 1


def authkey(launch: Launch) -> bytes:
    """Equal on two nodes exactly when their launches are (the node's own rank and the
    checkpoint's local path aside), mixed with the operator's secret if any."""
    args = attrs.asdict(launch.args)
    for local in ("node_rank", "model_path"):
        args.pop(local)
    source = launch.source
    doc = {"args": args, "arch": source.architecture, "config": source.config}
    doc["eos"] = sorted(launch.eos_ids)
    blob = json.dumps(doc, sort_keys=True, default=str).encode()
    return hashlib.sha256(os.environ.get(SECRET_ENV, "").encode() + blob).digest()


class Link:
    """One connection between node 0 and another node: whole messages both ways, any
    thread may send, one thread receives."""

    def __init__(self, conn: Connection, peer: str, timeout_s: float) -> None:
        self.conn, self.peer, self.timeout_s = conn, peer, timeout_s
        self.closed = False
        self._lock = threading.Lock()
        self.heard = self.said = time.monotonic()

    def send(self, message: object) -> bool:
        """Whether it went out (a lost link drops it: the receiving side reports the loss)."""
        with self._lock:
            if self.closed:
                return False
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                return False
            self.said = time.monotonic()
            return True

    def recv(self, timeout: float) -> object | None:
        """The next message, or None after `timeout` seconds; NodeError once lost."""
        if time.monotonic() - self.said >= HEARTBEAT_S:
            self.send(PING)
        try:
            if not self.conn.poll(timeout):
                if time.monotonic() - self.heard > self.timeout_s:
                    raise NodeError(f"{self.peer}: no word for {self.timeout_s:.0f}s")
                return None
            message = self.conn.recv()
        except (EOFError, OSError, TypeError):  # TypeError: closed under us (handle is None)
            raise NodeError(f"{self.peer}: connection lost") from None
        self.heard = time.monotonic()
        return None if isinstance(message, Ping) else message

    def close(self, last: object | None = None) -> None:
        if last is not None:
            self.send(last)
        with self._lock:
            self.closed = True
        with contextlib.suppress(OSError):
            self.conn.close()


class RemoteInbox:
    """The inbox of an attention-DP group whose leader runs on another node."""

    def __init__(self, link: Link, group: int) -> None:
        self.link, self.group = link, group

    def put(self, item: object) -> None:
        self.link.send(ToGroup(self.group, item))


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def accept_nodes(launch: Launch) -> dict[int, Link]:
    """Node 0: every other node's link, once all have joined (NodeError otherwise)."""
    args = launch.args
    host, port = relay_address(launch)
    try:
        listener = Listener((host, port), authkey=authkey(launch))
    except OSError as e:
        raise NodeError(f"node 0: cannot listen for the other nodes on {host}:{port}: {e}") from e
    links: dict[int, Link] = {}
    joined = threading.Event()

    def accept() -> None:
        while len(links) < args.nnodes - 1:
            try:
                conn = listener.accept()
            except OSError:  # closed: node 0 gave up waiting
                return
            except Exception as e:  # AuthenticationError, a peer gone mid-handshake
                say(f"parcap: refused a node from {listener.last_accepted}: {e} (other flags, "
                    f"model or {SECRET_ENV} than node 0's?)")  # fmt: skip
                continue
            try:
                hello = conn.recv() if conn.poll(10) else None
                node = hello.node if isinstance(hello, Hello) else None
                if node is None or not 0 < node < args.nnodes or node in links:
                    why = f"node {node} joined already" if node in links else "not a parcap node"
                    conn.send(Refused(why))
                    conn.close()
                    continue
                conn.send(Welcome())
            except (EOFError, OSError):  # gone mid-handshake; it may come back
                continue
            links[node] = Link(conn, f"node {node}", args.dist_timeout)
        joined.set()

    threading.Thread(target=accept, name="parcap-accept", daemon=True).start()
    say(f"parcap: node 0 of {args.nnodes}: waiting for the other nodes on {host}:{port}")
    try:
        if not joined.wait(NODE_WAIT_S):
            missing = [n for n in range(1, args.nnodes) if n not in links]
            raise NodeError(
                f"node {missing[0]}: did not join within {NODE_WAIT_S:.0f}s (start it with "
                f"--nnodes {args.nnodes} --node-rank {missing[0]} --dist-init-addr "
                f"{args.dist_init_addr} and node 0's other flags)"
            )
    except BaseException:
        listener.close()
        for link in links.values():
            link.close(Closing("node 0 gave up before the launch started"))
        raise
    listener.close()
    return links


def join_node0(launch: Launch) -> Link:
    """Node R > 0: the link to node 0, retried while node 0 starts. A refusal (other
    flags, a node rank taken) is the operator's mistake: UsageError; no node 0: NodeError."""
    from multiprocessing import AuthenticationError

    args = launch.args
    host, port = relay_address(launch)
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        try:
            conn = Client((host, port), authkey=authkey(launch))
            break
        except AuthenticationError:
            raise UsageError(
                f"node 0 at {host}:{port} refused node {args.node_rank}: its flags, model "
                f"config or {SECRET_ENV} differ from node 0's"
            ) from None
        except OSError as e:
            if time.monotonic() > deadline:
                raise NodeError(
                    f"node 0 at {host}:{port}: not reachable within {NODE_WAIT_S:.0f}s ({e})"
                ) from None
            time.sleep(0.5)
    conn.send(Hello(args.node_rank))
    reply = conn.recv() if conn.poll(30) else None
    if not isinstance(reply, Welcome):
        why = reply.reason if isinstance(reply, Refused) else "no answer"
        raise UsageError(f"node 0 at {host}:{port} refused node {args.node_rank}: {why}")
    return Link(conn, "node 0", args.dist_timeout)


def relay(link: Link, node: int, ranks: range, sink: Any) -> None:
    """Node 0: node `node`'s messages into `sink` (its `Ranks`) until the link ends; a loss
    before all of that node's ranks said goodbye is the launch's failure."""
    byes: set[int] = set()
    while True:
        try:
            message = link.recv(HEARTBEAT_S)
        except NodeError as e:
            if not link.closed and not set(ranks) <= byes:
                sink.lost(node, str(e))
            return
        if message is None:
            continue
        if isinstance(message, Died):
            sink.remote_died(message.rank, message.line)
        elif isinstance(message, Stop):
            say(f"parcap: node {node} was asked to stop; stopping the launch")
            os.kill(os.getpid(), message.signum)  # as if this process had been signalled
        else:
            if isinstance(message, Bye):
                byes.add(message.rank)
            elif isinstance(message, TokenEvents):  # stamped by another host's clock
                message = attrs.evolve(message, stamp=time.monotonic())
            sink.outbox.put(message)
