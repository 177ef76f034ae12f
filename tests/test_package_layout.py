"""The package's shape: a thin entry file, modules of a readable size, dependencies that point one way."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import whatsapp_webhook

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "whatsapp_webhook"
# The order the package docstring gives: a module may import only the ones before it.
LAYERS = re.search(r"Dependencies point one way, leaves first: (.*?)\.\n", whatsapp_webhook.__doc__ or "", re.S)


def layers() -> list[str]:
    assert LAYERS, "the package docstring must list the module order"
    return ["__init__", *(name.strip() for name in LAYERS.group(1).replace("\n", " ").split(","))]


def internal_imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports at run time (imports under TYPE_CHECKING do not count)."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                 for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("whatsapp_webhook"):
            if node.module == "whatsapp_webhook":
                found |= {alias.name if (PACKAGE / f"{alias.name}.py").exists() else "__init__"
                          for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("whatsapp_webhook.")}
    return found


def test_every_module_is_in_the_documented_order() -> None:
    assert sorted(layers()) == sorted(p.stem for p in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_dependencies_point_one_way(module: str) -> None:
    order = layers()
    later = {name for name in internal_imports(PACKAGE / f"{module}.py") if order.index(name) >= order.index(module)}
    assert not later, f"{module} imports {sorted(later)}, which come after it in the package docstring's order"


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_no_module_is_too_long_to_read(module: str) -> None:
    assert len((PACKAGE / f"{module}.py").read_text().splitlines()) <= 650


def test_the_entry_file_is_thin_and_keeps_the_gunicorn_target() -> None:
    entry = (REPO / "whatsapp_webhook_server.py").read_text()
    assert len(entry.splitlines()) < 100
    assert 'if name == "app":' in entry and "def main" not in entry  # the CLI lives in the package
