"""The `parcap` command: dispatches `parcap COMMAND ...` to the command's module.

Commands are imported only when run, so `parcap registry` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from registry.args import Parser

# name -> ("module:function", one-line help). The function takes the remaining argv
# (a list of str) and returns an exit code (None means 0); user mistakes go through
# registry.args.fail / Parser (one line "parcap: error: ...", exit 2).
# `generate` and `serve` register here, e.g.
#   "generate": ("engine.entrypoints.generate:main", "run prompts through a model, JSONL out"),
COMMANDS: dict[str, tuple[str, str]] = {
    "registry": ("engine.cli:_registry", "inspect model declarations and the parallel plan"),
    "generate": ("engine.entrypoints.generate:main", "run prompts through a model, JSONL out"),
    "serve": ("engine.entrypoints.serve:main", "serve a model over an OpenAI-compatible HTTP API"),
    "verify": ("engine.entrypoints.verify:main", "check a model's declaration against tp 1"),
}


def _registry(argv: list[str]) -> int:
    from registry.cli import main

    return main(argv, prog="parcap registry")


def _parser() -> Parser:
    lines = [f"  {name:<10} {help}" for name, (_, help) in COMMANDS.items()]
    return Parser(
        prog="parcap",
        usage="parcap COMMAND [args...]",
        description="A small LLM inference engine whose parallel plan is declared by each model.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nrun 'parcap COMMAND --help' for its flags",
        # the default formatter would re-wrap the command list into one paragraph
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r} (choose from {', '.join(COMMANDS)})")
    # Unwind on SIGTERM like on Ctrl-C, so the engine's context manager stops the ranks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        code = _load(COMMANDS[name][0])(rest)
    except KeyboardInterrupt:
        print("parcap: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
