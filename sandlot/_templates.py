"""Templates: what a sandbox's root holds and how its interpreter starts.

Two kinds:

- the builtin ``python``: the interpreter Sandlot itself runs under, with its own prefixes (a venv
  and its base, even under /root or /home) bound read-only, plus the system's library dirs;
  ``preload`` lists the modules its zygote imports ahead of time (``zygote=False``: no zygote, each
  sandbox exec'd on its own);
- image templates (``sandlot template pull / load / build``, see ``_images`` and ``_sandboxfile``):
  an OCI image unpacked into a root filesystem under the data dir (``rootfs``), bound read-only as
  the sandbox's ``/``; ``python`` is then a path *inside* the image ("" when the image has none).
  Their records are JSON files under ``<data dir>/templates``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from . import _config
from ._exceptions import InvalidRequest

_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    python: str  # interpreter path: on the host and inside (builtin), inside the image (rootfs), "" = none
    prefixes: tuple[str, ...]  # host directories bound read-only at the same path
    preload: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    # Fork sandboxes from a zygote (the fast path), where the backend offers one. False: exec each one,
    # so it gets its own string-hash secret, address-space layout and stack canary (forks share them).
    zygote: bool = True
    # -- image templates -------------------------------------------------------------------
    rootfs: Optional[str] = None  # host path of the unpacked image, bound read-only as the sandbox's /
    workdir: Optional[str] = None  # cwd of the session and of commands (the image's WorkingDir)
    limits: tuple[tuple[str, Any], ...] = ()  # default limits (owners' limits override them)
    pool_size: Optional[int] = None  # warm pool size when the owner did not configure one
    digest: Optional[str] = None  # the image's manifest digest (or the build's id)
    network: Any = None  # the network policy (JSON) its sandboxes get when their owner gives none (sandbox.yaml)
    # Default mounts ((target, source) pairs, sandbox.yaml `mounts:`); an owner's mount of the same target wins.
    mounts: tuple[tuple[str, str], ...] = ()
    # -- build steps only (``sandlot template build``; never set in a template record) -------
    writable: bool = False  # the root (a private copy of the base) is bound read-write
    egress: str = ""  # the apt step: path inside of the socket of the host's allowlisting proxy (no other way out)
    uid_base: Optional[int] = None  # root host: map 0..65535 onto the host uids the copy was shifted to
    binds: tuple[tuple[str, str], ...] = ()  # extra host paths bound read-only (build context, wheels)
    # "lean": the same template with nothing preloaded (its own zygote and pool; see _hints). "" otherwise.
    variant: str = ""

    @property
    def has_python(self) -> bool:
        return bool(self.python)

    def default_limits(self) -> dict[str, Any]:
        return dict(self.limits)

    def lean(self) -> "Template":
        """This template with nothing preloaded: same root, env and isolation, a cheaper fork."""
        return dataclasses.replace(self, preload=(), variant="lean")

    @property
    def key(self) -> str:
        """What a zygote or a warm pool of this template is filed under (the name, and the variant if any)."""
        return f"{self.name}/{self.variant}" if self.variant else self.name


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


@functools.lru_cache(maxsize=None)
def python_template() -> Template:
    """The builtin template (made once: its interpreter and prefixes are this process's own)."""
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
_TRANSIENT: dict[str, Template] = {}  # build steps' templates, alive only while a build runs


def data_root() -> Path:
    """Sandlot's durable state (see _config.data_dir)."""
    return _config.data_dir()


def records_dir() -> Path:
    return data_root() / "templates"


def read_record(name: str) -> Optional[dict]:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return None
    try:
        with open(records_dir() / f"{name}.json") as f:
            record = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"template {name!r}: its record is unreadable ({exc}); `sandlot template rm {name}`") from None
    return record if isinstance(record, dict) else None


def from_record(record: dict) -> Template:
    return Template(
        name=record["name"],
        python=record.get("python") or "",
        prefixes=(),
        preload=tuple(record.get("preload") or ()),
        zygote=record.get("zygote", True) is not False,
        env=tuple(sorted((str(k), str(v)) for k, v in (record.get("env") or {}).items())),
        rootfs=record["rootfs"],
        workdir=record.get("workdir") or None,
        limits=tuple(sorted((record.get("limits") or {}).items())),
        pool_size=record.get("pool_size"),
        digest=record.get("digest"),
        network=record.get("network"),
        mounts=tuple(sorted((record.get("mounts") or {}).items())),
    )


def register_transient(template: Template) -> None:
    _TRANSIENT[template.name] = template


def unregister_transient(name: str) -> None:
    _TRANSIENT.pop(name, None)


def get_template(name: str) -> Template:
    if isinstance(name, str):
        if name in _BUILTIN:
            return _BUILTIN[name]()
        if name in _TRANSIENT:
            return _TRANSIENT[name]
        record = read_record(name)
        if record is not None:
            if not Path(record.get("rootfs") or "/nonexistent").is_dir():
                raise InvalidRequest(f"template {name!r}: its root filesystem is missing; pull or build it again")
            return from_record(record)
    raise InvalidRequest(f"unknown template {name!r}; available: {template_names()}")


def template_names() -> list[str]:
    names = set(_BUILTIN)
    try:
        names.update(p.stem for p in records_dir().glob("*.json") if NAME_RE.fullmatch(p.stem))
    except OSError:
        pass
    return sorted(names)
