"""One server per SQLite database: a lock file held for the life of the process.

A PostgreSQL database is meant to be shared by several servers (replicas behind one Service): no lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

from ..._config import is_db_url
from .errors import DatabaseInUse


def lock_database(db: "str | os.PathLike[str]") -> Optional[int]:
    """Hold ``<db>.lock`` for the life of this process, so two servers never share one SQLite database
    (each would take the other's sandboxes for lost). Released by the kernel when we exit, even on kill -9.
    -> the lock's descriptor; None for a database URL (PostgreSQL), which servers may share."""
    if is_db_url(db):
        return None
    lock = Path(str(db) + ".lock")
    lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DatabaseInUse(f"another Sandlot server is using {db}") from None
    return fd
