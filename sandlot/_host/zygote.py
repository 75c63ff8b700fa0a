"""Host side of a template's zygote: start it, ask it for forks, restart it when it dies.

The zygote is a fresh interpreter (exec'd, never forked from the host) inside the template's user
and mount namespace, with the template's root built and its preload list imported. Talking to it
is a few bytes on a blocking socket under a lock, so it works from any thread or event loop.

What we start is the zygote's *keeper* (boot.py ``_keeper``): it forks the zygote and reaps the
sandboxes' pid 1s. Live sandboxes depend on neither: each ends with its owner (this process, which
alone holds its channel). A zygote that dies (killed, OOM, a bad stream, the template changed) is
replaced; its keeper stays until its last sandbox has ended.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .. import _config
from .._agent import protocol
from .._exceptions import HostUnsupported, InvalidRequest, SandboxCrashed

START_TIMEOUT = 120.0  # importing pandas, scipy and sklearn cold can take a while on a busy host
NESTED_SLOTS = 32000  # sandboxes per zygote: each takes two uids of the zygote's 65536


class Zygote:
    def __init__(self, argv: list[str], config: dict, uid_map: Optional[tuple[int, int]], key: str,
                 uid_lock: Optional[int] = None) -> None:
        """``uid_map``: (host base, count) when root; None maps only our own uid (unprivileged host).
        ``uid_lock``: the descriptor holding that range's lock: every sandbox forked holds it too, so the
        range stays taken while any of them lives, even past this process (durable sandboxes)."""
        self.key = key
        self._uid_lock = uid_lock
        self.config = config
        self._argv = argv
        self._uid_map = uid_map
        self._lock = threading.Lock()
        self._free_slots = list(range(NESTED_SLOTS - 1, -1, -1))
        self._keeper: Optional[subprocess.Popen] = None
        self._old_keepers: list[subprocess.Popen] = []  # still reaping the sandboxes of a zygote gone
        self._pidfd: Optional[int] = None  # the zygote process itself (the keeper's child)
        self.pid: Optional[int] = None
        self._sock: Optional[socket.socket] = None
        self._buffer = protocol.FrameBuffer()
        self.preload_failed: dict = {}
        self.started_at = 0.0
        self._out_of_step: Optional[int] = None  # the slot of a request that left us out of step

    # -- lifecycle -------------------------------------------------------------------------
    def alive(self) -> bool:
        """The zygote process runs (a pidfd turns readable when its process exits)."""
        return self._pidfd is not None and not select.select([self._pidfd], [], [], 0)[0]

    def _exited_within(self, seconds: float) -> bool:
        return self._pidfd is not None and bool(select.select([self._pidfd], [], [], seconds)[0])

    def ensure_started(self) -> None:
        with self._lock:
            if not self.alive():
                self._start()

    def _start(self) -> None:
        self._close()
        host_end, child_end = socket.socketpair()
        log = _config.boot_log()
        stderr = open(log, "ab") if log else subprocess.DEVNULL
        try:
            held = [self._uid_lock] if self._uid_lock is not None else []
            self._keeper = subprocess.Popen(
                self._argv + [str(child_end.fileno()), "zygote"], pass_fds=[child_end.fileno(), *held],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/",
                start_new_session=True)  # a Ctrl-C meant for the owner's terminal is not for them
        finally:
            child_end.close()
            if log:
                stderr.close()
        self._sock = host_end
        self._sock.settimeout(START_TIMEOUT)
        self._buffer = protocol.FrameBuffer()
        try:
            config = dict(self.config, uid_lock_fd=self._uid_lock) if self._uid_lock is not None else self.config
            self._send({"t": "config", "config": config})
            msg = self._recv("unshared")
            self.pid = int(msg["pid"])
            self._pidfd = os.pidfd_open(self.pid)
            write_id_maps(self.pid, self._uid_map and [(0, self._uid_map[0], self._uid_map[1])])
            self._send({"t": "go"})
            ready = self._recv("ready")
        except BaseException:
            self._close()
            raise
        self.preload_failed = ready.get("failed") or {}
        self.started_at = time.monotonic()
        self._sock.settimeout(10)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(self._pidfd)
            self._pidfd = self.pid = None
        if self._keeper is not None:  # it exits by itself once its last sandbox has ended
            self._old_keepers.append(self._keeper)
            self._keeper = None
        self._old_keepers = [k for k in self._old_keepers if k.poll() is None]  # poll() reaps

    def stop(self) -> None:
        with self._lock:
            self._close()

    # -- forks -----------------------------------------------------------------------------
    def user_uid(self, slot: int) -> int:
        """The host uid of the sandbox user of the fork in ``slot`` (its nested map: 1000 -> 3 + 2*slot)."""
        return self._uid_map[0] + 3 + 2 * slot if self._uid_map else os.getuid()

    def fork(self, sandbox_config: dict, channel_end: socket.socket,
             mount_fds: Optional[Callable[[int], list]] = None) -> tuple[int, int]:
        """Fork a sandbox that will speak on ``channel_end``. Returns (host pid, nested uid slot).

        A request that fails fails alone: the zygote is restarted only when its stream can no longer
        be trusted (no answer, a broken frame, its exit). Its live sandboxes never depend on it.
        ``mount_fds(user_uid)``: the sandbox's granted mounts, made for its user's host uid once the slot
        (hence that uid) is known, sent with the request and closed here.
        """
        with self._lock:
            for attempt in (1, 2):
                self._out_of_step = None
                try:
                    return self._fork(sandbox_config, channel_end, mount_fds)
                except BaseException as exc:
                    if self._out_of_step is None:
                        raise
                    exited = self._exited_within(1.0)  # its socket closes just before it is seen to exit
                    self._close()  # a fresh zygote for the next fork; live sandboxes do not notice
                    # A child forked for this request dies with the zygote (parent-death signal, set
                    # armed before the zygote can answer for it) and never got "go": its uid slot is free again.
                    self._free_slots.append(self._out_of_step)
                    if attempt == 2 or not exited or not isinstance(exc, (SandboxCrashed, OSError)):
                        raise
                    # It had died (kill -9, OOM) before it could answer: once more, on a new one.
            raise AssertionError("unreachable")

    def _fork(self, sandbox_config: dict, channel_end: socket.socket,
              mount_fds: Optional[Callable[[int], list]]) -> tuple[int, int]:
        if not self.alive():
            self._start()  # a dead zygote is restarted on demand
        if not self._free_slots:
            raise HostUnsupported(f"zygote {self.key} has {NESTED_SLOTS} live sandboxes already")
        slot = self._free_slots.pop()
        try:
            frame = protocol.encode({"t": "fork", "config": sandbox_config, "slot": slot})
        except protocol.ProtocolError as exc:  # nothing was sent: the zygote never saw it
            self._free_slots.append(slot)
            raise InvalidRequest(f"sandbox plan too large for the zygote: {exc}") from None
        try:
            extra = mount_fds(self.user_uid(slot)) if mount_fds is not None else []
        except BaseException:
            self._free_slots.append(slot)
            raise
        try:
            socket.send_fds(self._sock, [frame], [channel_end.fileno(), *extra])
            msg = self._recv("forked")
        except _Refused as exc:  # answered in step: the zygote carries on, nothing was forked
            self._free_slots.append(slot)
            raise SandboxCrashed(f"zygote {self.key} could not fork a sandbox: {exc}") from None
        except BaseException:
            self._out_of_step = slot  # no answer, a broken frame, the zygote gone: it is restarted
            raise
        finally:
            for fd in extra:
                os.close(fd)
        return int(msg["pid"]), slot

    def release_slot(self, slot: int) -> None:
        # Called by a sandbox's cleanup on the event loop: never wait for the lock, which a fork in a worker
        # thread holds for its whole request (that stalled the loop ~0.75 ms per sandbox under load). A list
        # append is atomic; fork() pops under the lock, so a slot is never handed out twice.
        self._free_slots.append(slot)
        if self._lock.acquire(blocking=False):
            try:
                self._old_keepers = [k for k in self._old_keepers if k.poll() is None]  # poll() reaps
            finally:
                self._lock.release()

    # -- framing -----------------------------------------------------------------------------
    def _send(self, header: dict) -> None:
        assert self._sock is not None
        self._sock.sendall(protocol.encode(header))

    def _recv(self, kind: str) -> dict:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except socket.timeout:
                raise SandboxCrashed(f"zygote {self.key} did not answer ({kind})") from None
            if not data:
                raise SandboxCrashed(f"zygote {self.key} exited while starting or forking")
            try:
                frames = self._buffer.feed(data)
            except protocol.ProtocolError as exc:
                raise SandboxCrashed(f"zygote {self.key} broke the protocol ({kind}): {exc}") from None
            if frames:
                header = frames[0][0]
                if header.get("t") == "error" and kind == "forked":
                    raise _Refused(str(header.get("error")))
                if header.get("t") in ("boot_error", "error"):
                    raise HostUnsupported(f"zygote {self.key} failed to start: {header.get('error')}")
                if header.get("t") != kind:
                    raise SandboxCrashed(f"zygote {self.key} sent {header.get('t')!r}, expected {kind!r}")
                return header


class _Refused(Exception):
    """The zygote answered a fork request with an error (and stays in step)."""


def write_id_maps(pid: int, maps: Optional[list[tuple[int, int, int]]]) -> None:
    """Write a fresh user namespace's uid/gid maps from the host. None: map only our own ids to 1000."""
    proc = Path(f"/proc/{pid}")
    if maps:
        text = "".join(f"{inside} {outside} {count}\n" for inside, outside, count in maps)
        (proc / "uid_map").write_text(text)
        (proc / "gid_map").write_text(text)
    else:  # unprivileged host user: our own uid/gid become the sandbox user's, nothing else exists
        try:
            (proc / "setgroups").write_text("deny")
        except OSError:
            pass  # a nested namespace inherits "deny" from its parent
        (proc / "uid_map").write_text(f"1000 {os.getuid()} 1\n")
        (proc / "gid_map").write_text(f"1000 {os.getgid()} 1\n")
