"""Command-line flags built from an attrs class: `option` fields, argparse, one-line errors.

An attrs field becomes a flag when it is declared with `option(...)`: the flag is
``--field-name``, the default is the field's, the type comes from the annotation and
bools become ``store_true``. The class stays the one source of truth: argparse only
collects what the user typed (every default is suppressed), the class fills in the
rest and validates, and a validation error becomes a one-line usage error.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, Self

import attrs
from attrs import field, frozen

PROG = "parcap"

_CLI = "parcap.cli"  # field-metadata key


class UsageError(ValueError):
    """A user mistake on the command line; reported as one line, exit code 2."""


def fail(message: object, *, code: int = 2) -> NoReturn:
    """Print ``parcap: error: <message>`` on one line to stderr and exit."""
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(code)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``parcap: error: ...``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(message)


# -- validators (messages in attrs style: 'field' must be ... (got ...)) --------------


def at_least(low: int):
    def check(inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"'{attr.name}' must be an int >= {low} (got {value!r})")

    return check


def one_of(choices: Sequence[Any], *, allow_none: bool = False):
    def check(inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if value is None and allow_none:
            return
        # bool == 1 would slip through `in`; a flag value of True is never a choice
        if isinstance(value, bool) or value not in choices:
            allowed = ", ".join(repr(c) for c in choices) + (", None" if allow_none else "")
            raise ValueError(f"'{attr.name}' must be one of {allowed} (got {value!r})")

    return check


def optional_str(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"'{attr.name}' must be a str or None (got {value!r})")


@frozen
class Flag:
    """How one field appears on the command line (kept in the field's metadata)."""

    help: str
    choices: tuple[Any, ...] | None = None
    # extra flag -> the value it stores, e.g. {"--disable-attn-tp-gather": "off"}
    aliases: Mapping[str, Any] = attrs.field(factory=dict)
    alias_help: Mapping[str, str] = attrs.field(factory=dict)
    metavar: str | None = None


def option(
    default: Any,
    *,
    help: str,
    choices: Sequence[Any] | None = None,
    aliases: Mapping[str, Any] | None = None,
    alias_help: Mapping[str, str] | None = None,
    validator: Any = None,
    metavar: str | None = None,
) -> Any:
    """An attrs field that is also a command-line flag; `choices` also validate."""
    validators = [] if validator is None else [validator]
    if choices is not None:
        validators.append(one_of(tuple(choices), allow_none=default is None))
    flag = Flag(
        help=help,
        choices=None if choices is None else tuple(choices),
        aliases=dict(aliases or {}),
        alias_help=dict(alias_help or {}),
        metavar=metavar,
    )
    return field(default=default, validator=validators, metadata={_CLI: flag})


def cli_fields(cls: type) -> list[tuple[attrs.Attribute, Flag]]:
    return [
        (f, f.metadata[_CLI]) for f in attrs.fields(attrs.resolve_types(cls)) if _CLI in f.metadata
    ]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _alias_dest(flag: str) -> str:
    return "alias:" + flag


def _scalar_type(tp: Any) -> Any:
    # `int | None` -> int; argparse needs the callable that parses one value
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"cannot build a flag for type {tp!r}")
        return args[0]
    return tp


def add_arguments(cls: type, parser: argparse.ArgumentParser | Any) -> None:
    """Add one flag per `option` field of `cls` (and its aliases) to `parser` or a group."""
    for f, flag in cli_fields(cls):
        tp = _scalar_type(f.type)
        help = flag.help
        if tp is bool:
            if f.default is not False:
                raise TypeError(f"bool flag '{f.name}' must default to False")
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                action="store_true",
                default=argparse.SUPPRESS,
                help=help,
            )
        else:
            if f.default is not None:
                help = f"{help} (default: {f.default})"
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                type=tp,
                choices=flag.choices,
                default=argparse.SUPPRESS,
                metavar=flag.metavar,
                help=help,
            )
        for alias, value in flag.aliases.items():
            parser.add_argument(
                alias,
                dest=_alias_dest(alias),
                action="store_const",
                const=value,
                default=argparse.SUPPRESS,
                help=flag.alias_help.get(alias, f"same as {flag_name(f.name)} {value}"),
            )


def from_namespace(
    cls: type, ns: argparse.Namespace, parser: argparse.ArgumentParser | None = None
):
    """Build `cls` from the flags present in `ns`; absent ones take the class defaults.

    A conflict or a validation error raises `UsageError`, or goes to
    ``parser.error`` when a parser is given (argparse style: message, exit code 2).
    """
    try:
        return cls(**_kwargs(cls, ns))
    except (ValueError, TypeError) as e:
        if parser is None:
            raise UsageError(one_line(e)) from e
        parser.error(one_line(e))
        raise  # parser.error does not return; keeps type checkers honest


def _kwargs(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    given = vars(ns)
    kwargs: dict[str, Any] = {}
    for f, flag in cli_fields(cls):
        if f.name in given:
            kwargs[f.name] = given[f.name]
        for alias, value in flag.aliases.items():
            if _alias_dest(alias) not in given:
                continue
            if f.name in kwargs and kwargs[f.name] != value:
                raise UsageError(
                    f"argument {alias}: not allowed with {flag_name(f.name)} {kwargs[f.name]} "
                    f"({alias} means {flag_name(f.name)} {value})"
                )
            kwargs[f.name] = value
    return kwargs


class FromCli:
    """Mixin for an attrs class whose `option` fields are command-line flags."""

    __slots__ = ()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | Any) -> None:
        """Add this class's flags to `parser` (or an argument group of it)."""
        add_arguments(cls, parser)

    @classmethod
    def from_namespace(
        cls, ns: argparse.Namespace, parser: argparse.ArgumentParser | None = None
    ) -> Self:
        return from_namespace(cls, ns, parser)

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None, *, prog: str = PROG) -> Self:
        """Parse `argv` (default ``sys.argv[1:]``); a bad flag or combination prints
        ``parcap: error: <one line>`` and exits 2."""
        parser = Parser(prog=prog)
        cls.add_arguments(parser)
        ns = parser.parse_args(argv)
        return cls.from_namespace(ns, parser)
