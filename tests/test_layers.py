"""The layers of the package, checked over its import graph (run by `make lint` and `make test`).

Every import statement counts: at module level, inside functions and under ``if TYPE_CHECKING``. Layers, top
down: ``cli`` and ``testing`` (the pytest plugin); ``node`` and ``ops`` (neither imports the other); ``client``;
``core``; ``store``; the base modules at the package's top (constants, errors, options, events, ...). A module
imports its own layer or lower ones, and no import cycle exists anywhere (within a layer neither).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "taskscheduler"
#: Rank of each layer: a module may import modules of its rank or lower (equal ranks of two different layers
#: may not import each other).
RANKS = {"base": 0, "store": 1, "core": 2, "client": 3, "node": 4, "ops": 4, "cli": 5, "testing": 5}
#: The facade (``from taskscheduler import ...``) and ``python -m taskscheduler`` stand above every layer.
FACADE = {"taskscheduler", "taskscheduler.__main__"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["taskscheduler", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The package's modules that ``name`` imports (the nearest module of each imported name)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            targets = [f"{module}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("taskscheduler"):
                yield target


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in RANKS else "base"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports(name, path, known)) for name, path in known.items()}


def test_every_module_imports_its_own_layer_or_lower_ones() -> None:
    upward = [
        f"{a} ({layer(a)}) imports {b} ({layer(b)})"
        for a, targets in graph().items()
        if a not in FACADE
        for b in targets
        if layer(a) != layer(b) and RANKS[layer(b)] >= RANKS[layer(a)]
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in edges:
        if name not in index:
            visit(name)
    assert cycles == []


def test_only_the_store_imports_pymongo() -> None:
    """Only the storage package talks to MongoDB: elsewhere pymongo appears for types alone (a ``Database``
    parameter) or the errors a caller may meet, never a client, collection or write helper."""
    allowed = {"pymongo.database", "pymongo.errors", "pymongo.asynchronous.database"}
    found = []
    for name, path in modules().items():
        if layer(name) == "store":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pymongo":
                if node.module not in allowed:
                    found.append(f"{name}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                found += [f"{name}: import {a.name}" for a in node.names if a.name.split(".")[0] == "pymongo"]
    assert found == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The check itself: a store module importing the core is seen (so an empty list above means something)."""
    store = tmp_path / "taskscheduler" / "store"
    store.mkdir(parents=True)
    (tmp_path / "taskscheduler" / "core").mkdir()
    (tmp_path / "taskscheduler" / "__init__.py").write_text("")
    (store / "__init__.py").write_text("")
    (tmp_path / "taskscheduler" / "core" / "__init__.py").write_text("")
    (tmp_path / "taskscheduler" / "core" / "lifecycle.py").write_text("")
    bad = store / "mongo.py"
    bad.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..core.lifecycle import X\n")
    known = {
        "taskscheduler.store.mongo": bad,
        "taskscheduler.core.lifecycle": tmp_path / "taskscheduler" / "core" / "lifecycle.py",
    }
    assert list(imports("taskscheduler.store.mongo", bad, known)) == ["taskscheduler.core.lifecycle"]
    assert RANKS[layer("taskscheduler.core.lifecycle")] > RANKS[layer("taskscheduler.store.mongo")]
