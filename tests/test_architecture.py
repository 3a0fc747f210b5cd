"""docs/architecture.md's layer table is true to the code: every module of runner/ is in it
once, and no module imports one of a higher layer (imports inside functions count too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

DOC = REPO / "docs" / "architecture.md"
PACKAGE = REPO / "runner"


def layers() -> dict[str, int]:
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- layers: checked by tests/test_architecture.py -->", 1)[1]
    out: dict[str, int] = {}
    for line in table.strip().splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`([\w.]+)`", cells[1]):
            assert name not in out, f"{name} is in two layers"
            out[name] = int(cells[0])
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The runner modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]   # a module or a name in one
        for name in names:
            if name.split(".")[0] != "runner":
                continue
            while name not in known:                  # runner.sandbox.Limits -> runner.sandbox
                name = name.rpartition(".")[0]
            found.add(name)
    return found


def test_every_module_has_a_layer():
    table = layers()
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert modules - set(table) == set(), "modules missing from docs/architecture.md"
    assert set(table) - modules == set(), "docs/architecture.md names modules that do not exist"


def test_no_module_imports_upwards():
    table = layers()
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        mod = module_name(path)
        for dep in imports(path, set(table)) - {mod}:
            if table[dep] > table[mod]:
                wrong.append(f"{mod} (layer {table[mod]}) imports {dep} (layer {table[dep]})")
    assert not wrong, "\n".join(sorted(wrong))
