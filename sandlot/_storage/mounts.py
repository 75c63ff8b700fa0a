"""Mount requests: ``{"/data": "/srv/datasets", "/work": "/home/me/project:rw", "/cache": "vol:pipcache"}``.

Pure validation (no host access): a request names a target inside the sandbox and a source, a host
directory (absolute path, read-only unless ``:rw``) or a named volume (``vol:NAME``, writable unless
``:ro``). Whether the source exists, is allowed and can be mounted is for the host side (hostdir, volumes).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

from .._exceptions import InvalidRequest

MAX_MOUNTS = 16
MAX_PATH = 1024
VOLUME_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Targets the sandbox needs for itself: a mount there would hide the system, the agent or its storage.
_RESERVED_TREES = ("/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
                   "/libx32", "/opt/sandlot", "/.sandlot-scratch", "/.sandlot-zygote", "/run")
_RESERVED_EXACT = ("/", "/home", "/home/user", "/tmp", "/opt", "/root")


def check_volume_name(name: Any) -> str:
    if not isinstance(name, str) or not VOLUME_NAME.fullmatch(name):
        raise InvalidRequest(f"volume name {str(name)[:80]!r}: 1-63 characters of a-z, 0-9, '.', '_' and '-', "
                             "starting with a letter or digit")
    return name


@dataclasses.dataclass(frozen=True)
class Mount:
    """One grant: ``source`` is a host directory's absolute path (kind "dir") or a volume's name (kind "volume")."""

    target: str
    kind: str
    source: str
    readonly: bool

    def to_string(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"vol:{self.source}:{mode}" if self.kind == "volume" else f"{self.source}:{mode}"


def _check_target(target: Any) -> str:
    if not isinstance(target, str) or not target or "\0" in target or len(target) > MAX_PATH:
        raise InvalidRequest(f"mount target {str(target)[:80]!r}: an absolute path inside the sandbox")
    if not target.startswith("/") or os.path.normpath(target) != target or target.startswith("//"):
        raise InvalidRequest(f"mount target {target[:80]!r}: an absolute, normalised path (no '..', '.', "
                             "'//' or trailing '/')")
    if ":" in target:
        raise InvalidRequest(f"mount target {target[:80]!r}: ':' is not allowed in a target")
    if target in _RESERVED_EXACT or any(target == tree or target.startswith(tree + "/") for tree in _RESERVED_TREES):
        raise InvalidRequest(f"mount target {target!r} is reserved (the sandbox's system, agent or own storage); "
                             "mount at a new path such as /data, /work or /home/user/project")
    return target


def parse_source(target: str, value: Any) -> Mount:
    """``"/srv/data"``, ``"/srv/data:ro"``, ``"/home/me/project:rw"``, ``"vol:NAME"``, ``"vol:NAME:ro"``."""
    if not isinstance(value, str) or not value or "\0" in value or len(value) > MAX_PATH:
        raise InvalidRequest(f"mount {target!r}: the source is a host directory's absolute path or 'vol:NAME', "
                             "optionally ending ':ro' or ':rw'")
    mode: Optional[str] = None
    if value.endswith((":ro", ":rw")):
        value, mode = value[:-3], value[-2:]
    if value.startswith("vol:"):
        name = check_volume_name(value[4:])
        return Mount(target, "volume", name, readonly=mode == "ro")
    if not value.startswith("/"):
        raise InvalidRequest(f"mount {target!r}: host directory {value[:80]!r} must be an absolute path "
                             "(the CLI resolves ./relative ones; a volume is 'vol:NAME')")
    path = os.path.normpath(value)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return Mount(target, "dir", path, readonly=mode != "rw")


def parse_mounts(value: Any) -> tuple:
    """Validate a whole ``mounts=`` mapping; returns Mounts sorted by target. Targets may not nest
    (a mount inside another grant would need a directory made in the host's or the volume's files)."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise InvalidRequest("mounts must map a path inside the sandbox to a host directory or 'vol:NAME', "
                             "e.g. {'/data': '/srv/datasets', '/cache': 'vol:pipcache'}")
    if len(value) > MAX_MOUNTS:
        raise InvalidRequest(f"at most {MAX_MOUNTS} mounts per sandbox")
    mounts = sorted((parse_source(_check_target(t), s) for t, s in value.items()), key=lambda m: m.target)
    for outer in mounts:  # every pair ('/a-b' sorts between '/a' and '/a/c')
        for inner in mounts:
            if inner.target.startswith(outer.target + "/"):
                raise InvalidRequest(f"mount targets may not nest: {inner.target!r} is inside {outer.target!r}")
    volumes = [m.source for m in mounts if m.kind == "volume"]
    if len(set(volumes)) != len(volumes):
        raise InvalidRequest("a volume can be mounted once per sandbox")
    return tuple(mounts)


def mounts_to_json(mounts: tuple) -> dict:
    return {m.target: m.to_string() for m in mounts}
