"""`parcap verify`: a model's declaration checked by running its plan both ways against tp 1.

The plan trusts `parallel_capabilities`; a wrong declaration otherwise shows only mid-run,
as a crash, a hang until the collective timeout, or silently wrong tokens (SGLang #38606).
Here three launches run one after another on the same greedy prompt set: tp 1 (the
reference), the given topology under the declared plan, and the same topology with the
attention-TP gather the other way, a plan the resolver may refuse, built here directly. A
run that crashes or hangs is a finding, recorded in its `Run`, never the caller's error.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import attrs
from attrs import frozen

from engine.frontend.launcher import Setup, init_method
from engine.frontend.llm_engine import EngineError, LLMEngine
from engine.frontend.verdict import Output, Run, Verdict, compare, judge
from engine.messages import Counters, SamplingParams
from engine.server_args import ServerArgs
from registry import ParallelCapabilities, ParallelPlan, PlanRefused, resolve_plan

REFERENCE, DECLARED, EXPERIMENT = "reference", "declared", "experiment"
# the flags that make a topology, in the order a user types them
TOPOLOGY_FIELDS = (
    "tp_size",
    "dp_size",
    "enable_dp_attention",
    "moe_a2a_backend",
    "moe_dense_tp_size",
    "enable_dp_lm_head",
)
SINGLE_RANK = dict(
    tp_size=1,
    dp_size=1,
    enable_dp_attention=False,
    moe_a2a_backend="none",
    moe_dense_tp_size=None,
    enable_dp_lm_head=False,
    attn_tp_gather="auto",
)


class Stalled(RuntimeError):
    """No token arrived for a long while and no rank reported an error."""


class ReferenceFailed(RuntimeError):
    """The tp 1 reference failed: there is nothing to verify against (`run` holds why)."""

    def __init__(self, run: Run) -> None:
        super().__init__(f"the tp 1 reference run failed, nothing to verify against: {run.error}")
        self.run = run


def topology(args: ServerArgs) -> str:
    """The topology as the flags that give it, e.g. ``--tp-size 2 --moe-a2a-backend all2all``."""
    defaults = ServerArgs()
    flags = []
    for name in TOPOLOGY_FIELDS:
        value = getattr(args, name)
        if name != "tp_size" and value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(flags)


@frozen
class RunSpec:
    """One launch to make: which role it plays, its arguments and the plan it runs."""

    role: str
    args: ServerArgs
    plan: ParallelPlan


@frozen
class PromptSet:
    """Batches run one after another; each batch's requests are submitted together."""

    batches: tuple[tuple[tuple[tuple[int, ...], SamplingParams], ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(b) for b in self.batches)


def prompt_set(
    vocab_size: int, attn_tp_size: int, attn_dp_size: int, max_new_tokens: int
) -> PromptSet:
    """Batch sizes that leave uneven shards: 1, attn_tp_size + 1, and an odd number of
    requests per attention-DP group; every other request stops halfway, so the decode
    batch shrinks to other uneven sizes, and prompt lengths vary so prefills are uneven."""
    rng = random.Random(0)
    short = max(1, (max_new_tokens + 1) // 2)
    batches, n = [], 0
    for size in (1, attn_tp_size + 1, attn_dp_size * (2 * attn_tp_size + 1)):
        batch = []
        for k in range(size):
            ids = tuple(rng.randrange(1, vocab_size) for _ in range(2 + (3 * n) % 7))
            params = SamplingParams(max_new_tokens if k % 2 == 0 else short, ignore_eos=True)
            batch.append((ids, params))
            n += 1
        batches.append(tuple(batch))
    return PromptSet(tuple(batches))


def run_specs(setup: Setup) -> list[RunSpec]:
    """The reference, the declared plan, and (where the topology scatters attention input,
    so that the gather can go either way) the experiment."""
    args, caps = setup.launch.args, setup.info.capabilities
    single = attrs.evolve(args, **SINGLE_RANK)
    specs = [
        RunSpec(REFERENCE, single, resolve_plan(caps, single)),
        RunSpec(DECLARED, args, setup.launch.plan),
    ]
    other = other_way(caps, args)
    if other is not None:
        specs.append(RunSpec(EXPERIMENT, *other))
    return specs


def other_way(
    caps: ParallelCapabilities, args: ServerArgs
) -> tuple[ServerArgs, ParallelPlan] | None:
    """The plan with the attention-TP gather flipped, or None where nothing is scattered."""
    if caps.self_managed_sp:
        on = attrs.evolve(args, attn_tp_gather="on")
        try:
            return on, resolve_plan(caps, on)
        except PlanRefused:
            return None
    # `--attn-tp-gather off` is refused for a model that declares nothing; the plan of
    # one that declares self_managed_sp is exactly the gather-off plan it would need
    plan = resolve_plan(ParallelCapabilities(self_managed_sp=True), args)
    if plan.attn_tp_gather.source != "model":
        return None
    return attrs.evolve(args, attn_tp_gather="off"), plan


def run(spec: RunSpec, base: Setup, prompts: PromptSet) -> Run:
    """One launch of `spec` over `prompts`; every rank is gone when it returns."""
    launch = attrs.evolve(
        base.launch, args=spec.args, plan=spec.plan, init_method=init_method(spec.args)
    )
    start = time.monotonic()
    outputs: list[Output | str] = []  # str: a request that ended in an error
    counters, error = None, None
    # a collective times out within dist_timeout; this bounds anything else that could stall
    stall_s = 2.0 * spec.args.dist_timeout + 10.0
    try:
        with LLMEngine(spec.args, setup=attrs.evolve(base, launch=launch)) as engine:
            for batch in prompts.batches:
                outputs += _generate(engine, batch, stall_s)
        counters = _counters(engine.report()["counters"])
    except (EngineError, Stalled) as e:
        error = str(e)
    failed = [f"request {i}: {o}" for i, o in enumerate(outputs) if isinstance(o, str)]
    if error is None and failed:
        error, counters = failed[0], None
    return Run(
        role=spec.role,
        topology=topology(spec.args),
        attn_tp_gather=spec.plan.attn_tp_gather.value,
        outputs=tuple(o for o in outputs if isinstance(o, Output)) if error is None else (),
        counters=counters,
        error=error,
        seconds=time.monotonic() - start,
    )


def _generate(engine: LLMEngine, batch: tuple, stall_s: float) -> list[Output | str]:
    """Like `LLMEngine.generate`, but a launch that stops producing tokens without a rank
    error (a hang outside any collective) ends after `stall_s` instead of never."""
    rids = engine.submit_many([ids for ids, _ in batch], [p for _, p in batch], keep=True)
    pending = set(rids)
    while pending:
        event = engine.poll(timeout=stall_s)
        if event is None:
            raise Stalled(f"no token for {stall_s:.0f} s and no rank reported an error: a hang")
        if event.finished:
            pending.discard(event.rid)
    results = [engine.take(rid) for rid in rids]
    return [
        r.error if r.error else Output(tuple(r.output_ids), tuple(r.output_logprobs))
        for r in results
    ]


def _counters(doc: dict[str, Any]) -> Counters:
    return Counters(**{**doc, "capture_sizes": tuple(doc["capture_sizes"])})


@frozen
class Verification:
    """Everything `parcap verify` reports."""

    architecture: str
    declared_by: str
    capabilities: ParallelCapabilities
    prompts: PromptSet
    runs: tuple[Run, ...]
    verdict: Verdict

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "declared_by": self.declared_by,
            "capabilities": self.capabilities.to_json(),
            "runs": [r.to_json() for r in self.runs],
            "verdict": self.verdict.verdict,
            "reason": self.verdict.reason,
            "suggestion": self.verdict.suggestion,
        }


def verify(
    setup: Setup,
    prompts: PromptSet,
    *,
    tol: float,
    on_run: Callable[[Run], None] | None = None,
) -> Verification:
    """Run the reference, the declared plan and the experiment; judge the declaration.

    Raises ReferenceFailed when tp 1 itself fails (a broken model, not a declaration)."""
    runs: list[Run] = []
    for spec in run_specs(setup):
        r = run(spec, setup, prompts)
        if not runs:
            if r.error is not None:
                raise ReferenceFailed(r)
            r = attrs.evolve(r, tokens_equal=True, max_logprob_diff=0.0)
        else:
            r = compare(r, runs[0])
        runs.append(r)
        if on_run is not None:
            on_run(r)
    info = setup.info
    return Verification(
        info.architecture,
        info.declared_by,
        info.capabilities,
        prompts,
        tuple(runs),
        judge(info.capabilities, runs, tol),
    )
