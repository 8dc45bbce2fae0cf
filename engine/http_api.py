"""The HTTP front end: an OpenAI-compatible Starlette app over one `LLMEngine`.

One thread polls the engine and hands each token event to the event loop
(`call_soon_threadsafe`), which routes it to its request's asyncio queue; requests
submitted together are batched by the ranks' continuous-batching scheduler. When a rank
fails, every waiting request gets a 503 at once, `/health` turns 503 and new requests are
refused, so nothing hangs on a launch that cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from attrs import define
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.chat import ChatFormat
from engine.llm_engine import EngineError, LLMEngine
from engine.openai_protocol import (
    APIError,
    GenRequest,
    ModelCard,
    TextStream,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    parse_chat,
    parse_completion,
    usage,
)
from engine.sequence import Event, SamplingParams
from engine.worker import limits_of

POLL_S = 0.1  # how long the pump waits on the engine before checking for shutdown
T = TypeVar("T")


class EngineDown(APIError):
    def __init__(self, why: str) -> None:
        super().__init__(503, f"the engine is down: {why}", type="server_error", code="engine_down")


class Bridge:
    """Engine events to per-request asyncio queues."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.error: str | None = None
        self.queues: dict[int, asyncio.Queue] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._pump, name="parcap-pump", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                events = []
                event = self.engine.poll(timeout=POLL_S)
                while event is not None:
                    events.append(event)
                    event = self.engine.poll(timeout=0)
            except EngineError as e:
                self._call(self._fail, str(e))
                return
            if events:
                self._call(self._deliver, events)

    def _call(self, fn: Any, arg: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody waits
            self._loop.call_soon_threadsafe(fn, arg)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            # a finished request leaves at once, so one whose reader is gone cannot leak
            q = self.queues.pop(event.rid, None) if event.finished else self.queues.get(event.rid)
            if q is not None:
                q.put_nowait(event)

    def _fail(self, why: str) -> None:
        self.error = why
        for q in self.queues.values():
            q.put_nowait(EngineDown(why))
        self.queues.clear()

    def open(self, prompt_ids: list[int], params: SamplingParams) -> Stream:
        if self.error is not None:
            raise EngineDown(self.error)
        try:
            rid = self.engine.submit(prompt_ids, params)
        except EngineError as e:
            raise EngineDown(str(e)) from None
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        q: asyncio.Queue = asyncio.Queue()
        # submit ran on this thread, so no event of rid can have been dispatched yet
        self.queues[rid] = q
        return Stream(self, rid, q)


@define
class Stream:
    """One request's events; `close` aborts it in the engine unless it finished."""

    bridge: Bridge
    rid: int
    queue: asyncio.Queue
    done: bool = False

    async def next(self) -> Event:
        item = await self.queue.get()
        if isinstance(item, APIError):
            self.done = True
            raise item
        if item.finished:
            self.done = True
        return item

    def close(self) -> None:
        if self.done:
            return
        self.done = True
        self.bridge.queues.pop(self.rid, None)
        self.bridge.engine.abort(self.rid)  # a no-op once the engine is down or shut down


@define
class Piece:
    """New output since the last piece: final text, the tokens behind it, maybe the end."""

    text: str
    ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None


async def generate(bridge: Bridge, gen: GenRequest, card: ModelCard) -> AsyncIterator[Piece]:
    """Pieces of one request's output, ending with the one that has a finish_reason."""
    stream = bridge.open(gen.prompt_ids, gen.params)
    text = TextStream(card.tokenizer, gen.stop)
    ids: list[int] = []
    logprobs: list[float] = []
    try:
        while True:
            event = await stream.next()
            if event.finish_reason in ("error", "abort"):
                raise APIError(400, event.error or "the request was aborted", param="prompt")
            delta = text.add(event.token_id) if event.token_id is not None else ""
            if event.token_id is not None:
                ids.append(event.token_id)
                logprobs.append(event.logprob)
            if text.stopped:
                yield Piece(delta, ids, logprobs, "stop")
                return
            if event.finished:
                yield Piece(delta + text.flush(), ids, logprobs, event.finish_reason)
                return
            if delta:
                yield Piece(delta, ids, logprobs)
                ids, logprobs = [], []
    finally:
        stream.close()


# -- the two OpenAI endpoints' shapes -----------------------------------------------


class CompletionShape:
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    @staticmethod
    def choice(
        card: ModelCard, p: Piece, offset: int, logprobs: bool, first: bool, chunk: bool
    ) -> dict[str, Any]:
        lp = completion_logprobs(card.tokenizer, p.ids, p.logprobs, offset) if logprobs else None
        return {"index": 0, "text": p.text, "logprobs": lp, "finish_reason": p.finish_reason}


class ChatShape:
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def choice(
        card: ModelCard, p: Piece, offset: int, logprobs: bool, first: bool, chunk: bool
    ) -> dict[str, Any]:
        lp = chat_logprobs(card.tokenizer, p.ids, p.logprobs) if logprobs else None
        if not chunk:
            message = {"role": "assistant", "content": p.text}
            return {
                "index": 0,
                "message": message,
                "logprobs": lp,
                "finish_reason": p.finish_reason,
            }
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if p.text or first:
            delta["content"] = p.text
        return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": p.finish_reason}


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client went away first (then `work` is cancelled,
    which closes its engine request)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its cleanup runs before we go on
    return None if task.cancelled() else task.result()


def gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def respond(
    request: Request,
    bridge: Bridge,
    card: ModelCard,
    gen: GenRequest,
    shape: type[CompletionShape] | type[ChatShape],
) -> Response:
    ident, created = new_id(shape.prefix), now()

    def head(obj: str) -> dict[str, Any]:
        return {"id": ident, "object": obj, "created": created, "model": card.name}

    pieces = generate(bridge, gen, card)

    if not gen.stream:

        async def collect() -> Response:
            text, ids, logprobs, finish = "", [], [], None
            async with contextlib.aclosing(pieces):
                async for p in pieces:
                    text += p.text
                    ids += p.ids
                    logprobs += p.logprobs
                    finish = p.finish_reason
            whole = Piece(text, ids, logprobs, finish)
            return JSONResponse(
                {
                    **head(shape.object),
                    "choices": [shape.choice(card, whole, 0, gen.logprobs, True, False)],
                    "usage": usage(len(gen.prompt_ids), len(ids)),
                }
            )

        return await until_disconnect(request, collect()) or gone()

    # The first piece comes before the response starts, so a request the engine refuses
    # still gets its 4xx rather than a 200 stream with an error in it.
    try:
        first = await until_disconnect(request, anext(pieces))
    except BaseException:
        await pieces.aclose()
        raise
    if first is None:
        await pieces.aclose()
        return gone()

    def sse(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        offset, count, p, is_first = 0, 0, first, True
        try:
            while True:
                count += len(p.ids)
                choice = shape.choice(card, p, offset, gen.logprobs, is_first, True)
                chunk = {**head(shape.chunk_object), "choices": [choice]}
                if gen.include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
                offset += len(p.text)
                is_first = False
                if p.finish_reason is not None:
                    break
                p = await anext(pieces)
            if gen.include_usage:
                total = usage(len(gen.prompt_ids), count)
                yield sse({**head(shape.chunk_object), "choices": [], "usage": total})
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield sse(e.body())
        finally:
            await pieces.aclose()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


# -- the app --------------------------------------------------------------------------


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
    limits = limits_of(launch)
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


def build_app(
    engine: LLMEngine, *, name: str, max_request_bytes: int, on_ready: Any = None
) -> Starlette:
    """The app serving `engine` as model `name`; it owns the event pump, not the engine."""
    bridge = Bridge(engine)
    card = model_card(engine, name)
    created = now()

    def check_up() -> None:
        if bridge.error is not None:
            raise EngineDown(bridge.error)

    async def completions(request: Request) -> Response:
        check_up()
        gen = parse_completion(await read_json(request, max_request_bytes), card)
        return await respond(request, bridge, card, gen, CompletionShape)

    async def chat_completions(request: Request) -> Response:
        check_up()
        gen = parse_chat(await read_json(request, max_request_bytes), card)
        return await respond(request, bridge, card, gen, ChatShape)

    def model_json() -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "parcap",
            "max_model_len": card.context_len,
        }

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_json()]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != name:
            raise APIError(
                404,
                f"The model '{request.path_params['model']}' does not exist",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(model_json())

    async def health(request: Request) -> Response:
        if bridge.error is not None:
            return JSONResponse({"status": "failed", "error": bridge.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def parallel_plan(request: Request) -> Response:
        return JSONResponse(engine.setup.explain)

    async def report(request: Request) -> Response:
        return JSONResponse(engine.report())

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else None
        err = APIError(
            exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code
        )
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        bridge.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            bridge.stop()

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/v1/parallel_plan", parallel_plan, methods=["GET"]),
            Route("/v1/report", report, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={
            APIError: api_error,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    app.state.bridge = bridge
    return app
