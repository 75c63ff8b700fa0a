"""Imports go one way (../shared/DESIGN.md "Layers"): no import circles in ``sandlot/``.

The graph counts every import in a module, a deferred one inside a function too: an import moved into a
function to dodge a circle still ties the two modules together. Built from the source with ``ast`` (no
dependency); a circle between two modules means one of them is in the wrong place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sandlot

PACKAGE = Path(sandlot.__file__).resolve().parent

# Circles that exist today and that later moves of issue #14 remove. This list may only shrink: a new
# circle fails the test, and so does one removed without being struck off here.
KNOWN_CIRCLES: set[frozenset[str]] = set()  # issue #14 removed the last four
# Backends are below the engine and its clients: they never import them (DESIGN.md "Layers").
ABOVE_BACKENDS = ("sandlot._sandbox", "sandlot._sync", "sandlot._http", "sandlot._local", "sandlot._engine",
                  "sandlot._pool", "sandlot._transport", "sandlot.server",
                  "sandlot.cli", "sandlot.mcp_server", "sandlot.mcp_hosted")


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the sandlot modules it imports (``from .x import y`` counts x, and x.y when y is a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # ``from . import _config`` imports the module _config; ``from . import __version__`` the
                # package itself (a name defined in it).
                submodules = [f"{origin}.{alias.name}" for alias in node.names if f"{origin}.{alias.name}" in modules]
                names = len(submodules) < len(node.names)
                targets = ([origin] if names else []) + submodules
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
    assert circles({"a": {"b"}, "b": set()}) == set()


def test_no_new_import_circles_in_sandlot():
    found = circles(import_graph())
    assert found - KNOWN_CIRCLES == set(), "new import circle(s)"
    assert KNOWN_CIRCLES - found == set(), "a known circle is gone: strike it off KNOWN_CIRCLES"


def test_backends_have_no_circles_and_never_import_the_layers_above():
    graph = import_graph()
    backends = {name for name in graph if name.startswith("sandlot._backends")}
    assert not any(circle & backends for circle in circles(graph))
    for name in backends:
        above = {t for t in graph[name] if t.startswith(ABOVE_BACKENDS)}
        assert not above, f"{name} imports {sorted(above)}"
    # The interface knows no tier; the tiers know each other only through the shared module.
    assert not graph["sandlot._backends.base"] & {"sandlot._backends.process", "sandlot._backends.gvisor",
                                                  "sandlot._backends.registry"}
    assert "sandlot._backends.process" not in graph["sandlot._backends.gvisor"]
    assert "sandlot._backends.gvisor" not in graph["sandlot._backends.process"]
