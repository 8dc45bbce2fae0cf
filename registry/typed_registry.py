"""A typed name registry: names to values of one kind, a taken name refused.

Its sorted names feed argparse ``choices=``; the model registry and the attention-backend
registry are built on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class DuplicateName(ValueError):
    """A name registered twice; the message names both sides."""


class Registry(Generic[T]):
    """Names to values of one kind; registering a taken name is refused."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, value: T) -> None:
        if name in self._items:
            raise DuplicateName(
                f"{self.kind} {name!r} is already registered by {self._items[name]}; "
                f"refusing {value}"
            )
        self._items[name] = value

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        """Sorted names, e.g. for argparse ``choices=``."""
        return sorted(self._items)
