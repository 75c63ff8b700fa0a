"""The process tier: namespaces + seccomp + Landlock + cgroups + rlimits, one exec'd interpreter per sandbox.

``ProcessBackend.start()`` returns a ``ProcessSandbox``, a Popen-like handle: a channel to the agent,
``kill()``, ``wait()``, ``returncode``, and the cgroup's counters.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import signal
import socket
import subprocess

from pathlib import Path
from typing import Optional

from .._exceptions import HostUnsupported, SandboxCrashed, TimeoutError
from .._host import cgroups, seccomp
from .._host.channel import CLOSED, Channel
from .._limits import Limits
from .._templates import Template
from .base import Backend, SandboxProcess

AGENT_DIR = Path(__file__).resolve().parent.parent / "_agent"
BOOT_TIMEOUT = 20.0
UID_BASE = 0x10000000  # host uids for sandboxes start at 268435456: far above any real account
UID_SPAN = 65536
UID_SLOTS = 8192


def state_dir() -> Path:
    """Where the host keeps its runtime state. Never visible inside a sandbox."""
    if os.environ.get("SANDLOT_STATE_DIR"):
        base = Path(os.environ["SANDLOT_STATE_DIR"])
    elif os.geteuid() == 0:
        base = Path("/run/sandlot")
    else:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / ("sandlot-%d" % os.getuid())
    base.mkdir(mode=0o711, parents=True, exist_ok=True)
    base.chmod(0o711)  # sandboxes must traverse it to reach their mountpoint; listing stays private
    return base


class UidSlot:
    """A private range of host uids for one sandbox, held by a lock file so no two sandboxes share it."""

    def __init__(self) -> None:
        locks = state_dir() / "uids"
        locks.mkdir(exist_ok=True)
        start = secrets.randbelow(UID_SLOTS)
        for i in range(UID_SLOTS):
            slot = (start + i) % UID_SLOTS
            fd = os.open(locks / str(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.fd, self.base = fd, UID_BASE + slot * UID_SPAN
            return
        raise HostUnsupported("all %d sandbox uid ranges are in use" % UID_SLOTS)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _mountpoint() -> str:
    """An empty directory each sandbox mounts its new root on, inside its own mount namespace."""
    path = state_dir() / "rootfs-mnt"
    path.mkdir(mode=0o755, exist_ok=True)
    return str(path)


class ProcessSandbox(SandboxProcess):
    def __init__(self, sandbox_id: str, limits: Limits, proc: subprocess.Popen, channel: Channel,
                 cgroup: cgroups.Cgroup, uid_slot: Optional[UidSlot]) -> None:
        self.id = sandbox_id
        self.limits = limits
        self.channel = channel
        self.cgroup = cgroup
        self._proc = proc
        self._uid_slot = uid_slot
        self._exited = asyncio.get_running_loop().create_future()
        self._pidfd = os.pidfd_open(proc.pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)
        self.killed_reason: Optional[str] = None
        self._cleaned = False
        self._init_pidfd: Optional[int] = None

    def adopt_init(self, pid: int) -> None:
        """Hold pid 1 of the sandbox by pidfd, so killing it can never hit a recycled pid."""
        self._init_pidfd = os.pidfd_open(pid)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.returncode

    def _on_exit(self) -> None:
        if self._proc.poll() is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(self._proc.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def kill(self, reason: str = "killed") -> None:
        """End the sandbox and everything in it; release its cgroup, uid range and channel."""
        if self.killed_reason is None:
            self.killed_reason = reason
        if self._cleaned:
            return
        if self._init_pidfd is not None:
            # Killing pid 1 ends the pid namespace: the kernel kills and reaps everything in it,
            # then the boot process reaps pid 1 and exits, and we reap the boot process.
            try:
                signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.wait(), 5)
            except asyncio.TimeoutError:
                pass
        try:
            self._proc.kill()
        except ProcessLookupError:
            pass
        await asyncio.to_thread(self.cgroup.kill_all)
        try:
            await asyncio.wait_for(self.wait(), 5)
        except asyncio.TimeoutError:
            pass
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        await self.channel.aclose()
        await asyncio.to_thread(self.cgroup.remove)
        if not self._exited.done():
            self._proc.poll()
        try:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        except Exception:
            pass
        os.close(self._pidfd)
        if self._init_pidfd is not None:
            os.close(self._init_pidfd)
            self._init_pidfd = None
        if self._uid_slot is not None:
            self._uid_slot.release()


class ProcessBackend(Backend):
    name = "process"

    async def start(self, template: Template, limits: Limits, env: dict[str, str]) -> ProcessSandbox:
        sandbox_id = "sb-" + secrets.token_hex(6)
        root = os.geteuid() == 0
        uid_slot = UidSlot() if root else None
        cgroup = None
        proc = None
        try:
            cgroup = await asyncio.to_thread(cgroups.Cgroup, sandbox_id, limits)
            host_end, child_end = socket.socketpair()
            # Boot/agent crashes print to stderr; keep them only when asked (debugging a host).
            log = os.environ.get("SANDLOT_BOOT_LOG")
            stderr = open(log, "ab") if log else subprocess.DEVNULL
            proc = subprocess.Popen(
                [template.python, "-I", "-S", "-B", str(AGENT_DIR / "boot.py"), str(child_end.fileno())],
                pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/")
            child_end.close()
            if log:
                stderr.close()
            channel = Channel(host_end)
            await channel.open()
            sandbox = ProcessSandbox(sandbox_id, limits, proc, channel, cgroup, uid_slot)
        except BaseException:
            if proc is not None:
                proc.kill()
                proc.wait()
            if cgroup is not None:
                await asyncio.to_thread(cgroup.remove)
            if uid_slot is not None:
                uid_slot.release()
            raise
        try:
            await asyncio.wait_for(self._boot(sandbox, template, limits, env, root), BOOT_TIMEOUT)
        except asyncio.TimeoutError:
            await sandbox.kill("boot timed out")
            raise TimeoutError("sandbox did not boot within %.0f s" % BOOT_TIMEOUT) from None
        except BaseException:
            await sandbox.kill("boot failed")
            raise
        return sandbox

    async def _boot(self, sandbox: ProcessSandbox, template: Template, limits: Limits,
                    env: dict[str, str], root: bool) -> None:
        base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin:" + os.path.dirname(template.python),
                    "HOME": "/home/user", "USER": "user", "LANG": "C.UTF-8", "TERM": "dumb",
                    "MPLBACKEND": "module://_agent.mpl_backend", "MPLCONFIGDIR": "/home/user/.config/matplotlib",
                    "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        base_env.update(dict(template.env))
        base_env.update(env)
        config = {
            "mountpoint": _mountpoint(),
            "prefixes": list(template.prefixes),
            "agent_dir": str(AGENT_DIR),
            "setup_uid": 0 if root else 1000,
            "seccomp": seccomp.compiled_filter().hex(),
            "env": base_env,
            "limits": {"disk": limits.disk, "inodes": limits.inodes, "open_files": limits.open_files,
                       "pids": limits.pids, "cpu_seconds": int(limits.lifetime * max(1.0, limits.cpu)) + 1},
        }
        await sandbox.channel.send({"t": "config", "config": config})
        msg = await self._expect(sandbox, "unshared")
        pid = int(msg["pid"])
        if pid != sandbox.pid:
            raise SandboxCrashed("boot reported pid %d, expected %d" % (pid, sandbox.pid))
        await asyncio.to_thread(self._map_ids, pid, sandbox._uid_slot)
        await asyncio.to_thread(sandbox.cgroup.add, pid)
        await sandbox.channel.send({"t": "go"})
        seen = {}
        while len(seen) < 2:  # "init" (from the boot process) and "ready" (from pid 1), in either order
            msg = await self._expect(sandbox, ("init", "ready"))
            seen[msg["t"]] = msg
        sandbox.adopt_init(int(seen["init"]["pid"]))

    @staticmethod
    def _map_ids(pid: int, slot: Optional[UidSlot]) -> None:
        proc = Path("/proc/%d" % pid)
        if slot is not None:
            mapping = "0 %d %d\n" % (slot.base, UID_SPAN)
            (proc / "uid_map").write_text(mapping)
            (proc / "gid_map").write_text(mapping)
        else:  # unprivileged: our own uid/gid become the sandbox user's, nothing else is mapped
            (proc / "setgroups").write_text("deny")
            (proc / "uid_map").write_text("1000 %d 1\n" % os.getuid())
            (proc / "gid_map").write_text("1000 %d 1\n" % os.getgid())

    @staticmethod
    async def _expect(sandbox: ProcessSandbox, kind) -> dict:
        item = await sandbox.channel.control.get()
        if item is CLOSED:
            raise SandboxCrashed("sandbox died while booting: " + str(sandbox.channel.closed_reason))
        header, _ = item
        if header.get("t") == "boot_error":
            raise HostUnsupported("sandbox setup failed: %s" % header.get("error"))
        if header.get("t") not in ((kind,) if isinstance(kind, str) else kind):
            raise SandboxCrashed("unexpected boot message %r" % header.get("t"))
        return header


