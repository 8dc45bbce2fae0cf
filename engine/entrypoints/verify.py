"""`parcap verify ARCH`: does the model's declared plan reproduce tp 1, and would the other
plan too, more cheaply? Exit 0 for consistent, 1 for contradicted, 2 for bad arguments.

Every argument is checked here, before any rank starts; the runs themselves
(`engine.frontend.verify`) turn a rank's crash or hang into a finding, never an exit 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from engine.server_args import ServerArgs
from registry.args import Parser, fail

if TYPE_CHECKING:
    from engine.frontend.launcher import Setup
    from engine.frontend.verdict import Run
    from engine.frontend.verify import Verification

# Flags verify sets otherwise than `parcap generate` where the user gives none: a topology
# where the declaration matters, and a collective timeout short enough that a hang is
# reported within seconds.
DEFAULTS = {"tp_size": 2, "moe_a2a_backend": "all2all", "dist_timeout": 10}


def parser() -> Parser:
    p = Parser(
        prog="parcap verify",
        description="Check a model's parallel_capabilities: greedy runs at tp 1, at the given "
        "topology under the declared plan, and with the attention-TP gather the other way. "
        "Verify's own defaults: --tp-size 2 --moe-a2a-backend all2all --dist-timeout 10.",
    )
    p.add_argument("architecture", metavar="ARCH", help="architecture to verify")
    ServerArgs.add_arguments(p.add_argument_group("server arguments (the topology to verify)"))
    g = p.add_argument_group("verification")
    g.add_argument(
        "--max-new-tokens", type=int, default=6, metavar="N", help="tokens per request (default: 6)"
    )
    g.add_argument(
        "--logprob-tol",
        type=float,
        default=1e-3,
        metavar="X",
        help="largest logprob difference from tp 1 that still counts as exact (default: 1e-3)",
    )
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str]) -> int:
    from engine.frontend.launcher import USER_ERRORS, is_torchrun
    from engine.frontend.verify import ReferenceFailed, prompt_set, verify

    p = parser()
    ns = p.parse_args(argv)
    given = vars(ns)
    if "model" in given:
        p.error("give the architecture as ARCH, not --model")
    if "attn_tp_gather" in given or any(k.startswith("alias:") for k in given):
        p.error("verify runs the attention-TP gather both ways itself; drop --attn-tp-gather")
    if ns.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1 (got {ns.max_new_tokens})")
    if not ns.logprob_tol >= 0:
        p.error(f"--logprob-tol must be >= 0 (got {ns.logprob_tol})")
    for name, value in DEFAULTS.items():
        given.setdefault(name, value)
    args = ServerArgs.from_namespace(ns, p)
    if args.model_path is None:
        args = attrs.evolve(args, model=ns.architecture)
    if args.tp_size < 2:
        p.error("verify compares a topology with tp 1; give --tp-size 2 or more")
    if args.nnodes > 1:
        p.error(
            "verify runs every rank on this host; drop --nnodes (it checks the plan, not the hosts)"
        )
    if is_torchrun():
        fail("verify spawns its own ranks; run it without torchrun")
    try:
        setup = _setup(ns.architecture, args)
    except USER_ERRORS as e:
        fail(e)
    plan = setup.launch.plan
    vocab = int(setup.launch.source.config["vocab_size"])
    prompts = prompt_set(vocab, plan.attn_tp_size, plan.attn_dp_size, ns.max_new_tokens)
    for batch in prompts.batches:
        for ids, params in batch:
            reason = setup.launch.limits.check(len(ids), params.max_new_tokens)
            if reason:
                fail(f"--max-new-tokens {ns.max_new_tokens}: {reason}")

    def progress(r: Run) -> None:
        status = "error" if r.error else "exact" if r.exact(ns.logprob_tol) else "differs"
        print(
            f"verify: {r.role} ({r.topology}, attn_tp_gather {'on' if r.attn_tp_gather else 'off'})"
            f": {status}, {r.seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    try:
        result = verify(setup, prompts, tol=ns.logprob_tol, on_run=progress)
    except ReferenceFailed as e:
        fail(e, code=1)
    if ns.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render(result, ns.max_new_tokens))
    return result.verdict.exit_code


def _setup(architecture: str, args: ServerArgs) -> Setup:
    """`prepare(args)`, with ARCH's class (and declaration) even where a checkpoint's
    config.json names another, so a plugin subclass can be verified on its parent's
    checkpoint."""
    from engine.frontend.launcher import check_divisible, prepare
    from registry import get_model_info, resolve_plan

    setup = prepare(args)
    source = setup.launch.source
    if source.architecture == architecture:
        return setup
    info = get_model_info(architecture)
    source = attrs.evolve(source, architecture=architecture)
    plan = resolve_plan(info.capabilities, args, model=architecture)
    check_divisible(info.cls, source, args, plan)
    return attrs.evolve(
        setup, launch=attrs.evolve(setup.launch, source=source, plan=plan), info=info
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def render(result: Verification, max_new_tokens: int) -> str:
    """The text report: the declaration, one row per run, the findings, the verdict."""
    caps = " ".join(f"{k}={v}" for k, v in result.capabilities.to_json().items())
    sizes = ", ".join(str(n) for n in result.prompts.sizes)
    head = _table(
        ("FIELD", "VALUE"),
        [
            ("architecture", result.architecture),
            ("declared_by", result.declared_by),
            ("capabilities", caps),
            ("prompts", f"batches of {sizes} requests, greedy, up to {max_new_tokens} new tokens"),
        ],
    )
    rows, notes = [], []
    for r in result.runs:
        c = r.counters
        if r.error is not None:
            tokens = "error"
            notes.append(f"{r.role}: {r.error}")
        elif r.role == "reference":
            tokens = "-"
        elif r.tokens_equal:
            tokens = "equal"
        else:
            tokens = "differ"
            request, step = r.first_difference
            notes.append(f"{r.role}: first difference at request {request}, step {step}")
        rows.append(
            (
                r.role,
                r.topology,
                "on" if r.attn_tp_gather else "off",
                tokens,
                "-" if tokens in ("-", "error") else f"{r.max_logprob_diff:.2g}",
                "-" if c is None else c.attn_tp_padding_tokens,
                "-" if c is None else c.mlp_sync_calls,
                "-" if c is None else c.gathered_buffer_bytes,
            )
        )
    runs = _table(
        ("RUN", "TOPOLOGY", "GATHER", "TOKENS", "MAX_DLOGP", "PADDING", "SYNC", "BUFFER_B"),
        rows,
    )
    v = result.verdict
    tail = _table(
        ("VERDICT", v.verdict),
        [("reason", v.reason), ("suggestion", v.suggestion or "none")],
    )
    return "\n\n".join(part for part in (head, runs, "\n".join(notes), tail) if part)
