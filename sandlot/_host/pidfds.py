"""Taking a descriptor out of another process: how a restarted server gets the channel a durable sandbox kept.

``pidfd_getfd`` (Linux 5.6) duplicates a descriptor of the process a pidfd names into ours; it needs the
right to ptrace that process, which the host's root has over every sandbox (their user namespaces are
children of ours) and code inside a sandbox has over none of them. Python has no wrapper: ctypes.
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat
import time
from typing import Optional

_SYS_PIDFD_GETFD = 438  # the same number on every architecture (the unified syscall table)
_libc = ctypes.CDLL(None, use_errno=True)


def getfd(pidfd: int, target: int) -> int:
    """A copy of descriptor ``target`` of the process ``pidfd`` names (close-on-exec). OSError otherwise."""
    fd = _libc.syscall(_SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(target), ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def take_socket(pidfd: int, target: int, within: float) -> Optional[socket.socket]:
    """The unix socket the process keeps at ``target`` for its next owner, once it offers one (it holds
    /dev/null there until its owner's end closes and it notices): None if it offers none ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            fd = getfd(pidfd, target)
        except ProcessLookupError:
            return None
        except OSError:
            fd = -1
        if fd >= 0:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                sock = socket.socket(fileno=fd)
                if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
                    return sock
                sock.close()
            else:
                os.close(fd)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)
