"""Host side of a template's zygote: start it, ask it for forks, restart it when it dies.

The zygote is a fresh interpreter (exec'd, never forked from the host) inside the template's user
and mount namespace, with the template's root built and its preload list imported. Talking to it
is a few bytes on a blocking socket under a lock, so it works from any thread or event loop.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

from .._agent import protocol
from .._exceptions import HostUnsupported, SandboxCrashed

START_TIMEOUT = 120.0  # importing pandas, scipy and sklearn cold can take a while on a busy host
NESTED_SLOTS = 32000  # sandboxes per zygote: each takes two uids of the zygote's 65536


class Zygote:
    def __init__(self, argv: list[str], config: dict, uid_map: Optional[tuple[int, int]], key: str) -> None:
        """``uid_map``: (host base, count) when root; None maps only our own uid (unprivileged host)."""
        self.key = key
        self.config = config
        self._argv = argv
        self._uid_map = uid_map
        self._lock = threading.Lock()
        self._free_slots = list(range(NESTED_SLOTS - 1, -1, -1))
        self._proc: Optional[subprocess.Popen] = None
        self._sock: Optional[socket.socket] = None
        self._buffer = protocol.FrameBuffer()
        self.preload_failed: dict = {}
        self.started_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ensure_started(self) -> None:
        with self._lock:
            if not self.alive():
                self._start()

    def _start(self) -> None:
        self._close()
        host_end, child_end = socket.socketpair()
        log = os.environ.get("SANDLOT_BOOT_LOG")
        stderr = open(log, "ab") if log else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                self._argv + [str(child_end.fileno()), "zygote"], pass_fds=[child_end.fileno()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/")
        finally:
            child_end.close()
            if log:
                stderr.close()
        self._sock = host_end
        self._sock.settimeout(START_TIMEOUT)
        self._buffer = protocol.FrameBuffer()
        try:
            self._send({"t": "config", "config": self.config})
            msg = self._recv("unshared")
            write_id_maps(int(msg["pid"]), self._uid_map and [(0, self._uid_map[0], self._uid_map[1])])
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
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        with self._lock:
            self._close()

    # -- forks -----------------------------------------------------------------------------
    def fork(self, sandbox_config: dict, channel_end: socket.socket) -> tuple[int, int]:
        """Fork a sandbox that will speak on ``channel_end``. Returns (host pid, nested uid slot)."""
        with self._lock:
            if not self.alive():
                self._start()  # a dead zygote is restarted on demand
            if not self._free_slots:
                raise HostUnsupported(f"zygote {self.key} has {NESTED_SLOTS} live sandboxes already")
            slot = self._free_slots.pop()
            try:
                frame = protocol.encode({"t": "fork", "config": sandbox_config, "slot": slot})
                socket.send_fds(self._sock, [frame], [channel_end.fileno()])
                msg = self._recv("forked")
            except BaseException:
                self._free_slots.append(slot)
                self._close()
                raise
            return int(msg["pid"]), slot

    def release_slot(self, slot: int) -> None:
        with self._lock:
            self._free_slots.append(slot)


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
            frames = self._buffer.feed(data)
            if frames:
                header = frames[0][0]
                if header.get("t") in ("boot_error", "error"):
                    raise HostUnsupported(f"zygote {self.key} failed to start: {header.get('error')}")
                if header.get("t") != kind:
                    raise SandboxCrashed(f"zygote {self.key} sent {header.get('t')!r}, expected {kind!r}")
                return header


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
