"""The dependency direction registry <- engine <- models, read from the source: no import of
`models` anywhere under engine/ (module level or inside functions), none of `engine` or
`models` under registry/, no module-level torch there, and one role per file in under 300
lines under engine/, models/ and registry/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "models", "registry")
MAX_LINES = 300


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imports(path: Path, module_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`: absolute names, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.append((node.lineno, base))
    return found


def offending(package: str, banned: tuple[str, ...], module_level_only: bool = False) -> list:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sources(package)
        for line, name in imports(path, module_level_only)
        if name.split(".")[0] in banned
    ]


def test_engine_never_imports_models():
    assert offending("engine", ("models",)) == []


def test_registry_imports_neither_engine_nor_models_nor_torch_at_module_level():
    assert offending("registry", ("engine", "models")) == []
    assert offending("registry", ("torch",), module_level_only=True) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_file_is_under_300_lines(package):
    long = {
        str(p.relative_to(ROOT)): n
        for p in sources(package)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """A planted import of `models` in a function body is found (the check can fail)."""
    planted = tmp_path / "engine" / "runtime"
    planted.mkdir(parents=True)
    (planted / "sneaky.py").write_text("def f():\n    from models.llama import X\n    return X\n")
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "x.py").write_text("import torch\nfrom ..engine import y\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert offending("engine", ("models",)) == ["engine/runtime/sneaky.py:2 imports models.llama"]
    assert offending("registry", ("engine",)) == ["registry/x.py:2 imports engine"]
    assert offending("registry", ("torch",), module_level_only=True) == [
        "registry/x.py:1 imports torch"
    ]
