"""The keeper: one small host process per gVisor sandbox that holds it, so the sandbox outlives its owner.

runsc's container speaks to its agent on stdin/stdout (host pipes: what lets ``runsc checkpoint``/``restore``
pause a session to disk). Whoever holds those pipes holds the sandbox: when the holder dies the agent reads
EOF and exits. So the owner (a server, the local SDK) does not hold them; the keeper does, and relays frames
between them and one owner at a time, connected on a unix socket in the sandbox's home (``keeper.sock``, in
a root-only directory). A server that restarts connects again and carries on (``GVisorBackend.adopt``).

The relay itself (whole frames only, one owner at a time and takeover, leases) is sandlot/_agent/owner_relay.py,
shared with a pod's holder. Here: owners connect on a root-only unix socket, ``end`` SIGKILLs every process in the
sandbox's cgroup(s), as the owner's kill() does, and the lease is kept in the home (``lease.json``: the keeper
that restores a paused sandbox starts with it).
When runsc ends, the keeper does what the owner cannot do from outside any more: unmount the sandbox's
  tmpfs (unless ``image/`` exists: a pause, whose checkpoint keeps the files), and, when no owner is there
  to clean up, delete runsc's state, the cgroup(s) and the home. Then it exits with runsc's status.

Run as ``python -I -S keeper.py CONFIG_JSON`` (by path: stdlib only, no import of sandlot, a few MiB).
CONFIG_JSON: {"home": dir, "cgroups": [dirs], "run": runsc argv, "delete": runsc argv}. It prints
``ready`` on stdout once its socket listens, then starts runsc when the first owner connects.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

if __package__:
    from .._agent.owner_relay import OwnerRelay
else:  # run by path: the agent's relay and protocol modules (stdlib only) from the package's tree, nothing else
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_agent"))
    from owner_relay import OwnerRelay  # type: ignore[no-redef]

SOCKET = "keeper.sock"
LEASE = "lease.json"  # the last lease an owner gave: a keeper restoring a paused sandbox starts with it
FIRST_OWNER_WITHIN = 60.0  # the owner that started the keeper connects at once; nobody in a minute: give up
MNT_DETACH = 2


def short_address(home_fd: int) -> str:
    """The socket's address through a descriptor of its directory: a unix socket's path may not pass 107
    bytes, and a home under a deep data dir would (the kernel resolves the /proc link, the length is this)."""
    return "/proc/self/fd/%d/%s" % (home_fd, SOCKET)


class Keeper(OwnerRelay):
    def __init__(self, config: dict) -> None:
        self.home = config["home"]
        super().__init__(self._recorded_lease())
        self.cgroups = list(config["cgroups"])
        self.run_argv = list(config["run"])
        self.delete_argv = list(config["delete"])
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = None  # runsc (through the cgroup trampoline)

    # -- setup --------------------------------------------------------------------------------------
    def listen(self) -> None:
        path = os.path.join(self.home, SOCKET)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # the socket is the owner's (root's) alone, from its first moment
        home = os.open(self.home, os.O_PATH | os.O_DIRECTORY)
        try:
            self.listener.bind(short_address(home))
        finally:
            os.umask(old)
            os.close(home)
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)

    def start_runsc(self) -> None:
        procs = [os.path.join(d, "cgroup.procs") for d in self.cgroups]
        # The trampoline joins the sandbox's cgroup(s) first, then becomes runsc: runsc, the sentry and the
        # gofer are all counted and limited there. The keeper itself stays outside (it outlives a kill).
        trampoline = 'for f in "$@"; do printf %s $$ > "$f" || exit 97; done; exec ' + shlex.join(self.run_argv)
        self.proc = subprocess.Popen(["/bin/sh", "-c", trampoline, "sh", *procs], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd="/", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        self.attach_agent(self.proc.stdin.fileno(), self.proc.stdout.fileno())
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.sel.register(self.pidfd, selectors.EVENT_READ, self._on_runsc_exit)

    # -- the loop -----------------------------------------------------------------------------------
    def serve(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.end("SIGTERM"))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.listen()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 1)  # the owner's readiness pipe: not held open past this point
        os.close(devnull)
        deadline = time.monotonic() + FIRST_OWNER_WITHIN
        while self.owners == 0:
            left = deadline - time.monotonic()
            if left <= 0:
                self._remove_socket()
                return 1
            for key, mask in self.sel.select(left):
                key.data(key, mask)
        self.start_runsc()
        while True:
            for key, mask in self.sel.select(self._timeout()):
                key.data(key, mask)
                if self.proc.returncode is not None:
                    return self.finish()
            if self.lease_over():
                self.end("its lease ended with no owner")

    # -- the owner's side -----------------------------------------------------------------------------
    def _on_accept(self, key, mask) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():  # the directory is root-only already; this says it twice
            conn.close()
            return
        self.take_owner(conn)

    def _recorded_lease(self):
        try:
            with open(os.path.join(self.home, LEASE)) as f:
                until = json.load(f).get("until")
        except (OSError, ValueError, AttributeError):
            return None
        return float(until) if isinstance(until, (int, float)) and not isinstance(until, bool) else None

    def on_lease(self, until) -> None:
        self._record_lease()

    def _record_lease(self) -> None:
        """Kept in the home beside a checkpoint, so the sandbox's lease outlives a pause (a new keeper
        restores it); written whole (renamed into place)."""
        path = os.path.join(self.home, LEASE)
        try:
            with open(path + ".tmp", "w") as f:
                json.dump({"until": self.lease_until}, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass

    # -- ending ---------------------------------------------------------------------------------------
    def end(self, why: str) -> None:
        """SIGKILL to every process of the sandbox's cgroup(s) (runsc, the sentry, the gofer): runsc's exit
        then finishes the keeper. Never waits here."""
        self.ending = True
        sys.stderr.write("sandlot keeper %s: ending the sandbox: %s\n" % (os.path.basename(self.home), why))
        sys.stderr.flush()
        self._kill_cgroups()

    def _kill_cgroups(self) -> None:
        for d in self.cgroups:
            try:
                with open(os.path.join(d, "cgroup.kill"), "w") as f:
                    f.write("1")
            except OSError:
                pass
        signalled = set()
        for _ in range(16):  # a process forked between a read and the kills is found on the next pass
            pids = {int(p) for d in self.cgroups for p in _read(os.path.join(d, "cgroup.procs")).split()} - signalled
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            signalled |= pids
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()  # the trampoline, if it had not joined the cgroup yet

    def _on_runsc_exit(self, key, mask) -> None:
        self.proc.wait()

    def finish(self) -> int:
        rc = self.proc.returncode
        self.sel.unregister(self.pidfd)
        os.close(self.pidfd)
        paused = os.path.isdir(os.path.join(self.home, "image"))
        rw = os.path.join(self.home, "rw")
        if not paused and os.path.ismount(rw):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.umount2(rw.encode(), MNT_DETACH)
        if self.owner is None and not paused:
            # Nobody is left to clean up after it: runsc's state, the cgroup(s), the home.
            self._kill_cgroups()  # whatever of the sandbox still runs (nothing, normally)
            try:
                subprocess.run(self.delete_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=60, cwd="/")
            except (OSError, subprocess.SubprocessError):
                pass
            self._remove_cgroups()
            if not os.path.ismount(rw):  # never delete into a mount: the next sweep retries
                shutil.rmtree(self.home, ignore_errors=True)
        self._remove_socket()
        return rc if rc >= 0 else 128 - rc

    def _remove_cgroups(self) -> None:
        deadline = time.monotonic() + 5
        left = list(self.cgroups)
        while left and time.monotonic() < deadline:
            for d in list(left):
                try:
                    os.rmdir(d)
                    left.remove(d)
                except FileNotFoundError:
                    left.remove(d)
                except OSError:
                    pass  # its last task is still being torn down
            if left:
                time.sleep(0.01)

    def _remove_socket(self) -> None:
        try:
            os.unlink(os.path.join(self.home, SOCKET))
        except OSError:
            pass


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def main(argv: list) -> int:
    return Keeper(json.loads(argv[1])).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
