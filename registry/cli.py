"""`parcap registry list | show ARCH | explain ARCH [server args]` (also `python -m registry`).

Exit codes: 0 ok; 1 a registered model failed to load (`list` reports those as errors);
2 a user mistake (bad flags, unknown architecture, refused plan), one line on stderr.
Reads model classes only: nothing is instantiated and CUDA is never initialised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from registry.args import Parser, PlanArgs, UsageError, fail
from registry.capabilities import capability_docs
from registry.explain import explain_json, list_json, show_json
from registry.models import ModelLoadError, ModelRegistry, UnknownArchitecture, model_registry
from registry.plan import PlanRefused, resolve_plan


def build_parser(prog: str = "parcap registry") -> Parser:
    parser = Parser(
        prog=prog,
        description="Inspect what each model declares about parallel communication and the "
        "plan it leads to under given server arguments.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,show,explain}")
    p = sub.add_parser("list", help="every registered model, its declaration and origin")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("show", help="one model's declaration")
    p.add_argument("architecture", help="architecture name, as in config.json 'architectures'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("explain", help="the plan a model gets under the given server args")
    p.add_argument("architecture", help="architecture name, as in config.json 'architectures'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    PlanArgs.add_arguments(p.add_argument_group("server args"))
    p.set_defaults(parser=p)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "parcap registry",
    models: ModelRegistry | None = None,
) -> int:
    ns = build_parser(prog).parse_args(argv)
    models = models or model_registry()
    try:
        if ns.command == "list":
            return _list(models, ns.json)
        if ns.command == "show":
            return _show(models, ns.architecture, ns.json)
        return _explain(models, ns, ns.json)
    except (UsageError, UnknownArchitecture, PlanRefused) as e:
        fail(e)
    except ModelLoadError as e:
        fail(e, code=1)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _caps_text(caps: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in caps.items())


def _list(models: ModelRegistry, as_json: bool) -> int:
    doc = list_json(models)
    if as_json:
        _print_json(doc)
    else:
        rows = [
            (m["architecture"], _caps_text(m["capabilities"]), m["declared_by"], m["origin"])
            for m in doc["models"]
        ]
        print(_table(("ARCHITECTURE", "CAPABILITIES", "DECLARED_BY", "ORIGIN"), rows))
        if doc["errors"]:
            print()
            errors = [(e["architecture"], e["error"]) for e in doc["errors"]]
            print(_table(("FAILED", "ERROR"), errors))
    return 1 if doc["errors"] else 0


def _show(models: ModelRegistry, architecture: str, as_json: bool) -> int:
    doc = show_json(models.load(architecture))
    if as_json:
        _print_json(doc)
        return 0
    docs = capability_docs()
    rows = [(k, doc[k]) for k in ("architecture", "class", "declared_by", "origin")]
    rows += [(k, f"{v}  ({docs[k]})" if docs.get(k) else v) for k, v in doc["capabilities"].items()]
    print(_table(("FIELD", "VALUE"), rows))
    return 0


def _explain(models: ModelRegistry, ns: Any, as_json: bool) -> int:
    args = PlanArgs.from_namespace(ns, ns.parser)
    info = models.load(ns.architecture)
    plan = resolve_plan(info.capabilities, args, model=info.architecture)
    doc = explain_json(info, plan)
    if as_json:
        _print_json(doc)
        return 0
    given = " ".join(f"{k}={v}" for k, v in attrs.asdict(args).items())
    print(
        _table(
            ("FIELD", "VALUE"),
            [
                ("architecture", doc["architecture"]),
                ("declared_by", doc["declared_by"]),
                ("capabilities", _caps_text(doc["capabilities"])),
                ("server args", given),
            ],
        )
    )
    print()
    rows = [
        (name, d["value"], d.get("source", "-"), d["reason"]) for name, d in doc["plan"].items()
    ]
    print(_table(("DECISION", "VALUE", "SOURCE", "REASON"), rows))
    return 0
