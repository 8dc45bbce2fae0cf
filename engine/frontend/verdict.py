"""`parcap verify`'s findings and verdict: each run compared with tp 1, whether the declared
plan reproduces it, what a failure means for the declaration, and a cheaper declaration
where the experiment shows one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from attrs import frozen

from engine.messages import Counters
from registry import ParallelCapabilities

CONSISTENT, CONTRADICTED = "consistent", "contradicted"
# what the gather path costs, as the counters show it
COSTS = (
    ("attn_tp_padding_tokens", "padding tokens"),
    ("mlp_sync_calls", "sync calls"),
    ("gathered_buffer_bytes", "gathered-buffer bytes"),
)


@frozen
class Output:
    ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@frozen
class Run:
    """What one launch produced, and how it compares with the tp 1 reference."""

    role: str
    topology: str
    attn_tp_gather: bool
    outputs: tuple[Output, ...]
    counters: Counters | None  # None when the run failed
    error: str | None
    seconds: float
    tokens_equal: bool | None = None  # None: the run failed, nothing to compare
    first_difference: tuple[int, int] | None = None  # (request, step)
    max_logprob_diff: float | None = None

    def exact(self, tol: float) -> bool:
        """Same tokens as tp 1 and logprobs within `tol`, without an error."""
        return bool(self.tokens_equal) and (self.max_logprob_diff or 0.0) <= tol

    def to_json(self) -> dict[str, Any]:
        first = self.first_difference
        return {
            "role": self.role,
            "topology": self.topology,
            "attn_tp_gather": self.attn_tp_gather,
            "tokens_equal": self.tokens_equal,
            "first_difference": None if first is None else {"request": first[0], "step": first[1]},
            "max_logprob_diff": self.max_logprob_diff,
            "counters": None if self.counters is None else self.counters.to_json(),
            "error": self.error,
        }


def compare(r: Run, reference: Run) -> Run:
    """`r` with its tokens and logprobs compared request by request with `reference`'s;
    logprobs only up to a request's first differing token, where they stop being comparable."""
    if r.error is not None:
        return r
    first, worst = None, 0.0
    for i, (ours, ref) in enumerate(zip(r.outputs, reference.outputs, strict=True)):
        same = 0
        while same < min(len(ours.ids), len(ref.ids)) and ours.ids[same] == ref.ids[same]:
            same += 1
        if first is None and (same < len(ours.ids) or same < len(ref.ids)):
            first = (i, same)
        for a, b in zip(ours.logprobs[:same], ref.logprobs[:same]):
            worst = max(worst, abs(a - b))
    return attrs.evolve(
        r, tokens_equal=first is None, first_difference=first, max_logprob_diff=worst
    )


@frozen
class Verdict:
    verdict: str  # CONSISTENT or CONTRADICTED
    reason: str  # one line: which run, what happened, what it means
    suggestion: str | None  # a declaration to change, backed by an exact run

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == CONSISTENT else 1


def savings(cheap: Counters, dear: Counters) -> dict[str, int]:
    """Per cost counter, how much less `cheap` spent than `dear` (negative: more)."""
    return {name: getattr(dear, name) - getattr(cheap, name) for name, _ in COSTS}


def describe_costs(delta: dict[str, int], sign: str = "") -> str:
    """e.g. "12 padding tokens, 40 sync calls" for the non-zero entries of `delta`."""
    parts = [f"{sign}{abs(delta[name])} {label}" for name, label in COSTS if delta[name]]
    return ", ".join(parts) or "nothing"


def outcome(r: Run, tol: float) -> str:
    """What went wrong in `r`, in words (it is not exact)."""
    if r.error is not None:
        kind = "hangs" if "timed out" in r.error.lower() or "hang" in r.error else "crashes"
        return f"{kind}: {r.error}"
    if not r.tokens_equal:
        request, step = r.first_difference
        return f"its tokens differ from tp 1 (request {request}, step {step})"
    return f"its logprobs differ from tp 1 by {r.max_logprob_diff:.3g} > {tol:g}"


