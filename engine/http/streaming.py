"""One request's generation: engine events to text pieces, and pieces to its response.

A non-streamed request collects every piece into one body; a streamed one sends each
piece as an SSE chunk. Either way, a client that goes away aborts its engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from attrs import define
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.http.bridge import Bridge
from engine.http.detokenize import TextStream
from engine.http.openai_request import APIError, GenRequest, ModelCard
from engine.http.openai_response import DONE, Reply, Shape, sse, usage

T = TypeVar("T")


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
    request: Request, bridge: Bridge, card: ModelCard, gen: GenRequest, shape: Shape
) -> Response:
    """The response to one validated request: a JSON body, or an SSE stream."""
    reply = Reply.start(shape, card.name)
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
            choice = shape.choice(card, whole, 0, gen.logprobs, True, False)
            return JSONResponse(reply.body(choice, usage(len(gen.prompt_ids), len(ids))))

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

    async def events() -> AsyncIterator[str]:
        offset, count, p, is_first = 0, 0, first, True
        try:
            while True:
                count += len(p.ids)
                choice = shape.choice(card, p, offset, gen.logprobs, is_first, True)
                yield reply.chunk([choice], with_usage=gen.include_usage)
                offset += len(p.text)
                is_first = False
                if p.finish_reason is not None:
                    break
                p = await anext(pieces)
            if gen.include_usage:
                total = usage(len(gen.prompt_ids), count)
                yield reply.chunk([], with_usage=True, usage=total)
            yield DONE
        except APIError as e:
            yield sse(e.body())
        finally:
            await pieces.aclose()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
