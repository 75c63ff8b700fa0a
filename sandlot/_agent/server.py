"""The agent: pid 1 of a sandbox. Serves the host's requests over the channel. Stdlib only.

A single-threaded ``selectors`` loop multiplexes the host channel, the Python session's pipes, the
commands' pipes and file transfers. As pid 1 it also reaps orphans, and the kernel shields it from
signals sent by the sandbox's own processes. Everything it sends is bounded by the protocol; the
host re-checks it all anyway.
"""

from __future__ import annotations

import collections
import errno
import os
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

from . import isolation, protocol

HOME = "/home/user"
HIGH_WATER = 4 * 1024 * 1024  # stop reading user output while this much waits for the host
RESULTS_HIGH_WATER = 64 * 1024  # stop reading the session's results while this much waits
# Files that report size 0 are pseudo-files (/proc); some never end (/proc/<pid>/pagemap streams
# 256 GiB of zeros), so a symlink planted by user code made the host read forever. Cap them.
PSEUDO_FILE_MAX = 4 * 1024 * 1024
# What each command keeps of its output for a client that reattaches (cmd_attach), unless the host asks for
# its sandbox's `output` limit ("keep" in the cmd request: warm sandboxes serve owners of any limits).
KEEP_DEFAULT = 16 * 1024 * 1024
KEEP_MAX = 1024 ** 3  # the largest `output` limit a sandbox may have
TAIL_SMALL = 4096  # reads smaller than this are merged into one chunk of up to TAIL_MERGED bytes
TAIL_MERGED = 64 * 1024
# What all commands keep together (the host sends its own, "kept_total": the agent's memory is the sandbox's,
# and many commands each keeping the `output` limit must not make pid 1 the one the OOM killer picks).
KEPT_TOTAL_DEFAULT = 128 * 1024 * 1024
FINISHED_MAX = 16  # finished commands remembered (their exit code and output's tail), oldest forgotten first


