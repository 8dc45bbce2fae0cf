"""A one-line progress bar on stderr; on a non-terminal, one summary line when done."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24
REDRAW_S = 0.1


class Progress:
    def __init__(self, label: str, total: int, unit: str, stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.done = 0
        self.start = time.monotonic()
        self._drawn = 0.0
        self._closed = False
        self._draw(force=True)

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        self.done = min(self.total, done)
        self._draw(force=self.done == self.total)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.live or (not force and now - self._drawn < REDRAW_S):
            return
        self._drawn = now
        filled = WIDTH * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (WIDTH - filled)
        self.stream.write(f"\r{self.label} [{bar}] {self._summary(now)}")
        self.stream.flush()

    def _summary(self, now: float) -> str:
        return f"{self.done}/{self.total} {self.unit} {now - self.start:.1f}s"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.live:
            self._draw(force=True)
            self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: {self._summary(time.monotonic())}\n")
        self.stream.flush()
