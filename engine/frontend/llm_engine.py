"""The front end: one object that owns a launch's ranks, takes requests and hands back tokens.

    with LLMEngine(args) as engine:
        rid = engine.submit(prompt_ids, SamplingParams(max_new_tokens=8))
        while (event := engine.poll(timeout=1.0)) is not None and not event.finished: ...
        results = engine.generate([ids_a, ids_b])
    engine.report()

`submit` and `abort` may be called from any thread, `poll` from one consumer thread
(an HTTP server dispatches the events by `rid`); `generate` is a convenience that
consumes events itself, so it is not mixed with a concurrent `poll` consumer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm

from engine.frontend.launcher import RankError, Ranks, Setup, prepare
from engine.frontend.results import Result, Timings
from engine.messages import (
    Abort,
    Counters,
    Event,
    Ready,
    Request,
    SamplingParams,
    Submit,
    TokenEvents,
)
from engine.server_args import ServerArgs

_FAILED = object()  # queued after the last event once a rank has failed


def make_report(setup: Setup, counters: Counters, timings: Timings) -> dict[str, Any]:
    """The `--report-json` document."""
    return {"plan": setup.explain, "counters": counters.to_json(), "timings": timings.to_json()}


def _bar(progress: bool, **kwargs: Any) -> tqdm:
    """A progress bar on stderr, drawn on a terminal only (logs and pipes get none)."""
    return tqdm(disable=None if progress else True, **kwargs)


class EngineError(RankError):
    """A rank failed and the launch was stopped; the message names the rank."""


class LLMEngine:
    def __init__(
        self, args: ServerArgs, *, setup: Setup | None = None, progress: bool = False
    ) -> None:
        """Resolve the launch (a refused plan or bad args raise before any rank starts),
        start the ranks and wait until every one has loaded the model."""
        self.args = args
        self.setup = setup or prepare(args)
        self.plan = self.setup.launch.plan
        self.tokenizer = self.setup.tokenizer
        self.vocab_size = int(self.setup.launch.source.config["vocab_size"])
        self.error: str | None = None
        self._results: dict[int, Result] = {}  # running, or finished and kept
        self._kept: set[int] = set()
        self._timings = Timings()
        self._events: queue.Queue = queue.Queue()
        self._counters = Counters()
        self._lock = threading.Lock()
        self._next_rid = 0
        self._ready: set[int] = set()
        self._loaded = threading.Event()
        self._closed = False
        self._ranks = Ranks(self.setup.launch)
        self._receiver = threading.Thread(target=self._receive, name="parcap-receiver", daemon=True)
        self._receiver.start()
        try:
            self._wait_loaded(progress)
        except BaseException:
            self._closed = True
            self._ranks.kill()
            raise

    def _wait_loaded(self, progress: bool) -> None:
        with _bar(progress, total=self._ranks.size, desc="loading", unit="rank") as bar:
            while not self._loaded.wait(0.1):
                bar.update(len(self._ready) - bar.n)
            bar.update(len(self._ready) - bar.n)
        if self.error:
            raise EngineError(self.error)

    @property
    def pids(self) -> list[int]:
        return list(self._ranks.pids)

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def submit(
        self, prompt_ids: Seq[int], params: SamplingParams | None = None, *, keep: bool = False
    ) -> int:
        return self.submit_many([prompt_ids], [params or SamplingParams()], keep=keep)[0]

    def submit_many(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        keep: bool = False,
    ) -> list[int]:
        """Submit prompts together (they can share the first prefill); their request ids.

        `result(rid)` follows a request while it runs; with `keep` also once it finished,
        until `take(rid)`.
        """
        params = params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        for ids in prompts:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(
                    f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        with self._lock:
            self._check_open()
            first, self._next_rid = self._next_rid, self._next_rid + len(prompts)
            now = time.monotonic()
            requests = []
            for rid, ids, p in zip(range(first, self._next_rid), prompts, params, strict=True):
                requests.append(Request.make(rid, list(ids), p, self.args.seed))
                self._results[rid] = Result(now)
                if keep:
                    self._kept.add(rid)
            groups = len(self._ranks.inboxes)
            for g, inbox in enumerate(self._ranks.inboxes):
                inbox.put(Submit(tuple(r for r in requests if r.rid % groups == g), len(requests)))
        return [r.rid for r in requests]

    def abort(self, rid: int) -> None:
        """Stop request `rid`: its last event has finish_reason "abort" unless it had
        finished. A no-op once the engine is shut down or failed."""
        with self._lock:
            if not self._closed and self.error is None:
                self._ranks.inboxes[rid % len(self._ranks.inboxes)].put(Abort(rid))

    def poll(self, timeout: float | None = None) -> Event | None:
        """The next token event of any request, or None after `timeout` seconds.

        Raises EngineError once a rank has failed (after the events that came before).
        """
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _FAILED:
            self._events.put(_FAILED)
            raise EngineError(self.error)
        return item

    def result(self, rid: int) -> Result:
        """What request `rid` produced so far (KeyError once it finished, unless kept).

        It can run ahead of `poll`: a request may show finished while its last events
        still wait in the queue."""
        with self._lock:
            return self._results[rid]

    def take(self, rid: int) -> Result:
        """A kept request's result, forgotten here."""
        with self._lock:
            self._kept.discard(rid)
            return self._results.pop(rid)

    def generate(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[Result]:
        """Run prompts to completion; results in prompt order."""
        rids = self.submit_many(prompts, params, keep=True)
        pending = set(rids)
        with _bar(progress, total=len(rids), desc="generating", unit="request") as bar:
            while pending:
                event = self.poll()
                if event.finished and event.rid in pending:
                    pending.discard(event.rid)
                    bar.update()
        return [self.take(rid) for rid in rids]

    def report(self) -> dict[str, Any]:
        """The plan, the counters of global rank 0 (as of its last idle moment) and the mean
        time to first token and per output token, measured here, over finished requests."""
        with self._lock:
            return make_report(self.setup, self._counters, self._timings)

    def shutdown(self) -> None:
        """Abort unfinished requests, let the ranks exit, kill whatever does not. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            unfinished = [rid for rid, r in self._results.items() if not r.finished]
        if self.error is None:
            groups = len(self._ranks.inboxes)
            for rid in unfinished:
                self._ranks.inboxes[rid % groups].put(Abort(rid))
            self._ranks.close()
        self._receiver.join(timeout=self.args.dist_timeout + 10)
        if self._receiver.is_alive():
            self._fail("ranks did not exit after shutdown")
            self._receiver.join()
        self._ranks.kill(grace=5.0, reason=self.error)

    def _check_open(self) -> None:
        if self.error is not None:
            raise EngineError(self.error)
        if self._closed:
            raise RuntimeError("the engine is shut down")

    def _receive(self) -> None:
        ranks = self._ranks
        while True:
            for message in ranks.receive(timeout=0.1):
                if isinstance(message, Ready):
                    self._ready.add(message.rank)
                    if len(self._ready) == ranks.size:
                        self._loaded.set()
                elif isinstance(message, TokenEvents):
                    with self._lock:
                        for event in message.events:
                            self._record(event, message.stamp)
                    for event in message.events:
                        self._events.put(event)
                elif isinstance(message, Counters):
                    with self._lock:
                        self._counters = message
            failure = ranks.failure()
            if failure is not None:
                self._fail(failure)
                return
            if len(ranks.byes) == ranks.size:
                return

    def _record(self, event: Event, now: float) -> None:
        result = self._results[event.rid]
        result.add(event, now)
        if event.finished:
            self._timings.add(result)
            if event.rid not in self._kept:
                del self._results[event.rid]

    def _fail(self, line: str) -> None:
        if self.error is None:
            self.error = line
        self._ranks.kill(reason=self.error)
        self._events.put(_FAILED)
        self._loaded.set()
