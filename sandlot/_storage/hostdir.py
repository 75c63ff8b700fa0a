"""Opening a granted host directory: the path resolved once, checked, and held by descriptor.

The grant is checked on the resolved path, then opened without following anything and compared with what
was checked, so a symlink swapped in between is refused, never followed. From then on only the descriptor
is used: the mount is made from it, and nothing of the host side ever walks a path inside the grant again.

Resolving follows only root's symlinks (the host's own layout, /srv -> /data/srv). A symlink of anyone
else's is refused: it may have been planted by a sandbox with a writable grant (what a sandbox makes there
is the directory's owner's, never root's: a root-owned directory is never granted writable), turning the
path the owner grants next (./repo/build, say) into a way to their ~/.ssh or another project.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
from typing import Optional, Sequence

from .. import _config
from .._exceptions import InvalidRequest

# Never granted, nor anything inside them (the host's system and secrets).
SENSITIVE_TREES = ("/proc", "/sys", "/dev", "/etc", "/root", "/boot", "/run", "/var/run")


@dataclasses.dataclass
class HostDir:
    """A host directory held open (O_PATH): the mount is made from ``fd``, never from ``path`` again."""

    path: str
    fd: int
    uid: int
    gid: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def own_state() -> list:
    """Sandlot's own state on this host (volumes, checkpoints, databases): never granted, nor a parent of it."""
    return [os.path.realpath(p) for p in (_config.data_dir(), _config.state_dir())]


def code_run_as_root() -> list:
    """What this host runs with its own privileges: Sandlot's package (the agent every sandbox boots from
    included) and the interpreter's prefixes. Never granted writable, nor a parent of them: a sandbox that
    could edit them would run its code as the host's root at the next boot or import."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    places = {package, sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    return sorted({os.path.realpath(p) for p in places if p})


MAX_SYMLINKS = 40  # as the kernel's own lookup


def resolve(path: str) -> str:
    """``path`` made absolute and free of symlinks, following only symlinks owned by root; InvalidRequest
    for any other (see the module's docstring). A missing component ends the walk (checked later)."""
    parts = [p for p in path.split("/") if p]
    resolved, hops = "/", 0
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if name == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, name)
        try:
            st = os.lstat(candidate)
        except OSError:
            return os.path.join(candidate, *parts)
        if not stat.S_ISLNK(st.st_mode):
            resolved = candidate
            continue
        if st.st_uid != 0:
            raise InvalidRequest(f"host directory {path!r} passes through the symbolic link {candidate} of uid "
                                 f"{st.st_uid}: only root's symlinks are followed (a sandbox with a writable grant "
                                 "could have made it); give the real path")
        hops += 1
        if hops > MAX_SYMLINKS:
            raise InvalidRequest(f"host directory {path!r}: too many levels of symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = "/"
        parts = [p for p in target.split("/") if p] + parts
    return resolved


def check_allowed(path: str, roots: Optional[Sequence[str]], writable: bool = False) -> str:
    """The resolved path of a grant, or InvalidRequest saying why it cannot be granted. ``roots``: the
    operator's allowed roots (None: any directory that is not sensitive; empty: none at all)."""
    resolved = resolve(path)
    if resolved == "/" or any(_inside(resolved, tree) for tree in SENSITIVE_TREES):
        raise InvalidRequest(f"host directory {path!r} is a sensitive location ({resolved}): "
                             f"/, {', '.join(SENSITIVE_TREES)} and what is inside them are never granted")
    for state in own_state():
        if _inside(resolved, state) or _inside(state, resolved):
            raise InvalidRequest(f"host directory {path!r} holds Sandlot's own state ({state}); it is never granted")
    if writable:
        for code in code_run_as_root():
            if _inside(resolved, code) or _inside(code, resolved):
                raise InvalidRequest(f"host directory {path!r} holds code this host runs as root ({code}: Sandlot "
                                     "or its Python); it can be granted read-only, never writable")
    if roots is not None:
        if not roots:
            raise InvalidRequest("this server grants no host directories (the operator allows them with "
                                 "`sandlot serve --host-dir-root DIR`); volumes ('vol:NAME') are available")
        real_roots = [os.path.realpath(r) for r in roots]
        if not any(_inside(resolved, root) for root in real_roots):
            raise InvalidRequest(f"host directory {path!r} ({resolved}) is outside the directories the operator "
                                 f"allows: {', '.join(real_roots)}")
    if not os.path.lexists(resolved):
        raise InvalidRequest(f"host directory {path!r} does not exist")
    if not os.path.isdir(resolved):
        raise InvalidRequest(f"host path {path!r} is not a directory (only directories are granted)")
    return resolved


def open_host_dir(path: str, roots: Optional[Sequence[str]] = None, writable: bool = False) -> HostDir:
    """Check ``path`` (see check_allowed) and hold it open, refusing it if it changed in between."""
    resolved = check_allowed(path, roots, writable)
    try:
        fd = os.open(resolved, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidRequest(f"host directory {path!r} cannot be opened: {exc.strerror}") from None
    try:
        # Every component must still be what was checked: a symlink put in since then moves the descriptor.
        if os.readlink(f"/proc/self/fd/{fd}") != resolved:
            raise InvalidRequest(f"host directory {path!r} changed while it was being granted; try again")
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    return HostDir(resolved, fd, st.st_uid, st.st_gid)
