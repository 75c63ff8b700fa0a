"""Detached, id-mapped mounts of a granted directory, made on the host and attached inside a sandbox.

A sandbox's user is a high uid on the host (its own range per sandbox), so a plain bind would show the
granted files as owned by nobody and write new ones as that stray uid. An id-mapped mount (Linux >= 5.12,
ext4, xfs, btrfs, tmpfs >= 6.3 ...) maps exactly one owner: the directory's owner on disk is the sandbox's
user through this mount, and what the sandbox creates is written as that owner. Every other owner shows as
nobody and keeps only its "other" permission bits. The copy is not recursive: mounts below the directory
are not part of the grant.

Made with the new mount API from a descriptor (open_tree(OPEN_TREE_CLONE)): the copy is detached, so it
appears nowhere on the host, and it ends with the last sandbox holding it.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Optional

from .._agent import linux
from .._exceptions import HostUnsupported
from .tools import tool


def _userns_with(uid_from: Optional[int], uid_to: int, gid_from: Optional[int], gid_to: int) -> int:
    """A descriptor of a new user namespace mapping one uid and one gid (a mount's id mapping needs one).

    A short-lived `unshare` child makes it (a fork of this threaded process would be unsafe); we write
    its maps, keep the namespace by descriptor, and let the child go.
    """
    child = subprocess.Popen([tool("unshare"), "--user", "--", tool("cat")], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ours = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        while True:
            try:
                if os.readlink(f"/proc/{child.pid}/ns/user") != ours:
                    break
            except FileNotFoundError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                raise HostUnsupported("cannot make a user namespace for an id-mapped mount (`unshare --user`)")
            time.sleep(0.0005)
        # Host root stays root through the mount (gVisor's gofer creates files as root, then gives them to
        # the user; no sandbox process is host root, so this grants nothing to the code).
        for name, inside, outside in (("uid_map", uid_from, uid_to), ("gid_map", gid_from, gid_to)):
            if inside is None:  # no owner to stand for (root's directory, or group): root's ids stay root's only
                lines = "0 0 1\n"
            else:
                lines = f"{inside} {outside} 1\n" + ("0 0 1\n" if inside != 0 and outside != 0 else "")
            with open(f"/proc/{child.pid}/{name}", "w") as f:
                f.write(lines)
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.stdin.close()
        child.wait()


def detached_copy(fd: int, *, readonly: bool, owner: Optional[tuple], user: int, unmapped_ok: bool = True) -> int:
    """A detached copy of the mount at ``fd`` (an O_PATH descriptor of a directory), nosuid and nodev,
    read-only if asked, with ``owner`` (uid, gid on disk) shown as, and written as, host uid and gid ``user``
    (None for either: nobody's ids are the user's, root's stay root's). Without id-mapped mounts on this
    kernel or filesystem a read-only grant goes unmapped (its files show as nobody's) and a writable one is
    refused: HostUnsupported. ``unmapped_ok=False`` refuses the read-only one too: for a sandbox whose user
    is a real host uid (gVisor's 1000), to which an unmapped copy would give that uid's files."""
    if os.geteuid() != 0:
        raise HostUnsupported("host directories and volumes need Sandlot to run as root (id-mapped mounts)")
    tree = linux.open_tree(fd, "", linux.OPEN_TREE_CLONE | linux.OPEN_TREE_CLOEXEC | linux.AT_EMPTY_PATH)
    try:
        flags = linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV | (linux.MOUNT_ATTR_RDONLY if readonly else 0)
        if owner is not None:
            userns = _userns_with(owner[0], user, owner[1], user)
            try:
                linux.mount_setattr(tree, flags | linux.MOUNT_ATTR_IDMAP, userns)
                return tree
            except OSError as exc:
                if not readonly:
                    raise HostUnsupported(
                        f"this kernel or filesystem has no id-mapped mounts ({exc.strerror}): a writable host "
                        "directory would get files owned by a stray uid, so it is refused (read-only works)") from None
                if not unmapped_ok:
                    raise HostUnsupported(
                        f"this kernel or filesystem has no id-mapped mounts ({exc.strerror}): on the gVisor tier the "
                        f"sandbox's user is host uid {user}, so an unmapped grant would give it that uid's files; it "
                        "is refused (the process tier grants it read-only, its files showing as nobody's)") from None
            finally:
                os.close(userns)
        linux.mount_setattr(tree, flags)
        return tree
    except BaseException:
        os.close(tree)
        raise
