"""`parcap serve`: an OpenAI-compatible HTTP server over a multi-rank launch.

    parcap serve [--model LlamaForCausalLM] --tp-size 2 [--host 127.0.0.1] [--port 8000]

The port is bound first (a busy port fails before any rank starts), then the engine
resolves the plan and starts the ranks (a refused plan exits 2), then uvicorn serves the
app. SIGTERM or SIGINT, to this process or its whole group, drains: requests in flight run
to their end (up to --graceful-timeout seconds), new ones get 503, then the ranks are
closed; the exit code is 0, or 1 when a rank had failed. A second signal stops at once.
On a node other than 0 of a multi-host launch, serve runs that node's ranks and no HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from engine.entrypoints.generate import server_args
from engine.server_args import ServerArgs
from registry.args import Parser, fail, one_line

DEFAULT_MAX_REQUEST_BYTES = 1 << 20


def parser() -> Parser:
    p = Parser(
        prog="parcap serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /v1/parallel_plan, /health).",
    )
    ServerArgs.add_arguments(p.add_argument_group("server arguments"))
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    http.add_argument(
        "--port",
        type=int,
        default=8000,
        metavar="N",
        help="port; 0 picks a free one (default: 8000)",
    )
    http.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model name clients send (default: the architecture for --model, the "
        "checkpoint folder's name for --model-path)",
    )
    http.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help="largest request body accepted; larger ones get 413 "
        f"(default: {DEFAULT_MAX_REQUEST_BYTES})",
    )
    http.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long in-flight requests may run before they are cut; "
        "new ones get 503 meanwhile (default: 30)",
    )
    http.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (default: info)",
    )
    http.add_argument("--disable-access-log", action="store_true", help="no line per request")
    return p


def bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) socket: connections are refused until uvicorn serves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Gate:
    """ASGI middleware that counts the HTTP requests in flight and, once draining, answers
    new ones with 503 (OpenAI's error object) instead of passing them on."""

    BODY = json.dumps(
        {
            "error": {
                "message": "the server is shutting down",
                "type": "server_error",
                "param": None,
                "code": "shutting_down",
            }
        }  # fmt: skip
    ).encode()

    def __init__(self, app: Any) -> None:
        self.app = app
        self.in_flight = 0
        self.draining = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.draining:
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            return await send({"type": "http.response.body", "body": self.BODY})
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def draining_server(config: Any, gate: Gate, grace_s: float) -> Any:
    """uvicorn's server, whose first SIGTERM/SIGINT drains through `gate` before uvicorn's
    own shutdown (which would refuse connections at once rather than answer 503)."""
    import uvicorn

    class Server(uvicorn.Server):
        deadline: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.deadline is not None:
                return super().handle_exit(sig, frame)  # a second signal: stop now
            self.deadline = time.monotonic() + grace_s
            gate.draining = True
            print(f"parcap serve: {signal.Signals(sig).name}: draining {gate.in_flight} "
                  f"request(s) for up to {grace_s:g}s; new ones get 503", file=sys.stderr,
                  flush=True)  # fmt: skip

        async def on_tick(self, counter: int) -> bool:
            if self.deadline is not None and not self.should_exit:
                late = time.monotonic() >= self.deadline
                if late:
                    self.config.timeout_graceful_shutdown = 0.1  # cut what still runs
                self.should_exit = late or gate.in_flight == 0
            return await super().on_tick(counter)

    return Server(config)


def main(argv: list[str]) -> int:
    p = parser()
    ns = p.parse_args(argv)
    args = server_args(ns, p)
    if not 0 <= ns.port <= 65535:
        p.error(f"argument --port: must be in 0..65535 (got {ns.port})")
    if ns.max_request_bytes < 1:
        p.error(f"argument --max-request-bytes: must be >= 1 (got {ns.max_request_bytes})")
    if ns.graceful_timeout < 0:
        p.error(f"argument --graceful-timeout: must be >= 0 (got {ns.graceful_timeout})")
    from engine.frontend.launcher import USER_ERRORS, RankError, is_torchrun, prepare

    if is_torchrun():
        fail(
            "parcap serve starts its own ranks; it does not run under torchrun (across hosts, "
            "give every host --nnodes N --node-rank R --dist-init-addr HOST:PORT)"
        )
    if args.node_rank > 0:  # no HTTP here: node 0 serves
        from engine.frontend.node_agent import run_node

        try:
            setup = prepare(args)
        except USER_ERRORS as e:
            fail(e)
        return run_node(setup, "serve")
    name = ns.served_model_name or args.model or Path(args.model_path).resolve().name
    try:
        sock = bind(ns.host, ns.port)
    except OSError as e:
        fail(f"cannot listen on {ns.host}:{ns.port}: {e.strerror or e}", code=1)
    host, port = sock.getsockname()[:2]

    import uvicorn

    from engine.frontend.llm_engine import LLMEngine
    from engine.frontend.nodes import NodeError
    from engine.http.app import build_app

    # SIGTERM while loading behaves like Ctrl-C; while serving, uvicorn takes both over
    signal.signal(signal.SIGTERM, _interrupt)
    engine = None
    try:
        try:
            engine = LLMEngine(args)
        except USER_ERRORS as e:
            fail(e)
        except (RankError, NodeError) as e:
            print(f"parcap serve: error: {one_line(e)}", file=sys.stderr)
            return 1

        def ready() -> None:
            url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
            nodes = f", {args.nnodes} nodes" if args.nnodes > 1 else ""
            print(
                f"parcap serve: serving {name} on {url} (pid {os.getpid()}, tp {args.tp_size}"
                f"{nodes})",
                file=sys.stderr,
                flush=True,
            )

        app = build_app(engine, name=name, max_request_bytes=ns.max_request_bytes, on_ready=ready)
        gate = Gate(app)
        config = uvicorn.Config(
            gate,
            log_level=ns.log_level,
            access_log=not ns.disable_access_log,
            timeout_graceful_shutdown=ns.graceful_timeout,
            lifespan="on",
        )
        draining_server(config, gate, ns.graceful_timeout).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # a signal that uvicorn re-raised after its graceful shutdown, or one while loading
    finally:
        sock.close()
        if engine is not None:
            engine.shutdown()
    if engine is not None and engine.error is not None:
        print(f"parcap serve: the engine had failed: {one_line(engine.error)}", file=sys.stderr)
        return 1
    return 0
