"""The package's import graph: no cycle between its subpackages (and top-level modules), and no
module imports the training CLI. Read from the source (every import statement, including those
inside functions), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kat_research"


def unit(module: str) -> str:
    """The subpackage or top-level module ``kat_research.<unit>...`` belongs to."""
    return module.split(".")[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``kat_research.*`` module ``path`` imports, resolved to absolute names."""
    found = set()
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    )
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kat_research.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("kat_research."):
                found.add(name)
            elif name == "kat_research":
                found |= {f"kat_research.{a.name}" for a in node.names}
    return found


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        here = module_name(path)
        if here == "kat_research":
            continue
        for target in imports_of(path):
            if unit(target) != unit(here):
                graph[unit(here)].add(unit(target))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_imports_resolve_relative_and_package_forms(tmp_path):
    assert unit("kat_research.rollout.engine") == "rollout"
    assert module_name(PACKAGE / "rollout" / "__init__.py") == "kat_research.rollout"


def test_no_import_cycle_between_subpackages():
    cycle = find_cycle(unit_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_training_cli():
    importers = [
        module_name(p) for p in PACKAGE.rglob("*.py") if "kat_research.train" in imports_of(p)
    ]
    assert importers == []
