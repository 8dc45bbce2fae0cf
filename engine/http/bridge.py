"""The thread-to-asyncio bridge between one `LLMEngine` and the event loop.

One thread polls the engine and hands each token event to the event loop
(`call_soon_threadsafe`), which routes it to its request's asyncio queue; requests
submitted together are batched by the ranks' continuous-batching scheduler. When a rank
fails, every waiting request gets an `EngineDown` (a 503) at once and new requests are
refused, so nothing hangs on a launch that cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from attrs import define

from engine.frontend.llm_engine import EngineError, LLMEngine
from engine.http.openai_request import APIError
from engine.messages import Event, SamplingParams

POLL_S = 0.1  # how long the pump waits on the engine before checking for shutdown


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

    def check_up(self) -> None:
        """Raise `EngineDown` once the engine has failed."""
        if self.error is not None:
            raise EngineDown(self.error)

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
        self.check_up()
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
