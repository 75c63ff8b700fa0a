"""The process tier: namespaces + seccomp + Landlock + cgroups + rlimits, one exec'd interpreter per sandbox.

``ProcessBackend.start()`` returns a ``ProcessSandbox``, a Popen-like handle: a channel to the agent,
``kill()``, ``wait()``, ``returncode``, limits and the cgroup's counters (the interface in base.py).
Its sandboxes end with their owner, unless the backend is durable (a server's): then a sandbox given a lease
outlives its owner's process and ``adopt()`` takes it back in the next one. It declares no pause.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Mapping, Optional, Sequence

from .. import _config
from .._exceptions import HostUnsupported, InvalidRequest, SandboxCrashed, SandboxNotFound, TimeoutError
from .._host import cgroups, pidfds
from .._host.channel import Channel
from .._host.zygote import Zygote, write_id_maps
from .._agent import linux
from .._agent.isolation import USER_UID
from .._limits import Limits
from .._storage.grants import PreparedMounts
from .._templates import Template
from ._common import (AGENT_DIR, CgroupSandbox, boot_message, is_sandbox_id, new_sandbox_id, sandbox_config,
                      sandbox_env, state_dir, template_config)
from .base import Backend, Capabilities

__all__ = ["ProcessBackend", "ProcessSandbox", "UidSlot", "UID_BASE", "UID_SPAN", "state_dir"]

BOOT_TIMEOUT = 20.0
ADOPT_TIMEOUT = 5.0  # a sandbox whose owner just died may need a moment to notice and offer a new channel
UID_BASE = 0x10000000  # host uids for sandboxes start at 268435456: far above any real account
UID_SPAN = 65536
UID_SLOTS = 8192


class UidSlot:
    """A private range of host uids for one sandbox, held by a lock file so no two sandboxes share it."""

    def __init__(self) -> None:
        locks = state_dir() / "uids"
        locks.mkdir(exist_ok=True)
        start = secrets.randbelow(UID_SLOTS)
        for i in range(UID_SLOTS):
            slot = (start + i) % UID_SLOTS
            # Read-only: a sandbox's pid 1 holds a copy of this descriptor (its range stays taken while it lives).
            fd = os.open(locks / str(slot), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
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


class ProcessSandbox(CgroupSandbox):
    """A live sandbox. ``pid`` is its outermost process on the host (the boot process, or the
    zygote's child, itself pid 1); pid 1 of the sandbox is held by pidfd and killing it ends everything."""

    isolation = "process"

    def __init__(self, sandbox_id: str, limits: Limits, pid: int, channel: Channel, cgroup: cgroups.Cgroup,
                 popen: Optional[subprocess.Popen] = None, release=None, template: str = "python",
                 pidfd: Optional[int] = None) -> None:
        self.id = sandbox_id
        self.template = template
        self.limits = limits
        self.channel = channel
        self.cgroup = cgroup
        self._pid = pid
        self._popen = popen  # set when we exec'd it ourselves (we reap it); zygote children reap elsewhere
        self._release = release
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        self._pidfd = os.pidfd_open(pid) if pidfd is None else pidfd
        loop.add_reader(self._pidfd, self._on_exit)
        self.killed_reason: Optional[str] = None
        self._cleaned = False
        self._init_pidfd: Optional[int] = None
        self.init_pid: Optional[int] = None  # pid 1 of the sandbox, as the host sees it
        self.spare_fd: Optional[int] = None  # where pid 1 keeps a channel for its next owner (agent server.py)
        self.created_at = time.monotonic()

    def describe(self) -> dict:
        """Enough for a later process to take this sandbox back (``ProcessBackend.adopt``) if it outlives us."""
        return dict(super().describe(), init_pid=self.init_pid, spare_fd=self.spare_fd,
                    cgroup={name: str(path) for name, path in self.cgroup.dirs.items()})

    def resize_scratch(self, size: int) -> None:
        """Give the sandbox's tmpfs a new size, from the host: its superblock is picked through pid 1's root
        (/proc/PID/root/tmp, a mount point the sandbox cannot change) and reconfigured in place (host root may:
        the sandbox's user namespace is a child of ours). Nothing runs in the sandbox's namespaces: no binary
        of its root (an image's) is ever executed with the host's privileges."""
        fd = os.open(f"/proc/{self.init_pid}/root/tmp", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # Still our pid 1 once the path is held (a pid reused meanwhile would name another process's tree),
            # and not the host's own /tmp.
            signal.pidfd_send_signal(self._init_pidfd if self._init_pidfd is not None else self._pidfd, 0)
            if os.fstat(fd).st_dev == os.stat("/tmp").st_dev:
                raise OSError(errno.EINVAL, "the sandbox's /tmp is the host's: not resized")
            linux.reconfigure_fd(fd, "size", str(size))
        finally:
            os.close(fd)

    def adopt_init(self, pid: int) -> None:
        """Hold pid 1 of the sandbox by pidfd, so killing it can never hit a recycled pid."""
        self.init_pid = pid
        if pid == self._pid:  # a zygote's fork born pid 1 (boot.py _born_pid1): held by pidfd since its fork
            return
        self._init_pidfd = os.pidfd_open(pid)
        if self._popen is None:
            # Forked from a zygote that runs threads, the outer process exits once pid 1 exists: from
            # now on the sandbox lives exactly as long as its pid 1.
            loop = asyncio.get_running_loop()
            try:
                loop.remove_reader(self._pidfd)
            except Exception:
                pass
            os.close(self._pidfd)
            self._pidfd, self._init_pidfd = self._init_pidfd, None
            self._pid = pid
            # The outer process may already have exited (it does so on purpose): that was not the
            # sandbox ending, so its exit must not count.
            if self._exited.done():
                self._exited = loop.create_future()
            loop.add_reader(self._pidfd, self._on_exit)

    @property
    def pid(self) -> int:
        return self._pid

    def netns_pid(self) -> int:
        """pid 1 of the sandbox: its network namespace is the sandbox's (the host configures it)."""
        if self.init_pid is None:
            raise SandboxCrashed(f"sandbox {self.id} has no pid 1 yet")
        return self.init_pid

    @property
    def returncode(self) -> Optional[int]:
        if self._popen is not None:
            return self._popen.poll()
        return -9 if self._exited.done() else None

    def _on_exit(self) -> None:
        # The pidfd turns readable when the process exits.
        if self._popen is not None:
            self._popen.poll()
        asyncio.get_running_loop().remove_reader(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def kill(self, reason: str = "killed") -> None:
        """End the sandbox: when this returns, none of its code can run any more.

        SIGKILL goes to pid 1 (its pid namespace dies with it), to the outer process, and to every
        process the cgroup lists (so nothing runs on while pid 1 tears down). Reaping, tearing down
        the address spaces and removing the cgroup finish in the background, within milliseconds.
        """
        if self.killed_reason is None:
            self.killed_reason = reason
        if self._cleaned:
            return
        self._cleaned = True
        for fd in (self._init_pidfd, self._pidfd):
            if fd is None:
                continue
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.cgroup.signal_all(signal.SIGKILL)
        self.on_cleanup(asyncio.get_running_loop().create_task(self._reap_and_cleanup()))

    async def _reap_and_cleanup(self) -> None:
        try:
            await asyncio.wait_for(self._wait_init_or_outer(), 10)
        except asyncio.TimeoutError:
            pass
        await self._cleanup()

    async def _wait_init_or_outer(self) -> None:
        if self._init_pidfd is None:
            await self.wait()
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(self._init_pidfd, lambda: done.done() or done.set_result(None))
        outer = asyncio.ensure_future(self.wait())
        try:
            await asyncio.wait({done, outer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            outer.cancel()
            loop.remove_reader(self._init_pidfd)

    async def _cleanup(self) -> None:
        await self.channel.aclose()
        await self.remove_cgroup()
        try:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        except Exception:
            pass
        os.close(self._pidfd)
        if self._init_pidfd is not None:
            os.close(self._init_pidfd)
            self._init_pidfd = None
        if self._popen is not None:
            self._popen.poll()  # it has exited (the pidfd said so): this reaps it
        if self._release is not None:
            self._release()
        self.release_grants()


async def _in_thread(func, *args, undo):
    """``await asyncio.to_thread(func, *args)``, except that a caller cancelled meanwhile does not
    abandon what the thread makes: ``undo`` gets it when it arrives (a thread cannot be stopped)."""
    job = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        def settle(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                undo(done.result())

        job.add_done_callback(settle)
        raise


def _make_cgroup(sandbox_id: str, limits: Limits, background: bool) -> cgroups.Cgroup:
    """The sandbox's cgroup; ``background`` (a warm pool's boot, nobody waiting): a low CPU weight until claimed."""
    cgroup = cgroups.Cgroup(sandbox_id, limits)
    if background:
        try:
            cgroup.set_background(True)
        except BaseException:
            cgroup.try_remove()  # nothing runs in it yet
            raise
    return cgroup


def _fork_with(zygote: Zygote, config: dict, channel_end: socket.socket,
               mounts: Optional[PreparedMounts], cgroup: cgroups.Cgroup) -> tuple[int, int]:
    """The zygote's fork, placed in its cgroup in the same worker-thread hop (it waits for "go" meanwhile)."""
    try:
        pid, slot = zygote.fork(config, channel_end, mounts.detached if mounts is not None else None)
    finally:
        channel_end.close()
    try:
        cgroup.add(pid)
    except BaseException:
        zygote.release_slot(slot)  # it never gets "go": it exits when its channel closes
        raise
    return pid, slot


class ProcessBackend(Backend):
    """Sandboxes are forks of a per-template zygote (the fast path) or, with ``zygote=False`` (here, in
    the template, or ``SANDLOT_ZYGOTE=0``) or for a template without a preload list, exec'd one by one."""

    name = "process"
    capabilities = Capabilities(fork=True, network=True, outlive=True)
    _swept = False

    def __init__(self, zygote: Optional[bool] = None) -> None:
        super().__init__()
        # One zygote per template, shared by every event loop of the engine that owns this backend.
        self._zygotes: dict[str, Zygote] = {}
        self._zygotes_lock = threading.Lock()
        if not ProcessBackend._swept:
            ProcessBackend._swept = True
            cgroups.sweep_stale()
        self._zygote_choice = zygote  # None: follow SANDLOT_ZYGOTE, read at each start

    @property
    def use_zygote(self) -> bool:
        return _config.use_zygote() if self._zygote_choice is None else self._zygote_choice

    @use_zygote.setter
    def use_zygote(self, enabled: Optional[bool]) -> None:
        self._zygote_choice = enabled

    def zygote_for(self, template: Template) -> Zygote:
        config = template_config(template, {})
        key = hashlib.sha256(json.dumps([template.python, config], sort_keys=True).encode()).hexdigest()[:16]
        with self._zygotes_lock:
            zygote = self._zygotes.get(template.key)
            if zygote is not None and zygote.key != key:
                # The template changed: new sandboxes come from a new zygote. The old one goes (its
                # live sandboxes do not depend on it; its uid range stays held while we run, for them).
                threading.Thread(target=zygote.stop, daemon=True).start()
                zygote = None
            if zygote is None:
                # The range's lock is held for as long as this process runs, and by every sandbox forked.
                uid_slot = UidSlot() if os.geteuid() == 0 else None
                uid_map = (uid_slot.base, UID_SPAN) if uid_slot is not None else None
                argv = [template.python, "-I", "-S", "-B", str(AGENT_DIR / "boot.py")]
                zygote = self._zygotes[template.key] = Zygote(argv, config, uid_map, key,
                                                               uid_slot.fd if uid_slot is not None else None)
        return zygote

    def zygote(self, template: str) -> Optional[Zygote]:
        """The zygote this backend runs for ``template`` ("python", or "python/lean" for its lean variant; None
        before its first fork)."""
        with self._zygotes_lock:
            return self._zygotes.get(template)

    def close(self) -> None:
        """Stop the zygotes (their sandboxes live on: each ends with its owner; the keepers reap them)."""
        with self._zygotes_lock:
            zygotes, self._zygotes = list(self._zygotes.values()), {}
        for zygote in zygotes:
            zygote.stop()

    def forks(self, template: Template) -> bool:
        """Its sandboxes are forked from a zygote: it preloads modules (or is the lean variant of a template that
        does), and it is not an image's (those start directly: their agent is the image's own interpreter)."""
        return (self.use_zygote and template.zygote and not template.rootfs
                and bool(template.preload or template.variant == "lean"))

    def lean(self, template: Template) -> Optional[Template]:
        """The lean variant of ``template`` (nothing preloaded, a cheaper fork), where this tier forks it from a
        zygote; None where it would not be cheaper (no preload, no zygote, an image's root)."""
        if self.forks(template) and not template.variant:
            return template.lean()
        return None

    async def prepare(self, template: Template) -> None:
        """Start the template's zygote now (the first sandbox then forks at once)."""
        if self.forks(template):
            await asyncio.to_thread(self.zygote_for(template).ensure_started)

    async def start(self, template: Template, limits: Limits, env: dict[str, str], *,
                    awaited: bool = False, network: bool = False,
                    mounts: Optional[PreparedMounts] = None) -> ProcessSandbox:
        sandbox_id = new_sandbox_id()
        mount_fds: list = []
        late_env: dict = {}  # sent once booted (a zygote's fork)
        cgroup = await _in_thread(_make_cgroup, sandbox_id, limits, not awaited, undo=lambda made: made.remove())
        host_end, child_end = socket.socketpair()
        env_inside = sandbox_env(template, env)
        try:
            # Image templates start directly (the warm pool still applies): their agent ends up
            # as the image's own interpreter, which a zygote of the host's could not fork into.
            if self.forks(template):
                zygote = self.zygote_for(template)  # (started, or restarted if it died, by its first fork)
                # The thread gets its own copy of the channel's far end: a cancelled create closes ours at
                # once, while the fork may still be sending it. A slot taken by a fork nobody waits for
                # any more goes back (that child sees its channel closed and exits).
                # The owner's environment never passes through the zygote: it serves every owner of the
                # template (every tenant of a server), and what its heap keeps of one request (freed, not
                # cleared) each later fork copies. It follows on the sandbox's own channel once booted, as
                # a warm sandbox's does.
                config = sandbox_config(limits, sandbox_env(template, {}))
                late_env = env
                if mounts is not None:
                    config["mounts"] = mounts.plan()
                pid, slot = await _in_thread(_fork_with, zygote, config, child_end.dup(), mounts, cgroup,
                                             undo=lambda done: zygote.release_slot(done[1]))
                maps = "zygote"  # the zygote wrote the nested maps itself
                popen, release = None, (lambda: zygote.release_slot(slot))
            elif template.uid_base is not None and os.geteuid() == 0:
                # A build step: the builder holds this uid range and shifted its copy of the root onto it.
                popen = self._exec_boot(template, child_end)
                pid = popen.pid
                maps, release = [(0, template.uid_base, UID_SPAN)], None
            else:
                uid_slot = UidSlot() if os.geteuid() == 0 else None
                try:
                    if mounts is not None:
                        user = uid_slot.base + USER_UID if uid_slot else os.getuid()
                        # (a create cancelled meanwhile: the thread's copies are closed, not left holding a volume)
                        mount_fds = await _in_thread(mounts.detached, user, undo=lambda fds: [os.close(f) for f in fds])
                    popen = self._exec_boot(template, child_end, mount_fds, uid_slot.fd if uid_slot else None)
                except BaseException:  # no sandbox will hold the range: give it back now
                    if uid_slot is not None:
                        uid_slot.release()
                    raise
                pid = popen.pid
                maps = uid_slot and [(0, uid_slot.base, UID_SPAN)]
                release = uid_slot.release if uid_slot else None
        except BaseException:
            host_end.close()
            await asyncio.to_thread(cgroup.remove)
            raise
        finally:
            child_end.close()
            for fd in mount_fds:  # the boot process has its own copies
                os.close(fd)
        channel = Channel(host_end)
        await channel.open()
        sandbox = ProcessSandbox(sandbox_id, limits, pid, channel, cgroup, popen, release, template.name)
        sandbox.storage_bytes = limits.storage()
        sandbox.on_cleanup = self.track_cleanup
        sandbox.grants = mounts
        try:
            if popen is not None:
                config = dict(template_config(template, env), **sandbox_config(limits, env_inside))
                config["durable"] = self.durable
                if popen.uid_lock is not None:
                    config["uid_lock_fd"] = popen.uid_lock
                if mounts is not None:
                    config["mounts"] = [dict(m, fd=fd) for m, fd in zip(mounts.plan(), mount_fds)]
                await channel.send({"t": "config", "config": config})
            await asyncio.wait_for(self._boot(sandbox, maps), BOOT_TIMEOUT)
            if late_env:  # its first message, ahead of anyone's code
                await channel.send({"t": "configure", "id": 0, "env": late_env})
        except asyncio.TimeoutError:
            await sandbox.kill("boot timed out")
            raise TimeoutError("sandbox did not boot within %.0f s" % BOOT_TIMEOUT) from None
        except BaseException:
            await sandbox.kill("boot failed")
            raise
        return sandbox

    @staticmethod
    def _exec_boot(template: Template, child_end: socket.socket, mount_fds: Sequence[int] = (),
                   uid_lock: Optional[int] = None) -> subprocess.Popen:
        # Boot/agent crashes print to stderr; keep them only when asked (debugging a host).
        log = _config.boot_log()
        stderr = open(log, "ab") if log else subprocess.DEVNULL
        # An image's python is a path inside the image: the host's own interpreter builds the
        # sandbox, then execs the image's (boot.py _exec_agent).
        interpreter = sys.executable if template.rootfs else template.python
        held = [uid_lock] if uid_lock is not None else []
        try:
            popen = subprocess.Popen(
                [interpreter, "-I", "-S", "-B", str(AGENT_DIR / "boot.py"), str(child_end.fileno())],
                pass_fds=[child_end.fileno(), *mount_fds, *held], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                cwd="/", start_new_session=True)  # a Ctrl-C at the owner's terminal is for the owner, not for it
            popen.uid_lock = uid_lock  # type: ignore[attr-defined]  (its number in the child: pass_fds keeps it)
            return popen
        finally:
            if log:
                stderr.close()

    async def _boot(self, sandbox: ProcessSandbox, maps) -> None:
        msg = await self._expect(sandbox, "unshared")
        if int(msg["pid"]) != sandbox.pid:
            raise SandboxCrashed("boot reported pid %s, expected %d" % (msg["pid"], sandbox.pid))
        if maps != "zygote":  # a zygote's fork has its maps and its cgroup already (_fork_with)
            await asyncio.to_thread(self._place, sandbox, maps)
        await sandbox.channel.send({"t": "go"})
        seen = {}
        while len(seen) < 2:  # "init" (from the outer process, or pid 1 itself) and "ready" (from pid 1), in either order
            msg = await self._expect(sandbox, ("init", "ready"))
            seen[msg["t"]] = msg
        sandbox.adopt_init(int(seen["init"]["pid"]))
        spare = seen["ready"].get("spare_fd")
        sandbox.spare_fd = spare if isinstance(spare, int) and not isinstance(spare, bool) else None

    @staticmethod
    def _place(sandbox: ProcessSandbox, maps) -> None:
        write_id_maps(sandbox.pid, maps)
        sandbox.cgroup.add(sandbox.pid)

    async def adopt(self, record: Mapping[str, Any]) -> ProcessSandbox:
        """A live sandbox an earlier process left (a durable one, whose owner died or shut down): its pid 1
        is found by the record's pid and proven by its cgroup, and the channel it keeps for its next owner
        is taken with pidfd_getfd. SandboxNotFound when it ended (or never outlived its owner)."""
        sandbox_id = record.get("id")
        init_pid, spare = record.get("init_pid"), record.get("spare_fd")
        if not is_sandbox_id(sandbox_id):
            raise InvalidRequest(f"not a sandbox id: {sandbox_id!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (init_pid, spare)):
            raise SandboxNotFound(f"sandbox {sandbox_id} cannot be taken back: no pid 1 on record")
        try:
            limits = Limits.build(record.get("limits") or {})
            cgroup = cgroups.Cgroup.existing(sandbox_id, record.get("cgroup"))
        except (InvalidRequest, LookupError) as exc:
            raise SandboxNotFound(f"sandbox {sandbox_id} is gone: {exc}") from None
        try:
            pidfd = os.pidfd_open(init_pid)
        except ProcessLookupError:
            raise SandboxNotFound(f"sandbox {sandbox_id} is gone: its pid 1 ended") from None
        try:
            # The pid names our sandbox only if that process is in its cgroup (a pid can be reused); held by
            # pidfd first, so it cannot change under the check.
            if init_pid not in cgroup.pids():
                raise SandboxNotFound(f"sandbox {sandbox_id} is gone: its pid 1 ended")
            sock = await asyncio.to_thread(pidfds.take_socket, pidfd, spare, ADOPT_TIMEOUT)
        except BaseException:
            os.close(pidfd)
            raise
        if sock is None:
            os.close(pidfd)
            raise SandboxNotFound(f"sandbox {sandbox_id} did not offer a channel: it ends with its owner")
        channel = Channel(sock)
        await channel.open()
        sandbox = ProcessSandbox(sandbox_id, limits, init_pid, channel, cgroup, template=str(record.get("template")),
                                 pidfd=pidfd)
        sandbox.init_pid, sandbox.spare_fd = init_pid, spare
        sandbox.storage_bytes = limits.storage()
        sandbox.on_cleanup = self.track_cleanup
        if not await channel.ping(ADOPT_TIMEOUT):
            await sandbox.kill("it did not answer its new owner")
            raise SandboxNotFound(f"sandbox {sandbox_id} did not answer when taken back")
        return sandbox

    @staticmethod
    async def _expect(sandbox: ProcessSandbox, kind) -> dict:
        header = await boot_message(sandbox.channel)
        if header.get("t") not in ((kind,) if isinstance(kind, str) else kind):
            raise SandboxCrashed("unexpected boot message %r" % header.get("t"))
        return header
