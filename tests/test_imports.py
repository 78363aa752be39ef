"""The package's import graph against the layer order the README declares (its Layout
section): every import goes to a lower layer, no cycle, nothing imports the training CLI; and
conf/'s `_target_` and `${resolver:}` strings name nothing above the layer that instantiates
configs. Read from the source (every import statement, including those inside functions), so a
lazy import cannot hide an upward edge."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kat_research"
CONF = ROOT / "conf"
# Resolvers Hydra and OmegaConf register themselves.
BUILTIN_RESOLVERS = {
    "now",
    "hydra",
    "oc.env",
    "oc.select",
    "oc.create",
    "oc.decode",
    "oc.deprecated",
    "oc.dict.keys",
    "oc.dict.values",
}


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


# --- the declared layer order -----------------------------------------------------------------


def declared_layers(readme: str) -> dict[str, int]:
    """Unit -> layer number, from the README Layout section's numbered list of backticked
    names (``1. `text`, `provenance` ...``)."""
    section = readme.split("### Layout", 1)[1].split("\n#", 1)[0]
    layers: dict[str, int] = {}
    for number, names in re.findall(r"^(\d+)\. (.+)$", section, flags=re.M):
        for name in re.findall(r"`([a-z_]+)`", names):
            assert name not in layers, f"{name} is declared in two layers"
            layers[name] = int(number)
    return layers


LAYERS = declared_layers((ROOT / "README.md").read_text())


def all_units() -> set[str]:
    return {unit(module_name(p)) for p in PACKAGE.rglob("*.py") if module_name(p) != "kat_research"}


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Every edge of ``graph`` that does not go to a strictly lower layer."""
    return [
        f"{a} (layer {layers[a]}) imports {b} (layer {layers[b]})"
        for a in sorted(graph)
        for b in sorted(graph[a])
        if layers[b] >= layers[a]
    ]


def conf_strings(pattern: str) -> list[tuple[str, str]]:
    """(file, match) of ``pattern`` over every YAML file of conf/."""
    return [
        (str(path.relative_to(ROOT)), match)
        for path in sorted(CONF.rglob("*.yaml"))
        for match in re.findall(pattern, path.read_text())
    ]


def target_unit(target: str) -> str:
    """The unit of a ``kat_research.*`` dotted ``_target_``, checked to name a module that
    exists (the longest prefix that is a module file or package) and, after it, a name that
    module defines or imports."""
    parts = target.split(".")
    for end in range(len(parts), 1, -1):
        base = PACKAGE.parent.joinpath(*parts[:end])
        source = (
            base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        )
        if source.is_file():
            rest = parts[end:]
            if rest and not re.search(rf"\b{rest[0]}\b", source.read_text()):
                break
            return unit(".".join(parts[:end]))
    raise AssertionError(f"_target_ {target} names no module of the package")


def resolver_units() -> dict[str, str]:
    """Resolver name -> the unit whose source registers it (``register_new_resolver("name"``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for name in re.findall(r"register_new_resolver\(\s*\"([\w.]+)\"", path.read_text()):
            found[name] = (
                unit(module_name(path))
                if path.parent != PACKAGE or path.stem != "__init__"
                else "kat_research"
            )
    return found


def test_declared_layers_parse_a_planted_list():
    text = "### Layout\n\nintro\n\n1. `text`, `layout`\n2. `data`\n\n| table |\n## Next\n3. `x`"
    assert declared_layers(text) == {"text": 1, "layout": 1, "data": 2}
    assert upward_imports({"data": {"text"}, "text": {"data"}}, {"text": 1, "data": 2}) == [
        "text (layer 1) imports data (layer 2)"
    ]
    assert upward_imports({"a": {"b"}}, {"a": 2, "b": 2}) == ["a (layer 2) imports b (layer 2)"]


def test_every_unit_is_declared_in_the_readme_layout():
    missing = sorted(all_units() - set(LAYERS))
    stale = sorted(set(LAYERS) - all_units())
    assert not missing, f"declare these in README.md's Layout list: {missing}"
    assert not stale, f"README.md's Layout list names units that do not exist: {stale}"


def test_imports_go_only_to_lower_layers():
    assert upward_imports(unit_graph(), LAYERS) == []


def test_conf_targets_name_layers_below_config():
    targets = conf_strings(r"_target_:\s*[\"']?(kat_research\.[\w.]+)")
    assert len(targets) > 20  # the scan sees conf/'s targets
    too_high = [
        f"{file}: {target} (layer {LAYERS[target_unit(target)]})"
        for file, target in targets
        if LAYERS[target_unit(target)] >= LAYERS["config"]
    ]
    assert too_high == [], f"conf targets at or above config (layer {LAYERS['config']})"


def test_conf_resolvers_are_registered_at_or_below_config():
    registered = resolver_units()
    used = {name for _, name in conf_strings(r"\$\{([\w.]+):")}
    assert {"run_id", "first", "package_root"} <= used
    unknown = sorted(used - BUILTIN_RESOLVERS - set(registered))
    assert unknown == [], f"resolvers used in conf/ that nothing registers: {unknown}"
    too_high = {
        name: registered[name]
        for name in used - BUILTIN_RESOLVERS
        if LAYERS[registered[name]] > LAYERS["config"]
    }
    assert too_high == {}


@pytest.mark.parametrize("target", ["kat_research.nowhere.thing", "kat_research.lit.nope.X"])
def test_target_unit_rejects_missing_modules(target):
    with pytest.raises(AssertionError, match="names no module"):
        target_unit(target)


def imported_names(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports, any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_script_imports_another_script():
    """Code that two scripts share belongs in the package: a script importing another works
    only when run from scripts/ and hides shared code from the tests."""
    scripts = {p.stem: p for p in (ROOT / "scripts").glob("*.py")}
    offenders = {
        name: sorted(imported_names(path) & (scripts.keys() - {name}))
        for name, path in scripts.items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_imported_names_sees_nested_and_from_imports(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "import a.b\nfrom c import d\ndef f():\n    from e.f import g\nfrom . import h\n"
    )
    assert imported_names(script) == {"a", "c", "e"}
