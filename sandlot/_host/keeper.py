"""The keeper: one small host process per gVisor sandbox that holds it, so the sandbox outlives its owner.

runsc's container speaks to its agent on stdin/stdout (host pipes: what lets ``runsc checkpoint``/``restore``
pause a session to disk). Whoever holds those pipes holds the sandbox: when the holder dies the agent reads
EOF and exits. So the owner (a server, the local SDK) does not hold them; the keeper does, and relays frames
between them and one owner at a time, connected on a unix socket in the sandbox's home (``keeper.sock``, in
a root-only directory). A server that restarts connects again and carries on (``GVisorBackend.adopt``).

- Only whole frames cross (the wire protocol's framing, checked as the agent's own channel checks it): an
  owner that dies mid-frame never leaves half a request in the agent's stream.
- A new owner (any connection after the first) takes over from the one before (which is closed), and the
  agent is told first (``{"t": "owner"}``: it orphans the earlier owner's requests).
- While no owner is connected, what the agent sends is dropped (a new owner asks again: ``cmd_attach``).
- Lifetime: a lease frame from the owner (``{"t": "lease", "until": <unix time or null>}``) passes through to
  the agent, and the keeper notes ``until`` (in the home too: the keeper that restores a paused sandbox
  starts with it). Ownerless, the sandbox ends at ``until``; with no lease it ends
  as soon as its owner goes away (a warm pool's sandbox not yet claimed, the local SDK's), as it always has.
  Ending = SIGKILL to every process in the sandbox's cgroup(s), as the owner's kill() does.
- When runsc ends, the keeper does what the owner cannot do from outside any more: unmount the sandbox's
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
    from .._agent import protocol
else:  # run by path: the agent's protocol module (stdlib only) from the package's tree, nothing else
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_agent"))
    import protocol  # type: ignore[no-redef]

SOCKET = "keeper.sock"
LEASE = "lease.json"  # the last lease an owner gave: a keeper restoring a paused sandbox starts with it
# One read at most: under the allocator's mmap threshold, so a read of a small frame does not map and unmap
# a large buffer each time (with 1 MiB reads that was most of the relay's cost: ~0.2 ms a round trip).
READ_SIZE = 64 * 1024
HIGH_WATER = 4 * 1024 * 1024  # bytes waiting for one side before the keeper stops reading the other
FIRST_OWNER_WITHIN = 60.0  # the owner that started the keeper connects at once; nobody in a minute: give up
MNT_DETACH = 2
NEW_OWNER = protocol.encode({"t": "owner", "id": 0})


class WholeFrames:
    """Bytes in, whole frames out, each as its raw bytes (nothing re-encoded): the protocol's length checks
    (``protocol.check_prefix``) before anything is buffered past a prefix."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        self._buf += data
        frames = []
        size = protocol.PREFIX.size
        while len(self._buf) >= size:
            head_len, payload_len = protocol.check_prefix(bytes(self._buf[:size]))
            end = size + head_len + payload_len
            if len(self._buf) < end:
                break
            frames.append(bytes(self._buf[:end]))
            del self._buf[:end]
        return frames


def short_address(home_fd: int) -> str:
    """The socket's address through a descriptor of its directory: a unix socket's path may not pass 107
    bytes, and a home under a deep data dir would (the kernel resolves the /proc link, the length is this)."""
    return "/proc/self/fd/%d/%s" % (home_fd, SOCKET)


def lease_of(frame: bytes):
    """``(True, until)`` for a lease frame, else ``(False, None)``. Only a header that names "lease" is decoded."""
    head_len, _ = protocol.PREFIX.unpack_from(frame)
    head = frame[protocol.PREFIX.size:protocol.PREFIX.size + head_len]
    if b"lease" not in head:
        return False, None
    header = protocol.decode_header(head)
    if header.get("t") != "lease":
        return False, None
    until = header.get("until")
    return True, (float(until) if isinstance(until, (int, float)) and not isinstance(until, bool) else None)