def _resolve(path) -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError("path must be a non-empty string")
    path = os.path.normpath(path if path.startswith("/") else os.path.join(HOME, path))
    # Symlinks in the parent are resolved here, one by one, rather than left to the kernel: gVisor's
    # 2022 release drops the rest of a path after a link to "/" (l_root/etc/passwd opened "/").
    # We are inside the sandbox, so wherever a link leads is still the sandbox; the last component
    # is kept as it is, so removing a link removes the link.
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def _entry(path: str, st: os.stat_result) -> dict:
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else \
        "file" if stat.S_ISREG(st.st_mode) else "other"
    return {"name": os.path.basename(path) or "/", "path": path, "type": kind, "size": st.st_size,
            "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime}


class _Kernel:
    """The session process, forked lazily and re-forked after it dies."""

    def __init__(self, agent: "Agent") -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                isolation.become_user()  # first: nothing of pid 1's identity outlives the fork
                agent.host.close()
                parent.close()
                os.close(out_r)
                os.close(err_r)
                devnull = os.open("/dev/null", os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                keep = child.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, 65536)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                from . import kernel

                kernel.main(keep)
            finally:
                os._exit(1)
        os.close(out_w)
        os.close(err_w)
        child.close()
        self.pid = pid
        self.ctl = parent
        self.ctl.setblocking(False)
        self.frames = protocol.FrameBuffer()
        self.pipes = {out_r: "stdout", err_r: "stderr"}
        for fd in self.pipes:
            os.set_blocking(fd, False)


class _Tail:
    """The newest bytes of one output stream; offsets count from the stream's first byte.

    Kept as the chunks the pipe gave, not copied into one buffer: on the hot path a read is stored by
    reference (small ones are merged, so a trickle of lines costs its bytes, not an object per line)."""

    __slots__ = ("chunks", "start", "size")

    def __init__(self) -> None:
        self.chunks = collections.deque()  # bytes as read; bytearrays of merged small reads; a memoryview first
        self.start = 0  # the offset of the first byte kept: bytes before it were dropped
        self.size = 0

    @property
    def end(self) -> int:
        return self.start + self.size

    def add(self, data: bytes) -> None:
        if len(data) < TAIL_SMALL:
            last = self.chunks[-1] if self.chunks else None
            if isinstance(last, bytearray) and len(last) < TAIL_MERGED:
                last += data
            else:
                self.chunks.append(bytearray(data))
        else:
            self.chunks.append(data)
        self.size += len(data)

    def drop(self, n: int) -> None:
        n = min(n, self.size)
        self.start += n
        self.size -= n
        while n:
            first = self.chunks[0]
            if len(first) <= n:
                self.chunks.popleft()
                n -= len(first)
            elif isinstance(first, bytearray):
                del first[:n]  # at a bytearray's front: no copy of the rest
                n = 0
            else:
                self.chunks[0] = memoryview(first)[n:]
                n = 0

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` (at least the first byte kept)."""
        offset = max(offset, self.start)
        at = self.end  # found from the newest end: a live reader reads near it
        i = len(self.chunks)
        while i and at > offset:
            i -= 1
            at -= len(self.chunks[i])
        parts, want, skip = [], n, offset - at
        while want > 0 and i < len(self.chunks):
            piece = memoryview(self.chunks[i])[skip:skip + want]
            parts.append(piece)
            want -= len(piece)
            skip = 0
            i += 1
        data = b"".join(parts)
        for piece in parts:
            piece.release()  # a bytearray with a view exported cannot grow
        return data


class _Command:
    """A shell command with its own process group; its pipes are raw fds the agent owns. It keeps the
    newest ``keep`` bytes of its output (both streams together), also after it ended, for reattaching."""

    def __init__(self, req: dict) -> None:
        self.cmd = req["cmd"]
        self.cwd = req.get("asked_cwd")  # as the caller gave it (None: the sandbox's default)
        self.started_at = time.time()
        keep = req.get("keep")
        self.keep = keep if isinstance(keep, int) and 0 < keep <= KEEP_MAX else KEEP_DEFAULT
        self.tails = {"stdout": _Tail(), "stderr": _Tail()}
        self.rid = None  # the request that started it, while its owner is here: gets the output as it comes
        self.done = False  # its exit was reported: the pipes are closed, the tails final
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, self.stdin_fd = os.pipe() if req.get("stdin") else (subprocess.DEVNULL, None)
        # Commands run with all of the user's ids (pid 1 holds them only as effective ones: isolation.py).
        uid = isolation.USER_UID
        if not isolation.acting_as_user():
            ids = {}
        elif sys.version_info >= (3, 9):
            ids = {"user": uid, "group": uid}
        else:  # an image's Python 3.8 has no user=/group=: the same calls, in the child before exec
            ids = {"preexec_fn": _all_user_ids}
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", req["cmd"]], cwd=_resolve(req.get("cwd") or HOME), env=req["env"],
                stdin=in_r, stdout=out_w, stderr=err_w, start_new_session=True, **ids)
        except BaseException:
            for fd in (out_r, err_r, self.stdin_fd):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w) + ((in_r,) if self.stdin_fd is not None else ()):
                os.close(fd)
        self.pipes = {out_r: "stdout", err_r: "stderr"}
        for fd in self.pipes:
            os.set_blocking(fd, False)
        if self.stdin_fd is not None:
            os.set_blocking(self.stdin_fd, False)
        self.stdin_pending = bytearray()
        self.stdin_close = False
        self.exit_code = None
        self.exited_at = 0.0
        self.usage = None  # its CPU seconds, from wait4 when it is reaped

    def pump_stdin(self) -> None:
        """Feed stdin without ever blocking the agent on a command that does not read."""
        if self.stdin_fd is None:
            return
        try:
            while self.stdin_pending:
                n = os.write(self.stdin_fd, self.stdin_pending)
                del self.stdin_pending[:n]
        except BlockingIOError:
            return
        except OSError:
            self.stdin_pending.clear()
        if self.stdin_close and not self.stdin_pending:
            self.close_stdin()

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def remember(self, name: str, data: bytes) -> int:
        """Keep ``data``; returns how many bytes more this command keeps now (its cap may drop older ones)."""
        self.tails[name].add(data)
        excess = self.retained - self.keep
        return len(data) - (self.shed(excess) if excess > 0 else 0)

    def shed(self, n: int) -> int:
        """Drop up to ``n`` of the oldest bytes kept, the larger stream's first; returns how many went."""
        out, err = self.tails["stdout"], self.tails["stderr"]
        big, small = (out, err) if out.size >= err.size else (err, out)
        first = min(n, big.size)
        big.drop(first)
        second = min(n - first, small.size)
        small.drop(second)
        return first + second

    @property
    def retained(self) -> int:
        return self.tails["stdout"].size + self.tails["stderr"].size

    def describe(self) -> dict:
        return {"pid": self.proc.pid, "cmd": self.cmd, "cwd": self.cwd, "started_at": self.started_at,
                "running": not self.done, "exit_code": self.exit_code if self.done else None,
                "usage": self.usage if self.done else None,
                "stdout": {"start": self.tails["stdout"].start, "end": self.tails["stdout"].end},
                "stderr": {"start": self.tails["stderr"].start, "end": self.tails["stderr"].end}}


class _Attachment:
    """A later reader of a command (cmd_attach): it is fed from the command's tails at its own pace."""

    __slots__ = ("command", "cursor")

    def __init__(self, command: _Command, cursor: dict) -> None:
        self.command, self.cursor = command, cursor


def _all_user_ids() -> None:
    os.setresgid(isolation.USER_UID, isolation.USER_UID, isolation.USER_UID)
    os.setresuid(isolation.USER_UID, isolation.USER_UID, isolation.USER_UID)


class PipeChannel:
    """The host channel as two pipes (stdin/stdout of a gVisor container), shaped like a socket."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fileno = read_fd, write_fd

    def fileno(self) -> int:
        return self.read_fd

    def setblocking(self, flag: bool) -> None:
        os.set_blocking(self.read_fd, flag)
        os.set_blocking(self.write_fileno, flag)

    def recv(self, n: int) -> bytes:
        return os.read(self.read_fd, n)

    def send(self, data) -> int:
        return os.write(self.write_fileno, data)

    def sendall(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fileno, view):]

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fileno):
            try:
                os.close(fd)
            except OSError:
                pass


class Agent:
    def __init__(self, sock, cfg: dict) -> None:
        self.host = sock
        self.host.setblocking(False)
        self.cfg = cfg
        self.env = dict(cfg.get("env") or {})
        # An image's WorkingDir (when it exists in the image) is where commands run by default.
        workdir = cfg.get("workdir")
        self.workdir = workdir if isinstance(workdir, str) and os.path.isdir(workdir) else HOME
        self.sel = selectors.DefaultSelector()
        self.inbox = protocol.FrameBuffer()
        self.out = bytearray()
        self.kernel = None
        self.exec_queue = collections.deque()
        self.current_exec = None
        self.commands = {}  # running commands, by pid
        self.command_rids = {}  # request id -> its command (the one that started it, or a cmd_attach)
        self.attachments = {}  # cmd_attach request id -> _Attachment
        self.finished = collections.OrderedDict()  # pid -> _Command that ended, oldest first
        self.kept = 0  # output bytes all commands keep, running and finished
        self.kept_total = KEPT_TOTAL_DEFAULT
        self.stream_owner = {}  # pipe fd -> (None for the kernel or a _Command, stream name)
        self.producers = {}  # request id -> [file chunks generator, bytes sent not yet acknowledged, close]
        self.uploads = {}
        self.paused = False
        self.ctl_paused = False
        # A durable sandbox outlives its owner (a server restarting): with a lease, losing the channel is
        # not the end; the sandbox waits for a new owner until ``lease_until`` (unix time), then ends.
        # ``spare`` is a descriptor number held for that: while no owner holds the channel it is the far end
        # of a fresh one, which the next owner takes with pidfd_getfd (host root only: user code runs as
        # another uid and cannot reach pid 1's descriptors); otherwise it holds /dev/null.
        self.lease_until = None
        self.ownerless = False
        self.spare = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # Pid 1 only receives the signals it handles, and Python handles SIGINT by raising
        # KeyboardInterrupt: `os.kill(1, signal.SIGINT)` from user code used to end the agent and
        # with it the sandbox. A no-op handler (not SIG_IGN, which commands would inherit) stops that.
        signal.signal(signal.SIGINT, lambda *_: None)
        self.sel.register(wake_r, selectors.EVENT_READ, self._on_wakeup)
        self.sel.register(self.host, selectors.EVENT_READ, self._on_host)  # closed: the sandbox ends

    # -- output to the host ------------------------------------------------------------------
    def send(self, header: dict, payload: bytes = b"") -> None:
        if isinstance(header.get("id"), str):
            # An orphaned request's (code its dead owner left running): nobody will read it (the host drops
            # such ids). Queued, a flood of it would fill ``out`` while no owner reads and stall every stream
            # behind the backpressure, background commands' included.
            return
        self.out += protocol.encode(header, payload)

    def _flush(self) -> None:
        while self.out:
            try:
                sent = self.host.send(self.out)
            except BlockingIOError:
                break
            except OSError:
                # The owner is gone (EPIPE, ECONNRESET). What it sent before it went is read first: a lease
                # that shortened its deadline may be among it (it arrived while we were busy).
                self.out.clear()
                if getattr(self.host, "write_fileno", None) is None:  # (on pipes, gVisor's, it ends anyway)
                    self._read_what_is_left()
                self._host_gone()  # pid 1 exits (the kernel ends the whole sandbox), or waits for a new owner
                return
            del self.out[:sent]
        wfd = getattr(self.host, "write_fileno", None)
        if wfd is None:  # a socket: one descriptor for both directions
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
            if self.sel.get_key(self.host).events != want:
                self.sel.modify(self.host, want, self._on_host)
        else:  # a pair of pipes (gVisor tier): watch the write end only while output waits
            registered = wfd in self.sel.get_map()
            if self.out and not registered:
                self.sel.register(wfd, selectors.EVENT_WRITE, lambda key, mask: None)
            elif not self.out and registered:
                self.sel.unregister(wfd)
        # Backpressure: a flood of user output waits in the pipe, not in our memory.
        pause = len(self.out) > HIGH_WATER
        if pause != self.paused:
            self.paused = pause
            for fd in list(self.stream_owner):
                if pause:
                    self.sel.unregister(fd)
                else:
                    self.sel.register(fd, selectors.EVENT_READ, self._on_stream)
        # A flood of results waits in the session (blocked in its send), and only a short backlog here:
        # the host must see the end of an interrupted cell within its grace, even over a slow channel.
        ctl_pause = len(self.out) > RESULTS_HIGH_WATER
        if ctl_pause != self.ctl_paused:
            self.ctl_paused = ctl_pause
            if self.kernel is not None:
                if ctl_pause:
                    self.sel.unregister(self.kernel.ctl)
                else:
                    self.sel.register(self.kernel.ctl, selectors.EVENT_READ, self._on_kernel_ctl)

    def _read_what_is_left(self) -> None:
        """Dispatch the frames a gone owner sent that we had not read yet (answers go nowhere: dropped)."""
        for _ in range(64):  # a gone owner sends nothing more: its queued bytes end soon
            try:
                data = self.host.recv(1 << 20)
            except OSError:  # EAGAIN: all read; ECONNRESET: all read, then the reset
                return
            if not data:
                return
            for header, payload in self.inbox.feed(data):
                self._dispatch(header, payload)
            self.out.clear()

    def _on_host(self, key, mask) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = self.host.recv(1 << 20)
            except BlockingIOError:
                data = None
            except OSError:  # ECONNRESET: the owner died with our output unread; gone all the same
                data = b""
            if data == b"":
                self._host_gone()
                return
            if data:
                if self.ownerless:
                    self._owned()
                for header, payload in self.inbox.feed(data):
                    self._dispatch(header, payload)

    # -- owners -------------------------------------------------------------------------------
    def _req_lease(self, rid, req, payload) -> None:
        """How long the sandbox may outlive its owner: until this unix time (None: it ends with it)."""
        until = req.get("until")
        if until is not None and (isinstance(until, bool) or not isinstance(until, (int, float))):
            raise ValueError("until must be a unix time or null")
        self.lease_until = until

    def _host_gone(self) -> None:
        """The owner's end of the channel closed (its process ended). Without a lease in force, or on a
        channel of pipes (gVisor: its keeper holds them), the sandbox ends now: pid 1 exits."""
        if (self.lease_until is None or time.time() >= self.lease_until
                or getattr(self.host, "write_fileno", None) is not None):
            os._exit(0)
        self.sel.unregister(self.host)
        self.host.close()
        near, far = socket.socketpair()
        os.dup2(far.fileno(), self.spare, inheritable=False)
        far.close()
        near.setblocking(False)
        self.host = near
        self.sel.register(near, selectors.EVENT_READ, self._on_host)
        self.out.clear()  # the rest of a frame the old owner never read, and what followed it
        self.inbox = protocol.FrameBuffer()  # the start of a frame it never finished
        self._new_owner()
        self.ownerless = True

    def _owned(self) -> None:
        """A new owner spoke on the channel it took: our copy of its end goes, so its going away shows as EOF."""
        devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(devnull, self.spare, inheritable=False)
        os.close(devnull)
        self.ownerless = False

    def _req_owner(self, rid, req, payload) -> None:
        """A new host process owns the channel (a re-adopting server; on the gVisor tier the keeper sends
        this when a server connects): the earlier owner's requests are forgotten."""
        self._new_owner()

    def _new_owner(self) -> None:
        """The requests of the owner that went away are orphaned: their ids become strings the host's
        channel drops (it routes int ids only), so a new owner's ids never collide with them. Running code
        runs on (its output goes nowhere; the session keeps what it defines); code queued behind it is not
        run (its caller is gone: a retry must not run it twice); background commands run on, and a new owner
        reaches them by pid (``cmd_attach``); file reads and uploads in flight are closed (an upload is
        undone)."""
        def orphan(rid):
            return rid if rid is None or isinstance(rid, str) else "orphan-%s" % rid

        self.current_exec = orphan(self.current_exec)
        self.exec_queue.clear()
        for command in self.commands.values():
            command.rid = None  # its output is kept (its tails), not sent to a request nobody reads
        self.command_rids.clear()
        self.attachments.clear()
        for read in self.producers.values():
            read[0].close()
            read[2]()
        self.producers.clear()
        for fd, _, path, undo in self.uploads.values():
            try:
                if undo is None:
                    os.unlink(path)
                else:
                    os.ftruncate(fd, undo)
            except OSError:
                pass
            os.close(fd)
        self.uploads.clear()

    # -- requests -----------------------------------------------------------------------------
    def _dispatch(self, req: dict, payload: bytes) -> None:
        kind = req.get("t")
        rid = req.get("id")
        handler = getattr(self, "_req_" + str(kind), None)
        if handler is None:
            self.send({"t": "error", "id": rid, "etype": "InvalidRequest", "message": "unknown request %r" % kind})
            return
        try:
            handler(rid, req, payload)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self._fail(rid, exc)

    def _fail(self, rid, exc: BaseException) -> None:
        self.send({"t": "error", "id": rid, "etype": type(exc).__name__, "message": str(exc),
                   "errno": getattr(exc, "errno", None)})

    def _req_configure(self, rid, req, payload) -> None:
        """Late settings for a sandbox taken from a warm pool: its owner's environment."""
        env = req.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("env must map strings to strings")
        for key, value in env.items():  # what os.environ could not hold would crash us later
            if not key or "=" in key or "\0" in key + value:
                raise ValueError("bad environment variable %r" % key)
            (key + value).encode("utf-8")  # UnicodeEncodeError is a ValueError: answered as an error
        self.env.update(env)
        if self.kernel is not None:
            self.kernel.ctl.setblocking(True)
            try:
                self.kernel.ctl.sendall(protocol.encode({"t": "env", "env": env}))
            finally:
                self.kernel.ctl.setblocking(False)

    def _req_reseed(self, rid, req, payload) -> None:
        """This session is a fork's copy (the host restored a checkpoint of another): the session's random
        state (``random``, numpy's global generator) starts over from fresh entropy, as a zygote's forks do."""
        if self.kernel is not None:
            self.kernel.ctl.setblocking(True)
            try:
                self.kernel.ctl.sendall(protocol.encode({"t": "reseed"}))
            finally:
                self.kernel.ctl.setblocking(False)

    def _req_ping(self, rid, req, payload) -> None:
        self.send({"t": "pong", "id": rid})

    def _req_exec(self, rid, req, payload) -> None:
        if not isinstance(req.get("code"), str):
            raise ValueError("code must be a string")
        if not self.cfg.get("python", True):
            raise ValueError("template %s has no Python >= 3.8: run_code needs one; commands.run and files work"
                             % self.cfg.get("template", "?"))
        self.exec_queue.append((rid, req["code"]))
        self._next_exec()

    def _next_exec(self) -> None:
        if self.current_exec is not None or not self.exec_queue:
            return
        if self.kernel is None:
            self._start_kernel()
        rid, code = self.exec_queue.popleft()
        self.current_exec = rid
        try:
            self.kernel.ctl.sendall(protocol.encode({"t": "exec", "code": code}))
        except (BlockingIOError, OSError):
            # Cells up to the socket buffer size go through at once; larger ones block briefly.
            self.kernel.ctl.setblocking(True)
            self.kernel.ctl.settimeout(5)
            try:
                self.kernel.ctl.sendall(protocol.encode({"t": "exec", "code": code}))
            except OSError:
                pass
            self.kernel.ctl.setblocking(False)

    def _req_interrupt(self, rid, req, payload) -> None:
        if self.kernel is not None and self.current_exec is not None:
            os.kill(self.kernel.pid, signal.SIGINT)

    def _start_kernel(self) -> None:
        os.environ.clear()
        os.environ.update(self.env)
        self.kernel = _Kernel(self)
        if not self.ctl_paused:
            self.sel.register(self.kernel.ctl, selectors.EVENT_READ, self._on_kernel_ctl)
        for fd, name in self.kernel.pipes.items():
            self.stream_owner[fd] = (None, name)
            if not self.paused:
                self.sel.register(fd, selectors.EVENT_READ, self._on_stream)

    def _on_kernel_ctl(self, key, mask) -> None:
        kernel = self.kernel
        try:
            data = kernel.ctl.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._kernel_gone("the session's channel closed")
            return
        try:
            frames = kernel.frames.feed(data)
        except protocol.ProtocolError as exc:
            # User code wrote to our private socket. Nothing it says can be trusted any more.
            os.kill(kernel.pid, signal.SIGKILL)
            self._kernel_gone("the session's channel was corrupted (%s); the session was restarted" % exc)
            return
        for header, _ in frames:
            try:
                self._from_kernel(header)
            except protocol.ProtocolError as exc:
                # A frame that fits the session's channel but not the host's once we add the request
                # id: the kernel never sends one, so user code forged it. Same cure as garbage.
                os.kill(kernel.pid, signal.SIGKILL)
                self._kernel_gone("the session's channel was corrupted (%s); the session was restarted" % exc)
                return

    def _from_kernel(self, header: dict) -> None:
        if header["t"] == "result" and self.current_exec is not None:
            self.send({"t": "result", "id": self.current_exec, "data": header.get("data"),
                       "main": bool(header.get("main"))})
        elif header["t"] == "done" and self.current_exec is not None:
            self._drain_kernel_pipes()
            self.send({"t": "done", "id": self.current_exec, "error": header.get("error"),
                       "execution_count": header.get("execution_count")})
            self.current_exec = None
            self._next_exec()

    def _drain_kernel_pipes(self) -> None:
        for fd in list(self.kernel.pipes if self.kernel else ()):
            self._read_stream(fd, drain=True)

    def _kernel_gone(self, why: str) -> None:
        kernel = self.kernel
        if kernel is None:
            return
        self._drain_kernel_pipes()
        for fd in kernel.pipes:
            self._close_stream(fd)
        if not self.ctl_paused:
            self.sel.unregister(kernel.ctl)
        kernel.ctl.close()
        self.kernel = None
        if kernel.pid not in _REAPED:
            try:
                os.kill(kernel.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = _reap(kernel.pid)
        if self.current_exec is not None:
            sig = -status if status is not None and status < 0 else None
            self.send({"t": "done", "id": self.current_exec, "execution_count": None, "died": True,
                       "signal": sig, "error": {"name": "SessionDied", "value": why, "traceback": ""}})
            self.current_exec = None
        self._next_exec()

    # -- commands -----------------------------------------------------------------------------
    def _req_cmd(self, rid, req, payload) -> None:
        if not isinstance(req.get("cmd"), str):
            raise ValueError("cmd must be a string")
        env = dict(self.env)
        env.update(req.get("env") or {})
        req = dict(req, env=env, cwd=req.get("cwd") or self.workdir, asked_cwd=req.get("cwd"))
        total = req.get("kept_total")
        if isinstance(total, int) and 0 < total <= 16 * KEEP_MAX:
            self.kept_total = total
        try:
            command = _Command(req)
        except (OSError, subprocess.SubprocessError) as exc:
            self._fail(rid, exc)
            return
        command.rid = rid
        old = self.commands.get(command.proc.pid)
        if old is not None:  # its pid was reaped and used again before its end was reported: report it now
            old.exited_at = float("-inf")
            self._finish_commands()
        self.commands[command.proc.pid] = command
        self.command_rids[rid] = command
        for fd, name in command.pipes.items():
            self.stream_owner[fd] = (command, name)
            if not self.paused:
                self.sel.register(fd, selectors.EVENT_READ, self._on_stream)
        self.send({"t": "started", "id": rid, "pid": command.proc.pid})

    def _req_stdin(self, rid, req, payload) -> None:
        command = self.command_rids.get(req.get("target"))
        if command is None or command.stdin_fd is None:
            return  # the command ended or closed its stdin; late input is dropped
        command.stdin_pending += payload
        command.stdin_close = command.stdin_close or bool(req.get("close"))
        command.pump_stdin()

    def _req_signal(self, rid, req, payload) -> None:
        command = self.command_rids.get(req.get("target"))
        if command is not None and command.exit_code is None:
            try:
                os.killpg(command.proc.pid, int(req.get("signal", signal.SIGKILL)))
            except ProcessLookupError:
                pass

    def _req_cmd_list(self, rid, req, payload) -> None:
        """The commands running and those that ended and are still remembered, oldest first."""
        listed = list(self.finished.values()) + sorted(self.commands.values(), key=lambda c: c.started_at)
        # One frame holds the answer: a long command line is cut here (the host asked for it whole at start).
        items = [dict(c.describe(), cmd=c.cmd[:4096]) for c in listed]
        self.send({"t": "ok", "id": rid, "commands": items})

    def _req_cmd_attach(self, rid, req, payload) -> None:
        """A new reader of command ``pid`` (running, or ended and remembered): the answer says where its
        kept output starts and ends; then its output from ``stdout``/``stderr`` (offsets; past what is
        kept: from the oldest byte kept), each chunk with its offset, live output as it comes, and its exit.
        stdin and signal requests reach the command by this request's id too."""
        pid = req.get("pid")
        command = self.commands.get(pid)
        if command is None:  # a finished one; the newest if its pid was used again
            command = self.finished.get(pid)
        if command is None:
            raise KeyError("no command with pid %r runs or is remembered" % (pid,))
        cursor = {}
        for name, tail in command.tails.items():
            offset = req.get(name)
            offset = tail.end if offset is None else int(offset)
            cursor[name] = min(max(offset, tail.start), tail.end)
        self.attachments[rid] = _Attachment(command, cursor)
        if not command.done:
            self.command_rids[rid] = command
        self.send(dict(command.describe(), t="started", id=rid, attached=True, cursor=cursor, cmd=command.cmd[:65536]))

    def _req_cmd_detach(self, rid, req, payload) -> None:
        """A reader of a cmd_attach went away: stop feeding it."""
        target = req.get("target")
        if self.attachments.pop(target, None) is not None:
            self.command_rids.pop(target, None)

    def _feeding(self) -> bool:
        return any(a.cursor[n] < t.end for a in self.attachments.values() for n, t in a.command.tails.items()) \
            or any(a.command.done for a in self.attachments.values())

    def _feed_attachments(self) -> None:
        """Readers of cmd_attach get the command's kept output at the pace the channel takes it."""
        for rid, attachment in list(self.attachments.items()):
            command, cursor = attachment.command, attachment.cursor
            for name, tail in command.tails.items():
                while len(self.out) < HIGH_WATER:
                    # Fell behind what is kept (a flood while the host was slow): go on from the oldest byte
                    # kept; the chunk's offset says where the gap was.
                    at = max(cursor[name], tail.start)
                    chunk = tail.read(at, protocol.CHUNK)
                    if not chunk:
                        break
                    self.send({"t": name, "id": rid, "offset": at}, chunk)
                    cursor[name] = at + len(chunk)
            if command.done and all(cursor[n] >= t.end for n, t in command.tails.items()):
                del self.attachments[rid]
                self.command_rids.pop(rid, None)
                self.send({"t": "exit", "id": rid, "exit_code": command.exit_code, "usage": command.usage})

    # -- streams ------------------------------------------------------------------------------
    def _on_stream(self, key, mask) -> None:
        self._read_stream(key.fd)

    def _read_stream(self, fd: int, drain: bool = False) -> None:
        owner = self.stream_owner.get(fd)
        if owner is None:
            return
        command, name = owner
        while True:
            try:
                data = os.read(fd, protocol.CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_stream(fd)
                return
            if command is None:
                target = self.current_exec
            else:
                self.kept += command.remember(name, data)
                if self.kept > self.kept_total:
                    self._shed(command)
                target = command.rid
            if target is not None:
                self.send({"t": name, "id": target}, data)
            if not drain or len(self.out) > HIGH_WATER * 4:
                return

    def _close_stream(self, fd: int) -> None:
        if self.stream_owner.pop(fd, None) is None:
            return
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        os.close(fd)

    def _on_wakeup(self, key, mask) -> None:
        try:
            while os.read(key.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap_children(self) -> None:
        while True:
            try:
                # wait4: the child's resource usage too (its own and its waited-for descendants'): a command's
                # real CPU time. (Not its ru_maxrss: a fork of this process counts our pages before it execs.)
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = _exitcode(status)
            if self.kernel is not None and pid == self.kernel.pid:
                _REAPED[pid] = code
                self._kernel_gone("the session process died (%s)" % _describe(code))
                continue
            command = self.commands.get(pid)
            if command is not None:
                command.proc.returncode = code
                command.exit_code = code
                command.exited_at = time.monotonic()
                command.usage = {"cpu_seconds": rusage.ru_utime + rusage.ru_stime}

    def _finish_commands(self) -> None:
        now = time.monotonic()
        for pid, command in list(self.commands.items()):
            if command.exit_code is None:
                continue
            open_pipes = [fd for fd in command.pipes if fd in self.stream_owner]
            # A background grandchild may hold the pipes open forever; do not wait on it long.
            if open_pipes and now - command.exited_at < 0.05:
                continue
            for fd in open_pipes:
                self._read_stream(fd, drain=True)
                self._close_stream(fd)
            command.close_stdin()
            command.done = True
            del self.commands[pid]
            self._remember_finished(command)
            if command.rid is not None:
                self.command_rids.pop(command.rid, None)
                self.send({"t": "exit", "id": command.rid, "exit_code": command.exit_code, "usage": command.usage})

    def _shed(self, writer: _Command) -> None:
        """Over what all commands may keep: the command writing gives up its oldest bytes first, then the
        one keeping most (a flood pays for itself; a quiet command keeps its tail)."""
        self.kept -= writer.shed(self.kept - self.kept_total)
        while self.kept > self.kept_total:
            largest = max(list(self.commands.values()) + list(self.finished.values()), key=lambda c: c.retained)
            if not largest.retained:
                break
            self.kept -= largest.shed(self.kept - self.kept_total)

    def _remember_finished(self, ended: _Command) -> None:
        """Ended commands stay for a client that comes back (their exit code and output's tail): at most
        FINISHED_MAX of them, keeping together at most what the newest one may keep; the oldest go first."""
        earlier = self.finished.pop(ended.proc.pid, None)  # its pid was used again: the newest one stays
        if earlier is not None:
            self.kept -= earlier.retained
        self.finished[ended.proc.pid] = ended
        kept = sum(c.retained for c in self.finished.values())
        while len(self.finished) > 1 and (len(self.finished) > FINISHED_MAX or kept > ended.keep):
            _, oldest = self.finished.popitem(last=False)
            kept -= oldest.retained
            self.kept -= oldest.retained

    # -- files --------------------------------------------------------------------------------
    def _req_fread(self, rid, req, payload) -> None:
        path = _resolve(req.get("path"))
        # O_NONBLOCK: a FIFO planted by user code used to block pid 1 in open(), hanging every request.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if not stat.S_ISREG(st.st_mode):  # /dev/zero and friends never end; FIFOs may never answer
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file (a device, FIFO or socket)", path)
        limit = None if st.st_size else PSEUDO_FILE_MAX
        open_fds = [fd]

        def close() -> None:  # once, whether the read ends, fails or is cancelled before it began
            while open_fds:
                os.close(open_fds.pop())

        def produce():
            total = 0
            try:
                while True:
                    chunk = os.read(fd, protocol.CHUNK if limit is None else min(protocol.CHUNK, limit - total))
                    if not chunk:
                        break
                    total += len(chunk)
                    yield {"t": "data", "id": rid}, chunk
                yield {"t": "ok", "id": rid, "size": total}, b""
            finally:
                close()

        self.producers[rid] = [produce(), 0, close]

    def _req_fwrite(self, rid, req, payload) -> None:
        path = _resolve(req.get("path"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if req.get("append") else os.O_TRUNC)
        # O_NONBLOCK and regular files only, as in fread: a planted FIFO must not block pid 1.
        existed = os.path.lexists(path)
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY, 0o644)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file (a device, FIFO or socket)", path)
        # What undoes a failed upload: an append goes back to the size it had; anything else goes.
        undo = st.st_size if req.get("append") and existed else None
        self.uploads[rid] = [fd, 0, path, undo]

    def _req_fdata(self, rid, req, payload) -> None:
        upload = self.uploads.get(rid)
        if upload is None:
            return  # an earlier error already answered this upload
        try:
            view = memoryview(payload)
            while view:
                n = os.write(upload[0], view)
                view = view[n:]
                upload[1] += n
        except OSError as exc:
            fd, _, path, undo = self.uploads.pop(rid)
            try:
                if undo is None:
                    os.unlink(path)  # no partial file left taking the space
                else:
                    os.ftruncate(fd, undo)
            except OSError:
                pass
            os.close(fd)
            raise OSError(exc.errno, self._full_message(exc, path), path) from None

    def _full_message(self, exc: OSError, path: str) -> str:
        """Which limit a failed write hit, by name (the partial file is gone)."""
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return exc.strerror or str(exc)
        for mount in self.cfg.get("mounts") or []:
            if path == mount["target"] or path.startswith(mount["target"] + "/"):
                return ("%s: the mount at %s is full (a volume's size, or the host disk); what this upload wrote is "
                        "gone" % (exc.strerror, mount["target"]))
        try:  # the storage's real size (a warm sandbox's may have been resized for its owner's memory)
            st = os.statvfs("/tmp")
            disk = st.f_blocks * st.f_frsize
        except OSError:
            disk = (self.cfg.get("limits") or {}).get("disk")
        size = " (%d MiB for home, /tmp and /dev/shm together)" % (disk // 1048576) if disk else ""
        return ("%s: the sandbox's `disk` limit%s is reached; what this upload wrote is gone (raise "
                "limits={'disk': ...} at create)" % (exc.strerror, size))

    def _req_fend(self, rid, req, payload) -> None:
        upload = self.uploads.pop(rid, None)
        if upload is None:
            return
        os.close(upload[0])
        self.send({"t": "ok", "id": rid, "size": upload[1]})

    def _req_flist(self, rid, req, payload) -> None:
        root = _resolve(req.get("path"))
        depth = max(1, min(int(req.get("depth") or 1), 32))
        entries = []

        def walk(path: str, level: int) -> None:
            with os.scandir(path) as it:
                for item in sorted(it, key=lambda e: e.name):
                    st = item.stat(follow_symlinks=False)
                    entries.append(_entry(item.path, st))
                    if len(entries) >= 10000:
                        return
                    if item.is_dir(follow_symlinks=False) and level < depth:
                        walk(item.path, level + 1)

        walk(root, 1)
        self.send({"t": "ok", "id": rid, "entries": entries})

    def _req_fstat(self, rid, req, payload) -> None:
        path = _resolve(req.get("path"))
        self.send({"t": "ok", "id": rid, "entry": _entry(path, os.lstat(path))})

    def _req_fexists(self, rid, req, payload) -> None:
        self.send({"t": "ok", "id": rid, "exists": os.path.lexists(_resolve(req.get("path")))})

    def _req_fremove(self, rid, req, payload) -> None:
        path = _resolve(req.get("path"))
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        self.send({"t": "ok", "id": rid})

    def _req_fmkdir(self, rid, req, payload) -> None:
        path = _resolve(req.get("path"))
        existed = os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        self.send({"t": "ok", "id": rid, "created": not existed})

    # -- loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            self._flush()
            timeout = 0.02 if self.commands else None
            if (self._producing() or self._feeding()) and len(self.out) < HIGH_WATER:
                timeout = 0
            if self.ownerless:
                left = max(0.0, self.lease_until - time.time())
                timeout = left if timeout is None else min(timeout, left)
            for key, mask in self.sel.select(timeout):
                key.data(key, mask)
            if self.ownerless and time.time() >= self.lease_until:
                os._exit(0)  # nobody took the sandbox back within its lifetime
            self._reap_children()
            for command in self.commands.values():
                command.pump_stdin()
            self._finish_commands()
            self._produce()
            if self.attachments:
                self._feed_attachments()
            self._flush()

    # A file is read at the pace of its reader: at most FREAD_WINDOW bytes go out unacknowledged.
    # (The host enforces the window; keeping to it here is what lets an honest read never break it.)
    def _producing(self) -> bool:
        return any(read[1] + protocol.CHUNK <= protocol.FREAD_WINDOW for read in self.producers.values())

    def _produce(self) -> None:
        for rid, read in list(self.producers.items()):  # [chunks, unacknowledged bytes, close]
            while read[1] + protocol.CHUNK <= protocol.FREAD_WINDOW and len(self.out) < HIGH_WATER:
                try:
                    header, payload = next(read[0])
                except StopIteration:
                    del self.producers[rid]
                    break
                except OSError as exc:
                    del self.producers[rid]
                    self._fail(rid, exc)
                    break
                read[1] += len(payload)
                self.send(header, payload)

    def _req_fack(self, rid, req, payload) -> None:
        read = self.producers.get(req.get("target"))
        if read is not None:
            read[1] = max(0, read[1] - int(req.get("bytes") or 0))

    def _req_fcancel(self, rid, req, payload) -> None:
        """The host stopped reading (its client went away): close the file now, not at its end."""
        read = self.producers.pop(req.get("target"), None)
        if read is not None:
            read[0].close()
            read[2]()


_REAPED: dict = {}


def _exitcode(status: int) -> int:
    """os.waitstatus_to_exitcode, which Python 3.8 (an image's interpreter may be one) lacks."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _reap(pid: int):
    if pid in _REAPED:
        return _REAPED.pop(pid)
    try:
        _, status = os.waitpid(pid, 0)
        return _exitcode(status)
    except ChildProcessError:
        return None


def _describe(code: int) -> str:
    if code < 0:
        try:
            return "killed by " + signal.Signals(-code).name
        except ValueError:
            return "killed by signal %d" % -code
    return "exit code %d" % code


def serve(sock, cfg: dict) -> None:
    if cfg.get("egress"):  # a build's apt step: its only way out is the host's allowlisting proxy
        from . import relay

        relay.forward_loopback(cfg["egress"])
    agent = Agent(sock, cfg)
    if cfg.get("python", True):  # an image without Python serves commands and files only
        agent._start_kernel()  # the session is ready before the first call (and pooled sandboxes warm)
    agent.send({"t": "ready", "pid": os.getpid(), "spare_fd": agent.spare})
    agent.run()
