"""Host mount points that belong to one live process, and the sweep that removes a dead one's.

Each mount point ``X`` has a lock file ``X.lock`` held (flock) by the process that mounted there. A sweep
takes the lock of each: it only succeeds when that process is gone, and then the mount is detached and
the directory removed. Never a recursive delete: a mount point holds someone's files (a volume, a granted
host directory), so only an empty directory is ever removed.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

from .._agent import linux


class MountPoint:
    """An empty directory for one mount, held by this process until ``release()``."""

    def __init__(self, base: Path, prefix: str) -> None:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = base / f"{prefix}.{secrets.token_hex(6)}"
        self._lock = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.path.mkdir(mode=0o700)

    def release(self) -> None:
        """Detach whatever is mounted here (a sandbox's own copy keeps its files alive) and remove it."""
        if self._lock < 0:
            return
        _remove(self.path)
        os.close(self._lock)
        self._lock = -1


def _remove(path: Path) -> None:
    try:
        linux.umount2(str(path), linux.MNT_DETACH)
    except OSError:
        pass  # not mounted (never was, or already detached)
    try:
        os.rmdir(path)
    except OSError:
        return  # still mounted or not empty: left alone, never deleted into
    try:
        os.unlink(str(path) + ".lock")
    except OSError:
        pass


def sweep(base: Path) -> int:
    """Remove the mount points under ``base`` whose process has died. Returns how many."""
    if not base.is_dir():
        return 0
    removed = 0
    for lock in base.glob("*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its process is alive
        try:
            _remove(Path(str(lock)[:-len(".lock")]))
            removed += 1
        finally:
            os.close(fd)
    return removed