class Keeper:
    def __init__(self, config: dict) -> None:
        self.home = config["home"]
        self.cgroups = list(config["cgroups"])
        self.run_argv = list(config["run"])
        self.delete_argv = list(config["delete"])
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.owner = None  # the connected owner's socket
        self.owners = 0  # owners connected so far: from the second on, the agent is told of each
        self.from_owner = WholeFrames()
        self.from_agent = WholeFrames()
        self.to_owner = bytearray()
        self.to_agent = bytearray()
        self.proc = None  # runsc (through the cgroup trampoline)
        self.agent_in = self.agent_out = -1
        self.lease_until = self._recorded_lease()  # unix time; None: no lease (ownerless means ended)
        self.ending = False  # the cgroup was killed: waiting for runsc to go
        self.watching: dict = {}  # fd -> the events the selector watches it for (owner and agent pipes)

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
        self.agent_in = self.proc.stdin.fileno()
        self.agent_out = self.proc.stdout.fileno()
        os.set_blocking(self.agent_in, False)
        os.set_blocking(self.agent_out, False)
        self._want(self.agent_out, selectors.EVENT_READ, self._on_agent)
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
            if self.owner is None and not self.ending and self.lease_until is not None \
                    and time.time() >= self.lease_until:
                self.end("its lease ended with no owner")

    def _timeout(self):
        if self.owner is not None or self.ending or self.lease_until is None:
            return None
        return max(0.0, self.lease_until - time.time())

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
        if self.owner is not None:  # a new owner takes over (the old one may be gone without a word yet)
            self._drop_owner()
        conn.setblocking(False)
        self.owner = conn
        self.owners += 1
        self.from_owner = WholeFrames()
        self.to_owner = bytearray()
        if self.owners > 1:  # after the whole frames of the earlier owner, before any of this one's
            self._to_agent(NEW_OWNER)
        self._watch_owner()

    def _on_owner(self, key, mask) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = self.owner.recv(READ_SIZE)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                return self._owner_gone()
            if data:
                try:
                    frames = self.from_owner.feed(data)
                    leases = [lease_of(frame) for frame in frames]
                except protocol.ProtocolError:
                    return self._owner_gone()  # not our owner's framing: treated as gone
                for frame, (is_lease, until) in zip(frames, leases):
                    if is_lease:
                        self.lease_until = until
                        self._record_lease()
                    self._to_agent(frame)
        if mask & selectors.EVENT_WRITE and self.owner is not None:
            self._flush_owner()
        self._watch_owner()
        self._watch_agent()

    def _flush_owner(self) -> None:
        """Send what waits for the owner now (the common case: all of it, no extra turn of the loop)."""
        while self.to_owner and self.owner is not None:
            try:
                sent = self.owner.send(self.to_owner)
            except BlockingIOError:
                break
            except OSError:
                return self._owner_gone()
            del self.to_owner[:sent]
        self._watch_owner()
        self._watch_agent()  # drained below the high-water mark: read the agent again (a large download)

    def _recorded_lease(self):
        try:
            with open(os.path.join(self.home, LEASE)) as f:
                until = json.load(f).get("until")
        except (OSError, ValueError, AttributeError):
            return None
        return float(until) if isinstance(until, (int, float)) and not isinstance(until, bool) else None

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

    def _owner_gone(self) -> None:
        self._drop_owner()
        if self.lease_until is None:
            self.end("its owner went away and it has no lease")
        self._watch_agent()

    def _drop_owner(self) -> None:
        if self.owner is None:
            return
        self._want(self.owner.fileno(), 0, None)
        self.owner.close()
        self.owner = None
        self.to_owner = bytearray()  # whole frames only were queued: the next owner starts on a boundary

    def _watch_owner(self) -> None:
        if self.owner is None:
            return
        events = selectors.EVENT_WRITE if self.to_owner else 0
        if len(self.to_agent) < HIGH_WATER:
            events |= selectors.EVENT_READ
        self._want(self.owner.fileno(), events, self._on_owner)

    def _want(self, fd: int, events: int, callback) -> None:
        """Watch ``fd`` for ``events`` (0: not at all); the selector is told only of changes."""
        had = self.watching.get(fd, 0)
        if events == had:
            return
        if not events:
            self.sel.unregister(fd)
            del self.watching[fd]
        elif not had:
            self.sel.register(fd, events, callback)
            self.watching[fd] = events
        else:
            self.sel.modify(fd, events, callback)
            self.watching[fd] = events

    # -- the agent's side -----------------------------------------------------------------------------
    def _to_agent(self, frame: bytes) -> None:
        if self.agent_in < 0:
            return
        self.to_agent += frame
        self._flush_agent()

    def _flush_agent(self) -> None:
        while self.to_agent and self.agent_in >= 0:
            try:
                sent = os.write(self.agent_in, self.to_agent)
            except BlockingIOError:
                break
            except OSError:  # the agent's stdin is gone: runsc is ending
                self.to_agent = bytearray()
                break
            del self.to_agent[:sent]
        self._watch_agent()
        self._watch_owner()  # drained below the high-water mark: read the owner again (a large upload)

    def _on_agent(self, key, mask) -> None:
        try:
            data = os.read(self.agent_out, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # runsc is ending: its exit (the pidfd) finishes
            self._want(self.agent_out, 0, None)
            self.agent_out = -1
            return
        try:
            frames = self.from_agent.feed(data)
        except protocol.ProtocolError:
            self.end("its agent broke the protocol")
            return
        if self.owner is not None and frames:
            self.to_owner += b"".join(frames)
            self._flush_owner()
        self._watch_agent()

    def _on_agent_writable(self, key, mask) -> None:
        self._flush_agent()

    def _watch_agent(self) -> None:
        if self.agent_out >= 0:
            self._want(self.agent_out, selectors.EVENT_READ if len(self.to_owner) < HIGH_WATER else 0, self._on_agent)
        if self.agent_in >= 0:
            self._want(self.agent_in, selectors.EVENT_WRITE if self.to_agent else 0, self._on_agent_writable)

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
