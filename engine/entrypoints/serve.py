"""`parcap serve`: an OpenAI-compatible HTTP server over a multi-rank launch.

    parcap serve --model LlamaForCausalLM --tp-size 2 [--host 127.0.0.1] [--port 8000]

The port is bound first (a busy port fails before any rank starts), then the engine
resolves the plan and starts the ranks (a refused plan exits 2), then uvicorn serves the
app. SIGTERM or SIGINT stops accepting connections, lets in-flight requests finish (up to
--graceful-timeout seconds), then closes the ranks; the exit code is 0, or 1 when a rank
had failed.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

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
        help="on SIGTERM/SIGINT, how long in-flight requests may run before they are cut "
        "(default: 30)",
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


def main(argv: list[str]) -> int:
    p = parser()
    ns = p.parse_args(argv)
    args = ServerArgs.from_namespace(ns, p).require_model(p)
    if not 0 <= ns.port <= 65535:
        p.error(f"argument --port: must be in 0..65535 (got {ns.port})")
    if ns.max_request_bytes < 1:
        p.error(f"argument --max-request-bytes: must be >= 1 (got {ns.max_request_bytes})")
    if ns.graceful_timeout < 0:
        p.error(f"argument --graceful-timeout: must be >= 0 (got {ns.graceful_timeout})")
    from engine.frontend.launcher import is_torchrun

    if is_torchrun():
        fail("parcap serve starts its own ranks on this host; it does not run under torchrun")
    name = ns.served_model_name or args.model or Path(args.model_path).resolve().name
    try:
        sock = bind(ns.host, ns.port)
    except OSError as e:
        fail(f"cannot listen on {ns.host}:{ns.port}: {e.strerror or e}", code=1)
    host, port = sock.getsockname()[:2]

    import uvicorn

    from engine.frontend.launcher import USER_ERRORS
    from engine.frontend.llm_engine import EngineError, LLMEngine
    from engine.http.app import build_app

    # SIGTERM while loading behaves like Ctrl-C; while serving, uvicorn takes both over
    signal.signal(signal.SIGTERM, _interrupt)
    engine = None
    try:
        try:
            engine = LLMEngine(args)
        except USER_ERRORS as e:
            fail(e)
        except EngineError as e:
            print(f"parcap serve: error: {one_line(e)}", file=sys.stderr)
            return 1

        def ready() -> None:
            url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
            print(
                f"parcap serve: serving {name} on {url} (pid {os.getpid()}, tp {args.tp_size})",
                file=sys.stderr,
                flush=True,
            )

        app = build_app(engine, name=name, max_request_bytes=ns.max_request_bytes, on_ready=ready)
        config = uvicorn.Config(
            app,
            log_level=ns.log_level,
            access_log=not ns.disable_access_log,
            timeout_graceful_shutdown=ns.graceful_timeout,
            lifespan="on",
        )
        uvicorn.Server(config).run(sockets=[sock])
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