def gather(r: Run) -> str:
    return "on" if r.attn_tp_gather else "off"


def judge(caps: ParallelCapabilities, runs: Sequence[Run], tol: float) -> Verdict:
    """The verdict on `caps` from the reference, declared and (optional) experiment runs."""
    declared = runs[1]
    experiment = runs[2] if len(runs) > 2 else None
    if declared.exact(tol):
        return _consistent(caps, declared, experiment, tol)
    return _contradicted(caps, declared, experiment, tol)


def _consistent(
    caps: ParallelCapabilities, declared: Run, experiment: Run | None, tol: float
) -> Verdict:
    head = f"the declared plan (attn_tp_gather {gather(declared)}) reproduces tp 1"
    if experiment is None:
        return Verdict(
            CONSISTENT,
            f"{head}; this topology scatters no attention input, so no declaration changes "
            "the plan here (verify with --moe-a2a-backend all2all to test the declaration)",
            None,
        )
    other = f"the gather-{gather(experiment)} experiment"
    if not experiment.exact(tol):
        needs = (
            "relies on sharding its own tokens"
            if caps.self_managed_sp
            else "needs the engine's gather at this topology"
        )
        return Verdict(
            CONSISTENT,
            f"{head}; {other} {outcome(experiment, tol)}: the model {needs}, as declared",
            None,
        )
    saved = savings(experiment.counters, declared.counters)
    if caps.self_managed_sp or not any(v > 0 for v in saved.values()):
        # exact the other way too, but no cheaper: the declaration already costs least
        extra = {k: -v for k, v in saved.items()}
        cost = f"but costlier ({describe_costs(extra, '+')})" if any(extra.values()) else "as cheap"
        return Verdict(CONSISTENT, f"{head}; {other} is exact too {cost}", None)
    return Verdict(
        CONSISTENT,
        f"{head}; {other} is exact too and cheaper ({describe_costs(saved, '-')})",
        "same tokens with the gather off: this model does not need the engine's gather at "
        "this topology; if it shards its own tokens or never scatters them, declaring "
        f"`self_managed_sp=True` drops {_drops(saved)}",
    )


def _drops(saved: dict[str, int]) -> str:
    """e.g. "14 padding tokens, 18 sync calls and the 8192-byte gathered buffer"."""
    parts = [
        f"the {saved[name]}-byte gathered buffer"
        if name == "gathered_buffer_bytes"
        else f"{saved[name]} {label}"
        for name, label in COSTS
        if saved[name] > 0
    ]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _contradicted(
    caps: ParallelCapabilities, declared: Run, experiment: Run | None, tol: float
) -> Verdict:
    what = f"the declared plan (attn_tp_gather {gather(declared)}) {outcome(declared, tol)}"
    if experiment is None:
        return Verdict(
            CONTRADICTED,
            f"{what}; this topology scatters no attention input, so no declaration changes "
            "the plan: the model itself is wrong here",
            None,
        )
    works = experiment.exact(tol)
    other = f"the gather-{gather(experiment)} experiment " + (
        "reproduces tp 1" if works else f"fails too ({outcome(experiment, tol)})"
    )
    if not works:
        return Verdict(
            CONTRADICTED,
            f"{what}; {other}: neither way reproduces tp 1, so no declaration fixes this "
            "model at this topology",
            None,
        )
    if caps.self_managed_sp:
        return Verdict(
            CONTRADICTED,
            f"declares self_managed_sp=True, but {what}; {other}: the model uses the "
            "engine's communicator: drop self_managed_sp=True",
            None,
        )
    c = experiment.counters
    return Verdict(
        CONTRADICTED,
        f"declares nothing (default capabilities), but {what}; {other}: the model shards "
        "its own tokens and needs its group's token count, not a shard-local one "
        "(SGLang #38606)",
        "declare `parallel_capabilities = ParallelCapabilities(self_managed_sp=True)`: the "
        f"gather-off experiment reproduces tp 1, with {c.attn_tp_padding_tokens} padding "
        f"tokens and {c.mlp_sync_calls} sync calls",
    )
