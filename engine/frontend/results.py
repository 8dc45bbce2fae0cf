"""Requests' outcomes as the front end sees them, and the timings reported from them."""

from __future__ import annotations

import attrs

from engine.messages import Event


@attrs.define
class Result:
    """A request's outcome; times are time.monotonic() seconds."""

    submitted: float
    output_ids: list[int] = attrs.Factory(list)
    output_logprobs: list[float] = attrs.Factory(list)
    finish_reason: str | None = None
    error: str | None = None
    first_token: float | None = None
    last_token: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, event: Event, now: float) -> None:
        if event.token_id is not None:
            self.output_ids.append(event.token_id)
            self.output_logprobs.append(event.logprob)
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
        if event.finished:
            self.finish_reason, self.error = event.finish_reason, event.error

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def tpot(self) -> float | None:
        if len(self.output_ids) < 2:
            return None
        return (self.last_token - self.first_token) / (len(self.output_ids) - 1)


@attrs.define
class Timings:
    """Running means of time to first token and time per output token, over the requests
    that finished without an error."""

    ttft: list[float] = attrs.Factory(lambda: [0.0, 0])  # sum, count
    tpot: list[float] = attrs.Factory(lambda: [0.0, 0])

    def add(self, result: Result) -> None:
        if result.error is not None:
            return
        for acc, value in ((self.ttft, result.ttft), (self.tpot, result.tpot)):
            if value is not None:
                acc[0] += value
                acc[1] += 1

    def to_json(self) -> dict[str, float | None]:
        mean = lambda acc: round(1000 * acc[0] / acc[1], 3) if acc[1] else None
        return {"ttft_ms": mean(self.ttft), "tpot_ms": mean(self.tpot)}
