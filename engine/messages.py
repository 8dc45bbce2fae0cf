"""What crosses between the front end and the ranks: frozen, picklable values.

Front end -> each attention-DP group's leader (its inbox): `Submit`, `Abort`, `CLOSE`.
Ranks -> front end (one outbox): `Ready`, `TokenEvents`, `Counters` (global rank 0),
`Bye`, `RankFailed`. Every rank starts from one `Launch`.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from attrs import field, frozen

from registry.args import at_least

if TYPE_CHECKING:
    from engine.server_args import ServerArgs
    from registry import ParallelPlan


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
    """One step of one request.

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


@frozen
class ModelSource:
    """Which class to build and from what."""

    architecture: str
    config: dict[str, Any]  # config.json, or the class's tiny_config()
    path: str | None  # checkpoint directory; None means seeded random weights
    # `--context-length`: served shorter than the config's, which the model is built from
    served_context: int | None = None

    @property
    def namespace(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(**self.config)

    @property
    def context_len(self) -> int:
        """The longest request (prompt plus new tokens) every limit allows."""
        if self.served_context is not None:
            return self.served_context
        return int(self.config.get("max_position_embeddings", 2048))


@frozen
class Limits:
    max_running_requests: int
    max_prefill_tokens: int
    max_total_tokens: int
    context_len: int

    def check(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """Why a request can never run under these limits, or None."""
        if prompt_len == 0:
            return "the prompt is empty"
        if prompt_len + max_new_tokens > self.context_len:
            return (
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the "
                f"model's context length {self.context_len}"
            )
        if prompt_len > self.max_prefill_tokens:
            return (
                f"prompt of {prompt_len} tokens exceeds --max-prefill-tokens "
                f"{self.max_prefill_tokens} (prefill is not chunked)"
            )
        if prompt_len + max_new_tokens - 1 > self.max_total_tokens:
            return (
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} needs "
                f"{prompt_len + max_new_tokens - 1} KV slots, more than --max-total-tokens "
                f"{self.max_total_tokens}"
            )
        return None


@frozen
class Launch:
    """What every rank is started with."""

    args: ServerArgs
    plan: ParallelPlan
    source: ModelSource
    init_method: str
    eos_ids: frozenset[int]

    @property
    def limits(self) -> Limits:
        a = self.args
        return Limits(
            a.max_running_requests,
            a.max_prefill_tokens,
            a.max_total_tokens,
            self.source.context_len,
        )


class Inbox(Protocol):
    """Where a group's leader takes front-end messages from (a multiprocessing queue)."""

    def get(self, block: bool = True, timeout: float | None = None) -> object: ...

    def get_nowait(self) -> object: ...


class Outbox(Protocol):
    """Where a rank puts its messages for the front end (a multiprocessing queue)."""

    def put(self, item: object) -> None: ...


# -- front end -> an attention-DP group's leader -----------------------------------


@frozen
class Submit:
    """Requests for this leader's group, out of `count` submitted to all groups at once."""

    requests: tuple[Request, ...]
    count: int


@frozen
class Abort:
    rid: int


@frozen
class Close:
    """No submissions follow: finish the work, then exit."""


CLOSE = Close()

# -- ranks -> front end -------------------------------------------------------------


@frozen
class Ready:
    rank: int


@frozen
class TokenEvents:
    events: tuple[Event, ...]
    stamp: float  # time.monotonic() when the leader emitted them


@frozen
class Counters:
    """What shows that a launch followed its plan (`--report-json`'s "counters")."""

    steps: int = 0  # loop iterations that ran a forward, real or idle
    gathered_buffer_bytes: int = 0
    mlp_sync_calls: int = 0
    attn_tp_padding_tokens: int = 0
    capture_sizes: tuple[int, ...] = ()
    # decode steps timed on the GPU (CUDA events around each) and their mean; None on CPU
    decode_steps: int = 0
    decode_device_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "capture_sizes": list(self.capture_sizes)}


@frozen
class Bye:
    rank: int


@frozen
class RankFailed:
    rank: int
    line: str  # "rank N: Error: message", one line
