"""A network namespace made on the host for one sandbox, held by a tiny process, for a runtime that joins one
by path (gVisor's runsc with ``--network=host``: its sentry's sockets are host sockets of that namespace).

``NetnsHolder.start()`` forks ``unshare --net cat``: unshare enters a new, empty network namespace and
execs cat, which only waits for EOF on its stdin. So the namespace lives while the holder does, and the
holder ends when ``close()`` closes that pipe or kills it, or when its owner dies (the pipe closes with
it): nothing is bind-mounted, nothing persists. The holder is our child and is not reaped before
``close()``, so its pid (``/proc/<pid>/ns/net``) cannot be reused meanwhile.

``start()`` returns only once the holder's namespace is a new one: never this process's own, which is
what a runtime given ``--network=host`` would otherwise use (the host's network).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Optional

from .netns import NetnsError

READY_TIMEOUT = 10.0


class NetnsHolder:
    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise NetnsError("the namespace holder is not running")
        return self._proc.pid

    @property
    def path(self) -> str:
        """``/proc/<pid>/ns/net``: what an OCI spec's network namespace entry names."""
        return f"/proc/{self.pid}/ns/net"

    def start(self) -> "NetnsHolder":
        unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
        if unshare is None:
            raise NetnsError("`unshare` is not installed (Debian package util-linux)")
        # unshare execs cat (no --fork): the Popen pid is the holder itself, inside the new namespace.
        self._proc = subprocess.Popen([unshare, "--net", "cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, cwd="/", env={"PATH": "/usr/bin:/bin"},
                                      start_new_session=True)  # the owner's terminal signals are not for it
        mine = os.stat("/proc/self/ns/net")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                self.close()
                raise NetnsError("could not make a network namespace for the sandbox (unshare --net failed)")
            try:
                theirs = os.stat(self.path)
                if (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise NetnsError("the sandbox's network namespace holder did not start")
            time.sleep(0.001)  # between fork and unshare(2): a few hundred microseconds

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait()
