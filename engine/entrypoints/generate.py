"""`parcap generate`: run prompts through a model, one JSON line per prompt.

Everything a user can get wrong (flags, the plan, the model, the prompts) is checked
here, before any rank starts, and reported as one line with exit code 2. A rank that
fails later stops the run with its error and exit code 1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from engine.server_args import ServerArgs
from registry.args import Parser, fail

if TYPE_CHECKING:
    from engine.messages import SamplingParams

DEFAULT_MODEL = "LlamaForCausalLM"


def parser() -> Parser:
    p = Parser(
        prog="parcap generate",
        description="Run prompts through a model; JSON lines with output_ids, output_logprobs "
        "and text, one per prompt, in input order.",
    )
    ServerArgs.add_arguments(p.add_argument_group("server arguments"))
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument(
        "--input",
        metavar="FILE.jsonl",
        help='prompts, one JSON object per line: {"prompt": str} or {"input_ids": [int]}, '
        "optionally with its own max_new_tokens, temperature, top_p, top_k, seed, ignore_eos",
    )
    g.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="(default: 16)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default: 1)")
    g.add_argument("--top-k", type=int, default=0, help="0 keeps every token (default: 0)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    g.add_argument("--output", metavar="PATH", help="write the results here (default: stdout)")
    g.add_argument("--report-json", metavar="PATH", help="write plan, counters and timings here")
    return p


def server_args(ns: Any, p: Parser) -> ServerArgs:
    """The server flags; the embedded default model when neither --model nor --model-path."""
    args = ServerArgs.from_namespace(ns, p)
    if args.model is None and args.model_path is None:
        args = attrs.evolve(args, model=DEFAULT_MODEL)
    return args


def main(argv: list[str]) -> int:
    from engine.frontend.launcher import USER_ERRORS, RankError, is_torchrun, prepare
    from engine.frontend.llm_engine import LLMEngine, make_report
    from engine.frontend.node_agent import run_node
    from engine.frontend.nodes import NodeError
    from engine.frontend.tokenizer import missing_tokenizer
    from engine.frontend.torchrun import run_torchrun
    from engine.messages import SamplingParams

    p = parser()
    ns = p.parse_args(argv)
    args = server_args(ns, p)
    try:
        flags = SamplingParams(
            max_new_tokens=ns.max_new_tokens,
            temperature=ns.temperature,
            top_p=ns.top_p,
            top_k=ns.top_k,
            ignore_eos=ns.ignore_eos,
        )
    except ValueError as e:
        message = str(e)
        for f in attrs.fields(SamplingParams):
            message = message.replace(f"'{f.name}'", "--" + f.name.replace("_", "-"))
        p.error(message)
    if is_torchrun() and int(os.environ["WORLD_SIZE"]) != args.tp_size:
        fail(f"torchrun started {os.environ['WORLD_SIZE']} ranks but --tp-size is {args.tp_size}")
    try:
        setup = prepare(args)
    except USER_ERRORS as e:
        fail(e)
    if args.node_rank > 0:  # prompts, results and reports are node 0's
        return run_node(setup, "generate")
    for flag, path in (("--output", ns.output), ("--report-json", ns.report_json)):
        if path and not Path(path).resolve().parent.is_dir():
            fail(f"{flag} {path}: its directory does not exist")
    config = setup.launch.source.config
    no_tokenizer = missing_tokenizer(args.model_path)
    prompts = read_prompts(ns, setup.tokenizer, int(config["vocab_size"]), no_tokenizer)
    limits = setup.launch.limits
    ids, params = [ids for _, ids, _ in prompts], [own(flags) for _, _, own in prompts]
    for (where, _, _), prompt, own_params in zip(prompts, ids, params, strict=True):
        reason = limits.check(len(prompt), own_params.max_new_tokens)
        if reason:
            fail(f"{where}: {reason}")
    try:
        if is_torchrun():
            out = run_torchrun(setup, ids, params)
            if out is None:
                return 0
            results, report = out[0], make_report(setup, *out[1:])
        else:
            with LLMEngine(args, setup=setup, progress=True) as engine:
                results = engine.generate(ids, params, progress=True)
            report = engine.report()
    except (RankError, NodeError) as e:
        fail(e, code=1)
    write_results(results, setup.tokenizer, ns.output)
    if ns.report_json:
        Path(ns.report_json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def read_prompts(
    ns: Any, tokenizer: Any, vocab_size: int, no_tokenizer: str = "there is no tokenizer"
) -> list[tuple[str, list[int], Callable[[SamplingParams], SamplingParams]]]:
    """(where, token ids, the line's own sampling settings applied to the flags') per prompt;
    `where` names the prompt in error messages. Text is encoded by `tokenizer` (its own BOS
    settings); input_ids are taken as given."""
    if ns.prompt and ns.input:
        fail("give prompts with --prompt or --input, not both")
    if ns.input:
        entries = list(_read_jsonl(ns.input))
    elif ns.prompt:
        entries = [(f"--prompt #{i + 1}", {"prompt": text}) for i, text in enumerate(ns.prompt)]
    else:
        fail("no prompts: give --prompt TEXT or --input FILE.jsonl")
    prompts = []
    for where, entry in entries:
        if "prompt" in entry:
            if tokenizer is None:
                fail(f"{where}: {no_tokenizer}")
            ids = tokenizer.encode(entry["prompt"])
        else:
            ids = entry["input_ids"]
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                fail(f"{where}: input id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        prompts.append((where, ids, _line_settings(where, entry)))
    if not prompts:
        fail(f"{ns.input}: no prompts in it")
    return prompts


def _read_jsonl(path: str):
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        fail(f"--input {path}: {e.strerror or e}")
    except UnicodeDecodeError:
        fail(f"--input {path}: not UTF-8 text")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{where}: not valid JSON ({e.msg})")
        if not _valid_entry(entry):
            fail(f'{where}: expected {{"prompt": str}} or {{"input_ids": [int, ...]}} (got {line})')
        yield where, entry


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict) or ("prompt" in entry) == ("input_ids" in entry):
        return False
    if "prompt" in entry:
        return isinstance(entry["prompt"], str)
    ids = entry["input_ids"]
    return isinstance(ids, list) and all(type(i) is int for i in ids)


# what a line may set for itself, by JSON type; SamplingParams checks the values
LINE_SETTINGS = {
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "seed": (int,),
    "ignore_eos": (bool,),
}


def _line_settings(where: str, entry: dict) -> Callable[[SamplingParams], SamplingParams]:
    own = {key: value for key, value in entry.items() if key not in ("prompt", "input_ids")}
    for key, value in own.items():
        if key not in LINE_SETTINGS:
            known = ", ".join(["prompt", "input_ids", *LINE_SETTINGS])
            fail(f"{where}: unknown key {key!r} (known: {known})")
        if type(value) not in LINE_SETTINGS[key]:
            kind = " or ".join(t.__name__ for t in LINE_SETTINGS[key])
            fail(f"{where}: {key!r} must be {kind} (got {json.dumps(value)})")

    def apply(flags: SamplingParams) -> SamplingParams:
        try:
            return attrs.evolve(flags, **own)
        except ValueError as e:
            fail(f"{where}: {e}")

    return apply


def write_results(results: list[Any], tokenizer: Any, output: str | None) -> None:
    lines = []
    for r in results:
        line = {
            "output_ids": r.output_ids,
            "output_logprobs": r.output_logprobs,
            "text": tokenizer.decode(r.output_ids) if tokenizer else None,
        }
        if r.error:
            line["error"] = r.error
        lines.append(json.dumps(line) + "\n")
    if output is None:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    else:
        Path(output).write_text("".join(lines))
