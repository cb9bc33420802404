"""The product's import graph keeps its layers: the core imports no component and no application,
components do not import each other, and no two modules import each other, directly or round a
longer loop.

Every module is read with ``ast``, so imports inside functions and under ``TYPE_CHECKING`` count
as much as those at the top: a lazy import is still a dependency, it only fails later.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Folder of each package of the product, as pyproject's ``package-dir`` installs them.
PACKAGE_DIRS: dict[str, Path] = {
    "edgewire": ROOT / "edgewire",
    "edgewire.edge": ROOT / "edge",
    "edgewire.cloud_bridge": ROOT / "cloud_bridge",
    "edgewire.broker": ROOT / "broker",
}
#: The components: each runs on its own (device, cloud, broker) and meets the others only
#: through the core's contract (topics, envelopes, session).
COMPONENTS = ("edgewire.edge", "edgewire.cloud_bridge", "edgewire.broker")
#: The applications built on top of everything else: the command line, the demo, the fleet tools.
APPLICATIONS = ("edgewire.cli", "edgewire.demo", "edgewire.fleet")

Graph = Mapping[str, set[str]]


# ---- reading the product ------------------------------------------------------------------


def product_modules(package_dirs: Mapping[str, Path] = PACKAGE_DIRS) -> dict[str, Path]:
    """Every module of the product by its installed (dotted) name."""
    modules: dict[str, Path] = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The most specific known module that ``name`` names or lies in (None: not the product's)."""
    known = set(modules)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imports_of(module: str, source: str, modules: Iterable[str], *, is_package: bool) -> set[str]:
    """The product modules that ``module`` imports anywhere in its source (functions and
    ``TYPE_CHECKING`` blocks included); ``from p import m`` counts as importing module ``p.m``."""
    known = set(modules)
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, known)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def product_graph() -> dict[str, set[str]]:
    modules = product_modules()
    return {
        name: imports_of(name, path.read_text(), modules, is_package=path.name == "__init__.py")
        for name, path in modules.items()
    }


# ---- the rules -----------------------------------------------------------------------------


def _layer(module: str) -> tuple[str, str]:
    for kind, roots in (("component", COMPONENTS), ("application", APPLICATIONS)):
        for root in roots:
            if module == root or module.startswith(root + "."):
                return kind, root
    return "core", "edgewire"


def layer_violations(graph: Graph) -> list[str]:
    """Imports that go the wrong way between the core, the components and the applications."""
    problems = []
    for module, targets in sorted(graph.items()):
        kind, root = _layer(module)
        for target in sorted(targets):
            target_kind, target_root = _layer(target)
            if kind == "core" and target_kind != "core":
                problems.append(f"core module {module} imports {target_kind} module {target}")
            elif kind == "component" and target_kind == "component" and target_root != root:
                problems.append(f"component module {module} imports another component's module {target}")
            elif kind == "component" and target_kind == "application":
                problems.append(f"component module {module} imports application module {target}")
    return problems


