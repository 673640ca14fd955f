"""The package's structure: imports run one way, config stays light, and every registered name resolves."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import nextlat
from nextlat import registry

SRC = Path(nextlat.__file__).parent

# Rooms from the bottom up: a module may import its own room and the rooms below it, never one above.
LAYERS = [
    {"nextlat", "nextlat.config"},
    {"nextlat.data", "nextlat.model"},
    {"nextlat.decoding"},
    {"nextlat.objectives", "nextlat.tasks"},
    {"nextlat.registry"},
    {"nextlat.training"},
    {"nextlat.analysis"},
    {"nextlat.experiments", "nextlat.bench", "nextlat.interop"},
    {"nextlat.cli", "nextlat.__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def layer(module: str) -> int:
    for i, rooms in enumerate(LAYERS):
        if room(module) in rooms:
            return i
    raise AssertionError(f"module {module} belongs to no room of LAYERS")


def imports_of(module: str) -> set[str]:
    """The nextlat modules ``module`` imports anywhere in its code (function-local imports too), and the modules
    a registry table names (imported on lookup) for the module that looks them up: the registry itself for its
    components, the experiment runner for the experiments (which sit in its room, above the registry)."""
    tree = ast.parse(MODULES[module].read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "nextlat"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nextlat":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    if module == "nextlat.registry":
        for table in (registry.OBJECTIVES, registry.TASKS, registry.DRAFTERS):
            out |= {target.split(":")[0] for target in table.values()}
    if module == "nextlat.experiments.runner":
        out |= {target.split(":")[0] for target in registry.EXPERIMENTS.values()}
    return out - {module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_imports_run_down_the_rooms():
    upward = [(m, dep) for m, deps in GRAPH.items() for dep in deps if layer(dep) > layer(m)]
    assert not upward, f"imports from a lower room to a higher one: {upward}"


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [m, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_config_imports_no_component_and_no_torch():
    assert GRAPH["nextlat.config"] <= {"nextlat"}
    code = "import sys, nextlat.config; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('nextlat.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['nextlat.config']"


def test_the_package_names_load_on_first_use():
    """``import nextlat`` imports no torch; the names of the README's Python example load when first used."""
    code = ("import sys, nextlat; before = 'torch' in sys.modules; names = [getattr(nextlat, n) for n in nextlat.__all__]; "
            "print(before, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
    assert set(nextlat.__all__) <= set(dir(nextlat))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nextlat.nope  # noqa: B018


@pytest.mark.parametrize("table, kind", [(registry.OBJECTIVES, "objective"), (registry.TASKS, "task"),
                                         (registry.DRAFTERS, "drafter"), (registry.EXPERIMENTS, "experiment")])
def test_every_registered_name_resolves(table, kind):
    for name in table:
        assert registry.lookup(table, name, kind) is not None
    with pytest.raises(registry.UnknownName, match=f"unknown {kind} 'nope' \\(known: "):
        registry.lookup(table, "nope", kind)


def test_objectives_and_tasks_own_their_settings():
    for name in registry.OBJECTIVES:
        cls = registry.objective_class(name)
        assert cls.config_class.__module__ == cls.__module__ or cls.config_class.__module__ == "nextlat.objectives.base"
        assert registry.objective_config(name).name == name
    for name in registry.TASKS:
        cls = registry.task_class(name)
        assert cls.config_class.__module__ == cls.__module__ and cls.config_class().name == name
