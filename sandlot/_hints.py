"""Which zygote a one-shot run forks from: a performance hint read from its code, never a security decision.

The builtin template's zygote has numpy, pandas, matplotlib, scipy and sklearn imported, so that code
using them starts in milliseconds; forking that 170 MB image costs a sandbox several times the CPU of
forking a bare interpreter. Code whose text names none of those modules is given a *lean* sandbox (a
second zygote of the same template, same root, same isolation, nothing preloaded). A wrong guess costs
time only: a lean sandbox that imports pandas after all imports it then, as an exec'd sandbox would.

The code's text is searched, never parsed: a parse runs on the server's event loop with the GIL held and a
tenant chooses its input (64 KiB of nested code took 54-216 ms to parse; a substring search takes microseconds).
A module named anywhere (a comment, a string) picks the preloaded zygote, which is only ever slower.
"""

from __future__ import annotations

import re
from typing import Iterable

# Imports the text cannot show (a computed module name), and notebook lines (``%matplotlib``, ``!pip``).
_DYNAMIC = ("__import__", "import_module", "exec", "eval")
_NOTEBOOK_LINE = re.compile(r"^[ \t]*[%!]", re.MULTILINE)


def wants_preload(code: str, preload: Iterable[str]) -> bool:
    """True unless ``code`` surely imports none of the ``preload`` modules (their top-level packages)."""
    heavy = {name.partition(".")[0] for name in preload}
    if any(name in code for name in heavy) or any(marker in code for marker in _DYNAMIC):
        return True
    return _NOTEBOOK_LINE.search(code) is not None
