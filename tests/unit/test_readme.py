"""The README's console examples are real output: each ```console block's `$ parcap ...`
command, run now, prints exactly what the README shows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.support.engine import run_cli

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```console\n\$ parcap (?P<argv>[^\n]+)\n(?P<out>.*?)```", re.S)


def blocks() -> list[tuple[str, str]]:
    return [(m["argv"], m["out"]) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def test_the_readme_has_console_examples():
    assert any(argv.startswith("registry explain") for argv, _ in blocks())


@pytest.mark.parametrize(("argv", "shown"), blocks())
def test_console_example_is_real_output(argv, shown):
    done = run_cli(*shlex.split(argv))
    assert done.returncode == 0, done.stderr
    assert done.stdout == shown
