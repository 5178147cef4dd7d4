"""The package's layers hold: every import points to the same layer or one below, no
feature imports another, and no two modules import each other (directly or round a
circle). See docs/architecture.md.

Every ``import`` counts, wherever it stands: at the top, inside a function (a lazy
import is still a dependency) or under ``TYPE_CHECKING`` (a type-only import can hide a
circle that a refactoring turns into a real one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import podpatterns

PACKAGE = Path(podpatterns.__file__).resolve().parent

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "podpatterns",
            "podpatterns.atomicfile",
            "podpatterns.dirwatch",
            "podpatterns.errors",
            "podpatterns.listen",
            "podpatterns.logs",
            "podpatterns.metrics",
            "podpatterns.options",
            "podpatterns.subproc",
            "podpatterns.tasks",
        ),
    ),
    ("runtime", ("podpatterns.runtime",)),
    (
        "features",
        (
            "podpatterns.adapter",
            "podpatterns.ambassador",
            "podpatterns.health",
            "podpatterns.reload",
        ),
    ),
    ("commands", ("podpatterns.commands",)),
    ("cli", ("podpatterns.cli", "podpatterns.__main__", "podpatterns.reference")),
)
"""Lowest first. A module belongs to the longest prefix that names it; for the base
layer, ``podpatterns`` means the package's ``__init__`` only."""


def all_modules() -> list[str]:
    """Every module of the package, by dotted name."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append(".".join(parts))
    return out


MODULES = all_modules()


def source_of(module: str) -> Path:
    """The file of a module."""
    base = PACKAGE.parent / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the prefix that placed it) of a package module."""
    best: tuple[int, str] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact_only = prefix == "podpatterns"
            placed = module == prefix or (not exact_only and module.startswith(prefix + "."))
            if placed and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best


def imports_of(module: str) -> set[str]:
    """The package modules that ``module`` imports, anywhere in its source."""
    tree = ast.parse(source_of(module).read_text())
    is_package = source_of(module).name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("podpatterns") and name and name != module:
                out.add(name)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer() -> None:
    """Every module of the package is placed in a layer (a new top-level module must be)."""
    for module in MODULES:
        layer_of(module)


def wrong_imports(graph: dict[str, set[str]], module: str) -> list[str]:
    """What ``module`` imports against the layer rule, each with the reason."""
    mine, my_prefix = layer_of(module)
    wrong = []
    for target in sorted(graph[module]):
        theirs, their_prefix = layer_of(target)
        if theirs > mine:
            wrong.append(f"{target} ({LAYERS[theirs][0]}) is above {LAYERS[mine][0]}")
        elif theirs == mine and LAYERS[mine][0] == "features" and their_prefix != my_prefix:
            wrong.append(f"{target}: features import only the layers below, never each other")
    return wrong


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk of ``graph`` meets."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module: str) -> None:
    """A module imports only from its own layer or those below, and a feature never
    imports another feature."""
    wrong = wrong_imports(GRAPH, module)
    assert not wrong, f"{module}: " + "; ".join(wrong)


def test_no_import_circles() -> None:
    """No module reaches itself by following imports."""
    found = circles(GRAPH)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_can_fail() -> None:
    """An upward import, a sideways feature import and a circle are each reported."""
    graph = {
        "podpatterns.runtime.lifecycle": {"podpatterns.health.records"},
        "podpatterns.reload.reloader": {"podpatterns.health.watch"},
        "podpatterns.health.watch": {"podpatterns.health.records"},
        "podpatterns.health.records": {"podpatterns.health.watch"},
    }
    assert wrong_imports(graph, "podpatterns.runtime.lifecycle") == [
        "podpatterns.health.records (features) is above runtime"
    ]
    assert "never each other" in wrong_imports(graph, "podpatterns.reload.reloader")[0]
    assert wrong_imports(graph, "podpatterns.health.watch") == []
    assert circles(graph) == [
        ["podpatterns.health.records", "podpatterns.health.watch", "podpatterns.health.records"]
    ]
    # and the real graph is read: lazy imports inside functions count
    assert "podpatterns.health.coordination" in GRAPH["podpatterns.commands.ambassador"]
