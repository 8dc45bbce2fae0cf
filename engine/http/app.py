"""The HTTP front end: an OpenAI-compatible Starlette app over one `LLMEngine`.

The routes are module-level handlers; what one app serves (its `Bridge`, `ModelCard`,
engine, body limit and creation time) lives on `app.state`, set by `build_app`. When a
rank fails, every waiting request gets a 503 at once, `/health` turns 503 and new
requests are refused, so nothing hangs on a launch that cannot answer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.frontend.llm_engine import LLMEngine
from engine.http.bridge import Bridge
from engine.http.chat import ChatFormat
from engine.http.openai_request import (
    APIError,
    GenRequest,
    ModelCard,
    parse_chat,
    parse_completion,
)
from engine.http.openai_response import ChatShape, CompletionShape, Shape, now
from engine.http.streaming import respond

# -- reading a request ----------------------------------------------------------------


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    too_big = APIError(
        413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large"
    )
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise APIError(400, "the request body must be a JSON object")
    return value


def model_card(engine: LLMEngine, name: str) -> ModelCard:
    launch = engine.setup.launch
    limits = launch.limits
    context = launch.source.context_len

    def default_max_tokens(prompt_len: int) -> int:
        # whatever the context and the KV pool leave (OpenAI's chat default)
        return max(1, min(context - prompt_len, limits.max_total_tokens + 1 - prompt_len))

    return ModelCard(
        name=name,
        context_len=context,
        vocab_size=engine.vocab_size,
        tokenizer=engine.tokenizer,
        chat=ChatFormat(launch.args.model_path),
        check=limits.check,
        default_max_tokens=default_max_tokens,
    )


# -- routes ---------------------------------------------------------------------------


async def _generate(
    request: Request, parse: Callable[[dict[str, Any], ModelCard], GenRequest], shape: Shape
) -> Response:
    state = request.app.state
    bridge: Bridge = state.bridge
    card: ModelCard = state.card
    bridge.check_up()  # a down engine answers 503 before any validation
    gen = parse(await read_json(request, state.max_request_bytes), card)
    return await respond(request, bridge, card, gen, shape)


async def completions(request: Request) -> Response:
    return await _generate(request, parse_completion, CompletionShape)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, parse_chat, ChatShape)


def _model_json(request: Request) -> dict[str, Any]:
    state = request.app.state
    return {
        "id": state.card.name,
        "object": "model",
        "created": state.created,
        "owned_by": "parcap",
        "max_model_len": state.card.context_len,
    }


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_json(request)]})


async def model(request: Request) -> Response:
    if request.path_params["model"] != request.app.state.card.name:
        raise APIError(
            404,
            f"The model '{request.path_params['model']}' does not exist",
            param="model",
            code="model_not_found",
        )
    return JSONResponse(_model_json(request))


async def health(request: Request) -> Response:
    error = request.app.state.bridge.error
    if error is not None:
        return JSONResponse({"status": "failed", "error": error}, status_code=503)
    return JSONResponse({"status": "ok"})


async def parallel_plan(request: Request) -> Response:
    return JSONResponse(request.app.state.engine.setup.explain)


async def report(request: Request) -> Response:
    return JSONResponse(request.app.state.engine.report())


ROUTES = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", model, methods=["GET"]),
    Route("/v1/parallel_plan", parallel_plan, methods=["GET"]),
    Route("/v1/report", report, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
]


# -- errors: every one an OpenAI error object -----------------------------------------


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else None
    err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> Response:
    err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
    return JSONResponse(err.body(), status_code=500)


# -- the app --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.bridge.start()
    if app.state.on_ready is not None:
        app.state.on_ready()
    try:
        yield
    finally:
        app.state.bridge.stop()


def build_app(
    engine: LLMEngine, *, name: str, max_request_bytes: int, on_ready: Any = None
) -> Starlette:
    """The app serving `engine` as model `name`; it owns the event pump, not the engine."""
    app = Starlette(
        routes=ROUTES,
        exception_handlers={
            APIError: api_error,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.bridge = Bridge(engine)
    app.state.card = model_card(engine, name)
    app.state.max_request_bytes = max_request_bytes
    app.state.created = now()
    app.state.on_ready = on_ready
    return app
