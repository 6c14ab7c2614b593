"""The package layers point down only, and no modules import each other in a circle.

Every `import` in src/recast counts, also the ones inside functions (a lazy import is still a
dependency: it only hides a circle until the day someone moves it to the top). The order is
the one docs/ARCHITECTURE.md explains.
"""

import ast
from pathlib import Path

import networkx as nx

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top: a unit may import its own layer's units and the layers below it.
LAYERS = [
    {"errors", "registry", "logs", "markers", "version"},
    {"settings", "atomic", "shards"},
    {"ops"},
    {"runtime"},
    {"data"},
    {"models"},
    {"distributed"},
    {"refactor"},
    {"routers"},
    {"evaluate"},
    {"recover"},
    {"formats"},
    {"export"},
    {"stream"},
    {"recipe"},
    {"fusion"},
    {"stages"},
    {"streamed"},
    {"pipeline", "inspect"},
    {"api"},
    {"cli", "__main__", ""},  # "": the package itself (recast/__init__.py)
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in (SRC / "recast").rglob("*.py")}


def imported_modules(name: str, path: Path) -> set[str]:
    """The recast modules `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from . import data` imports the module recast.data, not a name of recast
            submodules = {f"{target}.{alias.name}" for alias in node.names}
            found |= (submodules & MODULES.keys()) or {target}
    return {m for m in found if m == "recast" or m.startswith("recast.")}


def unit_of(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


GRAPH = nx.DiGraph(
    (name, target)
    for name, path in MODULES.items()
    for target in imported_modules(name, path)
    if target != name
)


def test_every_unit_has_a_layer():
    assert {unit_of(m) for m in MODULES} <= RANK.keys(), (
        f"place these in LAYERS and docs/ARCHITECTURE.md: "
        f"{sorted({unit_of(m) for m in MODULES} - RANK.keys())}"
    )


def test_imports_point_down():
    upward = [
        f"{importer} ({unit_of(importer) or 'recast'}) imports {target} "
        f"({unit_of(target) or 'recast'}), a higher layer"
        for importer, target in GRAPH.edges
        if RANK[unit_of(target)] > RANK[unit_of(importer)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    circles = list(nx.simple_cycles(GRAPH))
    assert not circles, "\n".join(" -> ".join([*c, c[0]]) for c in circles)


def test_the_walk_sees_imports():
    # The checks above must be able to fail: these edges exist and are seen.
    assert ("recast.refactor.moe", "recast.ops") in GRAPH.edges
    assert ("recast.routers.base", "recast.refactor.moe") in GRAPH.edges
    assert ("recast.refactor.calibrate", "recast.data") in GRAPH.edges  # `from .. import data`
