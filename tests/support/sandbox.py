"""Fixture modules and `.dist-info` plugins written to a directory on sys.path, for the
registry's tests in this process."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

DECLARES_NOTHING = """
class Model:
    pass
"""

SELF_MANAGED = """
from registry import ParallelCapabilities

class Base:
    parallel_capabilities = ParallelCapabilities(self_managed_sp=True)

class Model(Base):
    def __init__(self):
        raise AssertionError("never instantiated by the registry")
"""

BROKEN = """
raise RuntimeError("plugin exploded on import")
"""


class Sandbox:
    """A directory on sys.path holding fixture modules and `.dist-info` plugins."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        self.prefix = f"pcfx_{uuid.uuid4().hex[:8]}_"
        monkeypatch.syspath_prepend(str(root))

    def module(self, name: str, source: str) -> str:
        """Write a module; returns its unique importable name."""
        mod = self.prefix + name
        (self.root / f"{mod}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        return mod

    def dist(self, name: str, entry_points: dict[str, str], group: str = "parcap.models"):
        info = self.root / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")
        importlib.invalidate_caches()

    def cleanup(self) -> None:
        for name in [m for m in sys.modules if m.startswith(self.prefix)]:
            del sys.modules[name]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    box = Sandbox(tmp_path, monkeypatch)
    yield box
    box.cleanup()