def cycle_groups(graph: Graph) -> list[set[str]]:
    """Every strongly connected group of two or more modules (Tarjan's algorithm): each module of
    a group reaches every other and is reached back, so together they form import loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(start: str) -> None:
        # Iterative, so a long chain of imports cannot hit Python's recursion limit.
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups, key=sorted)


def import_cycles(graph: Graph) -> list[list[str]]:
    """One concrete loop (``a -> b -> a``) for each cycle group."""
    return [_loop_through(group, graph) for group in cycle_groups(graph)]


def _loop_through(group: set[str], graph: Graph) -> list[str]:
    """One import loop inside ``group``, from its first module back to it."""
    start = min(group)
    path, seen = [start], {start}
    while True:
        nexts = sorted(t for t in graph.get(path[-1], ()) if t in group)
        if start in nexts and len(path) > 1:
            return [*path, start]
        step = next((t for t in nexts if t not in seen), None)
        if step is None:  # every way on is visited: close the loop at the first module seen again
            back = nexts[0]
            return [*path[path.index(back) :], back]
        path.append(step)
        seen.add(step)


def cycle_violations(graph: Graph) -> list[str]:
    """A line per cycle group, naming one of its loops."""
    return ["import cycle: " + " -> ".join(_loop_through(group, graph)) for group in cycle_groups(graph)]


# ---- the product -----------------------------------------------------------------------------


def test_the_product_is_read_whole() -> None:
    graph = product_graph()
    # Modules of each layer are found under their installed names, with their imports.
    assert {"edgewire.topics", "edgewire.delivery", "edgewire.edge.agent", "edgewire.cloud_bridge.bridge"} <= set(graph)
    assert {"edgewire.broker.embedded", "edgewire.cli.app", "edgewire.demo.run", "edgewire.fleet.rollout"} <= set(graph)
    assert "edgewire.edge" in graph and "edgewire.cli" in graph
    # A lazy import inside a function is an edge like any other.
    assert "edgewire.edge.agent" in graph["edgewire.cli.device"]
    assert "edgewire.envelopes" in graph["edgewire.delivery"]


def test_layers_are_kept() -> None:
    problems = layer_violations(product_graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycles() -> None:
    problems = cycle_violations(product_graph())
    assert not problems, "\n".join(problems)


# ---- the check itself, on made-up graphs ------------------------------------------------------


def test_layer_rules_catch_every_wrong_direction() -> None:
    graph = {
        "edgewire.topics": {"edgewire.envelopes"},
        "edgewire.envelopes": set(),
        "edgewire.delivery": {"edgewire.edge.model_store"},  # core -> component
        "edgewire.session": {"edgewire.cli.common"},  # core -> application
        "edgewire.edge.agent": {"edgewire.cloud_bridge.bridge", "edgewire.topics", "edgewire.edge.judge"},
        "edgewire.broker.embedded": {"edgewire.fleet.push"},  # component -> application
        "edgewire.cli.app": {"edgewire.edge.agent", "edgewire.cloud_bridge.cloud", "edgewire.demo.run"},
    }
    assert layer_violations(graph) == [
        "component module edgewire.broker.embedded imports application module edgewire.fleet.push",
        "core module edgewire.delivery imports component module edgewire.edge.model_store",
        "component module edgewire.edge.agent imports another component's module edgewire.cloud_bridge.bridge",
        "core module edgewire.session imports application module edgewire.cli.common",
    ]


def test_cycles_are_found_and_named() -> None:
    graph = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"},
        "e": {"d"},  # d <-> e
        "f": {"a", "f"},  # reaches a cycle but is in none; a self-import is not a cycle
    }
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert cycle_violations(graph) == ["import cycle: a -> b -> c -> a", "import cycle: d -> e -> d"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_are_read_from_functions_type_checking_and_relative_forms(tmp_path: Path) -> None:
    modules = ["edgewire", "edgewire.topics", "edgewire.envelopes", "edgewire.edge", "edgewire.edge.agent"]
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
import json
from . import topics
if TYPE_CHECKING:
    from edgewire.edge.agent import EdgeAgent

def later():
    import edgewire.envelopes as env
    return env
"""
    found = imports_of("edgewire.delivery", source, modules, is_package=False)
    assert found == {"edgewire.topics", "edgewire.edge.agent", "edgewire.envelopes"}
    found = imports_of("edgewire.edge", "from .agent import EdgeAgent\n", modules, is_package=True)
    assert found == {"edgewire.edge.agent"}


@pytest.mark.parametrize("name", ["edgewire.edge.agent", "edgewire.cli.device", "edgewire.delivery"])
def test_modules_map_to_their_files(name: str) -> None:
    modules = product_modules()
    expected = {
        "edgewire.edge.agent": ROOT / "edge" / "agent.py",
        "edgewire.cli.device": ROOT / "edgewire" / "cli" / "device.py",
        "edgewire.delivery": ROOT / "edgewire" / "delivery.py",
    }
    assert modules[name] == expected[name]
