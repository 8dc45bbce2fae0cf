"""Requests as the front end submits them, and their state inside a rank's scheduler."""

from __future__ import annotations

import enum

import attrs
from attrs import field, frozen

from registry.args import at_least


def _positive_float(inst: object, attr: attrs.Attribute, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"'{attr.name}' must be a number >= 0 (got {value!r})")


def _top_p(inst: object, attr: attrs.Attribute, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"'{attr.name}' must be in (0, 1] (got {value!r})")


@frozen
class SamplingParams:
    """Greedy when `temperature` is 0; `seed` None means the engine's seed + request index."""

    max_new_tokens: int = field(default=16, validator=at_least(1))
    temperature: float = field(default=0.0, validator=_positive_float)
    top_p: float = field(default=1.0, validator=_top_p)
    top_k: int = field(default=0, validator=at_least(0))
    seed: int | None = field(default=None)
    ignore_eos: bool = field(default=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@frozen
class Request:
    """What travels from the front end to a rank: immutable, picklable."""

    rid: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int  # resolved sampling seed

    @classmethod
    def make(cls, rid: int, prompt_ids: list[int], params: SamplingParams, seed: int) -> Request:
        """Request `rid`; it samples with its own seed, else the engine's `seed` + `rid`."""
        own = params.seed if params.seed is not None else seed + rid
        return cls(rid, tuple(prompt_ids), params, own)


@frozen
class Event:
    """One step of one request, sent back to the front end.

    A token event carries `token_id` and its `logprob`; the last one has `finished` set
    and a `finish_reason` of "stop" (EOS), "length" (max_new_tokens), "abort" or
    "error" (then `error` says why and `token_id` is None).
    """

    rid: int
    token_id: int | None
    logprob: float | None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request inside one rank's scheduler: its tokens and where its KV lives."""

    def __init__(self, request: Request) -> None:
        self.rid = request.rid
        self.params = request.params
        self.seed = request.seed
        self.token_ids = list(request.prompt_ids)
        self.num_prompt = len(request.prompt_ids)
        self.status = Status.WAITING
        self.row: int | None = None  # row of the request-to-token table
        self.slots: list[int] = []  # KV slots reserved for every token it will feed
        self.generator = None  # torch.Generator, created on first sampled step

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def budget(self) -> int:
        """KV slots the request can ever need: the last sampled token is never fed back."""
        return self.num_prompt + self.params.max_new_tokens - 1


@attrs.define
class Result:
    """A request's outcome as the front end saw it; times are time.monotonic() seconds."""

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
