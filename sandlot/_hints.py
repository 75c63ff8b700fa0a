"""Which zygote a one-shot run forks from: a performance hint read from its code, never a security decision.

The builtin template's zygote has numpy, pandas, matplotlib, scipy and sklearn imported, so that code
using them starts in milliseconds; forking that 170 MB image costs a sandbox several times the CPU of
forking a bare interpreter. Code whose imports name none of those modules is given a *lean* sandbox (a
second zygote of the same template, same root, same isolation, nothing preloaded). A wrong guess costs
time only: a lean sandbox that imports pandas after all imports it then, as an exec'd sandbox would.
"""

from __future__ import annotations

import ast
from typing import Iterable

# Past this size the parse costs more than the lean fork saves: such code gets the preloaded zygote.
MAX_HINT_CHARS = 64 * 1024


def imported_modules(code: str) -> "set[str] | None":
    """The top-level names of the modules ``code`` imports, or None when that cannot be told from its text
    (not plain Python, e.g. a cell magic; too long; or a dynamic import)."""
    if len(code) > MAX_HINT_CHARS:
        return None
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # Code nested too deep for the parser (MemoryError: its stack) or for building the tree: unreadable
        # here; the session reports it as the code's own error.
        return None
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Call) and _names_dynamic_import(node.func):
            return None
    return names


def _names_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module", "exec", "eval")
    return isinstance(func, ast.Attribute) and func.attr in ("import_module", "__import__")


def wants_preload(code: str, preload: Iterable[str]) -> bool:
    """True unless ``code`` surely imports none of the ``preload`` modules (their top-level packages)."""
    names = imported_modules(code)
    if names is None:
        return True
    heavy = {name.partition(".")[0] for name in preload}
    return bool(names & heavy)
