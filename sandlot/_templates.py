"""Templates: what a sandbox's root holds and how its interpreter starts.

For now there is one, ``python``: the interpreter Sandlot itself runs under, with its own prefixes
(a venv and its base, even under /root or /home) bound read-only, plus the system's library dirs.
``preload`` is where the fast path will list modules its zygote imports ahead of time.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from ._exceptions import InvalidRequest

_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    python: str  # interpreter path, valid both on the host and inside the sandbox
    prefixes: tuple[str, ...]  # host directories bound read-only at the same path
    preload: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


def _interpreter_prefixes() -> tuple[str, ...]:
    found: list[str] = []
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        real = os.path.realpath(p)
        for candidate in {p, real}:
            if any(candidate == d or candidate.startswith(d + "/") for d in _SYSTEM_DIRS):
                continue  # already visible through the system dirs
            if candidate not in found and os.path.isdir(candidate):
                found.append(candidate)
    return tuple(found)


def python_template() -> Template:
    return Template(
        name="python",
        python=sys.executable,
        prefixes=_interpreter_prefixes(),
        preload=("numpy", "pandas", "matplotlib", "scipy", "sklearn"),
        # BLAS thread pools started in the zygote would not survive the fork, and each sandbox gets
        # one core by default: one BLAS thread. Set these in env= for more (before the first import).
        env=(("OPENBLAS_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1")),
    )


_BUILTIN = {"python": python_template}


def get_template(name: str) -> Template:
    if not isinstance(name, str) or name not in _BUILTIN:
        raise InvalidRequest(f"unknown template {name!r}; available: {sorted(_BUILTIN)}")
    return _BUILTIN[name]()
