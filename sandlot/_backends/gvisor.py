"""The strong tier: the same agent under gVisor's ``runsc`` (a user-space kernel between the code and the host).

runsc gives the container its namespaces, a read-only root (host paths bound through its gofer) and no
network (``--network=none``); the agent adds no_new_privs, rlimits and the seccomp allowlist inside.

A sandbox with a network (``Sandbox(network=..., secrets=...)``) is booted differently: the host makes a
network namespace for it first (a holder process, sandlot/_net/holder.py), configures it as the process
tier's (lo, routes to lo, nftables redirecting DNS and TCP to the broker: sandlot/_net/netns.py), and runsc
runs with ``--network=host`` and the spec's network namespace naming THAT namespace, so the sentry's
sockets are host sockets there and the same broker serves them (SO_ORIGINAL_DST sees the sentry's real
connect()). The code never holds a host socket: gVisor's own netlink gives it no way to change routes or
rules, and raw sockets stay off (no ``--net-raw``). Sandboxes without a network keep ``--network=none``
(gVisor's netstack with only a loopback; a smaller surface), so the warm pool never serves a network create,
and a sandbox made without one cannot be given one later. The cgroup of a sandbox with a network gives host
socket buffers their share of the memory limit (cgroup v1), as the process tier's does: at zero (right for
gVisor's own netstack) the kernel drops every datagram to the sentry's sockets and DNS never answers. Such
a sandbox cannot be paused: host sockets and the broker do not survive a checkpoint.

Who is who inside: gVisor (Debian's 2022 runsc) does not shield pid 1 from its own container's
signals as Linux shields an init, so code running as the agent's uid could SIGKILL or SIGSTOP it. The
agent therefore starts as gVisor-internal root with only CAP_SETUID/SETGID/SETPCAP, empties the
bounding set and takes the user's uid as its *effective* id only (real and saved stay 0, every
capability dropped): it reads and writes files as the user, while the user's code, whose ids are all
1000, may not signal or trace it. That root is gVisor's, never the host's.

Writable storage: gVisor's tmpfs of that release ignores ``size=``, so home, /tmp and /dev/shm are
three directories of one host tmpfs per sandbox (size and inode caps enforced by the host kernel,
one quota for all three as on the process tier), bound in through the gofer. It stays mounted while
the sandbox is paused (a checkpoint holds memory, not gofer files) and is unmounted when runsc ends
for good (killed, or ended by its keeper); a sweep removes the directories that dead keepers left behind.

The channel is the container's stdin/stdout: host pipes, which is also what lets ``runsc
checkpoint``/``restore`` pause a live session to disk and bring it back, even into a later process.
The owner does not hold those pipes: a keeper does (sandlot/_host/keeper.py, one small process per
sandbox, outside its cgroup), relaying whole frames to the owner connected on its socket. So a sandbox
with a lease outlives its owner's death, and a later owner (a restarted server) connects again
(``GVisorBackend.adopt``); one without a lease ends with its owner, as before.

Limits: the whole runsc process tree joins the sandbox's cgroup before runsc starts (a shell
trampoline writes its pid, then execs runsc; the keeper, outside the cgroup, unmounts the
sandbox's tmpfs once runsc ends for good), so memory and CPU cover gVisor's own work too. runsc's
threads get room in ``pids.max``; the app's own process limit is RLIMIT_NPROC inside (a tight pids.max
would make gVisor itself fail).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from .. import _config
from .._exceptions import HostUnsupported, InvalidRequest, SandboxCrashed, SandboxNotFound, TimeoutError
from .._host import cgroups, keeper
from .._host.channel import Channel
from .._limits import Limits
from .._net import netns
from .._net.holder import NetnsHolder
from .._agent import linux
from .._agent.isolation import USER_UID
from .._storage import mountpoints
from .._storage.grants import PreparedMounts
from .._templates import Template, data_root
from ._common import (AGENT_DIR, CgroupSandbox, boot_message, image_config, is_sandbox_id, new_sandbox_id,
                      sandbox_config, sandbox_env, template_config)
from . import gvisor_fork
from .base import Backend, Capabilities

BOOT_TIMEOUT = 60.0  # runsc start plus importing the preload list under ptrace
RUNSC_PIDS_ROOM = 1024  # threads of the sentry and the gofer, on top of the app's own limit
ETC_FILES = ("passwd", "group", "hosts", "hostname", "resolv.conf")
AGENT_CAPS = ["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"]  # only to become the user; dropped at boot
# gVisor's own share of a sandbox's memory (the sentry and gofer, ~60 MiB measured with a full 192 MiB tmpfs
# at memory=256M): kept out of the room files may take, so a full disk is ENOSPC, never an OOM kill.
SENTRY_MEMORY = 96 * 1024**2
WRITABLE = {"home": ("/home/user", 0o700), "tmp": ("/tmp", 0o1777), "shm": ("/dev/shm", 0o1777)}
KEEPER_READY_WITHIN = 30.0  # the keeper is a small stdlib script: ready in well under a second
ADOPT_PING_WITHIN = 30.0  # the agent's loop answers a ping even while code runs; ptrace makes it slow


def runsc_path() -> str:
    path = _config.runsc() or shutil.which("runsc") or "/usr/bin/runsc"
    if not os.access(path, os.X_OK):
        raise HostUnsupported("isolation='gvisor' needs runsc (Debian package `runsc`); not found")
    return path


def data_dir() -> Path:
    """Durable state (checkpoint images of paused sandboxes): survives restarts of the owning process."""
    path = data_root() / "gvisor"  # the same data dir as the image templates
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _runsc_argv(*args: str, network: str = "none") -> list[str]:
    platform = _config.gvisor_platform()  # "kvm" where /dev/kvm really works
    if platform == "kvm":
        from .._host import kvm

        why = kvm.why_not_for_gvisor()
        if why is not None:  # runsc would hang rather than fail: say so instead
            raise HostUnsupported(f"SANDLOT_GVISOR_PLATFORM=kvm cannot work here: {why}. Use ptrace (the default).")
    # --ignore-cgroups: runsc would otherwise move itself into a cgroup of its own, outside our limits.
    return [runsc_path(), "--root", str(data_dir() / "runsc"), f"--network={network}", "--ignore-cgroups",
            f"--platform={platform}", *args]


def _template_rootfs(template: Template) -> Path:
    """An empty skeleton with the mount points the spec binds onto, plus the generated /etc files."""
    key = hashlib.sha256(json.dumps([2, template.name, template.python, template.prefixes]).encode()).hexdigest()[:16]
    root = data_dir() / "roots" / key
    if root.is_dir():  # built under another name and renamed into place: complete once it exists
        return root
    tmp = root.with_name(key + ".tmp-" + secrets.token_hex(4))
    for d in ("usr", "etc", "proc", "dev", "tmp", "home/user", "opt/sandlot/_agent", "sys"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    (tmp / "home/user").chmod(0o777)
    for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            (tmp / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            (tmp / name).mkdir()
    for prefix in template.prefixes:
        (tmp / prefix.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for name in _etc_binds():
        (tmp / "etc" / name).touch() if Path("/etc", name).is_file() else (tmp / "etc" / name).mkdir(exist_ok=True)
    files = {
        "passwd": "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
        "group": "root:x:0:\nuser:x:1000:\n", "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
        "hostname": "sandbox\n", "resolv.conf": ""}
    for name, text in files.items():
        (tmp / "etc" / name).write_text(text)
    try:
        tmp.rename(root)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _root_with_mount_points(rootfs: Path, home: Path, targets: list, image: bool) -> Path:
    """The root to boot, with a directory for each mount target: runsc makes a missing one only where it can
    write (home, /tmp), not in the read-only root. A template's skeleton is small: this sandbox gets a copy
    of its own with the targets added (never the shared one: other sandboxes would see their names). An
    image's root is not copied: a target there must exist in the image or lie under /home/user or /tmp."""
    outside = [t for t in targets if not any(t.startswith(area + "/") for area in ("/home/user", "/tmp", "/dev/shm"))]
    for target in outside:  # runsc resolves symlinks inside the root; ours must not follow them on the host
        path = rootfs
        for part in target.strip("/").split("/"):
            path = path / part
            if path.is_symlink():
                raise InvalidRequest(f"mount target {target!r} passes through a symlink in the template's root")
    missing = [t for t in outside if not (rootfs / t.lstrip("/")).is_dir()]
    if not missing:
        return rootfs
    if image:
        raise InvalidRequest(f"mount target {missing[0]!r} does not exist in this image: on the gVisor tier an "
                             "image template's targets must exist in the image or lie under /home/user or /tmp")
    own = home / "root"
    shutil.copytree(rootfs, own, symlinks=True)
    for target in missing:
        (own / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return own


def _etc_binds() -> list[str]:
    from .._agent import isolation

    return [n for n in isolation.ETC_ENTRIES if n not in ETC_FILES and Path("/etc", n).exists()
            and not Path("/etc", n).is_symlink()]


def _spec(template: Template, limits: Limits, env: dict[str, str], rootfs: Path, writable: Path,
          netns_path: Optional[str] = None, grants: tuple = ()) -> dict:
    def bind(src: str, dst: Optional[str] = None, mode: str = "ro") -> dict:
        return {"destination": dst or src, "type": "bind", "source": src, "options": ["rbind", mode, "nosuid", "nodev"]}

    mounts: list[dict] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        # runsc mounts its own sysfs unless the spec puts something at /sys: an empty, closed tmpfs.
        {"destination": "/sys", "type": "tmpfs", "source": "tmpfs", "options": ["ro", "nosuid", "nodev", "mode=000"]},
    ]
    mounts += [bind(str(writable / name), inside, "rw") for name, (inside, _) in WRITABLE.items()]
    if template.rootfs:
        # An image template: the image's root is the container's root (prepared on the host when it
        # was unpacked: real mount points, generated /etc files); the agent, and the host's
        # interpreter only for an image without Python, are bound on top.
        launch = image_config(template)
        mounts.append(bind(str(AGENT_DIR), "/opt/sandlot/_agent"))
        mounts += [bind(host, inside) for host, inside in launch["binds"]]
        argv = list(launch["exec"])
    else:
        for name in ("usr", "lib", "lib64", "lib32", "libx32", "bin", "sbin"):
            host = Path("/") / name
            if host.is_dir() and not host.is_symlink():
                mounts.append(bind(str(host)))
        mounts += [bind(f"/etc/{n}") for n in _etc_binds()]
        mounts += [bind(p) for p in template.prefixes]
        mounts.append(bind(str(AGENT_DIR), "/opt/sandlot/_agent"))
        argv = [template.python, "-I", "-S", "-B"]
    # Granted host directories and volumes: id-mapped copies attached on the host for this sandbox alone
    # (sandlot/_storage/grants.py), bound through the gofer; not recursive (exactly the grant).
    mounts += [{"destination": target, "type": "bind", "source": host,
                "options": ["rbind", "ro" if readonly else "rw", "nosuid", "nodev"]} for host, target, readonly in grants]
    namespaces: list[dict] = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]
    if netns_path is not None:  # runsc --network=host joins this one (never the host's: see holder.py)
        namespaces[1]["path"] = netns_path
    rlimits = [("RLIMIT_NOFILE", limits.open_files), ("RLIMIT_NPROC", limits.pids), ("RLIMIT_CORE", 0),
               ("RLIMIT_FSIZE", limits.storage(SENTRY_MEMORY))]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0},
            "args": argv + ["/opt/sandlot/_agent/boot.py", "0", "gvisor"],
            "env": [f"{k}={v}" for k, v in env.items()], "cwd": "/home/user",
            "capabilities": {"bounding": AGENT_CAPS, "effective": AGENT_CAPS, "permitted": AGENT_CAPS},
            "noNewPrivileges": True,
            "rlimits": [{"type": t, "hard": v, "soft": v} for t, v in rlimits],
        },
        "root": {"path": template.rootfs or str(rootfs), "readonly": True},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {"namespaces": namespaces},
    }


# -- per-sandbox state on the host: the writable tmpfs and the owner's lock ---------------------------
def _mount_writable(home: Path, limits: Limits) -> Path:
    """One host tmpfs with the sandbox's disk and inode caps, split into home, /tmp and /dev/shm."""
    rw = home / "rw"
    rw.mkdir()
    linux.mount("tmpfs", str(rw), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                f"size={limits.storage(SENTRY_MEMORY)},nr_inodes={limits.inodes},mode=0755")
    for name, (_, mode) in WRITABLE.items():
        (rw / name).mkdir()
        (rw / name).chmod(mode)
    os.chown(rw / "home", USER_UID, USER_UID)
    return rw


def _remove_home(home: Path) -> None:
    """Unmount the sandbox's tmpfs (if mounted) before deleting its directory: never rmtree into a mount."""
    rw = home / "rw"
    if os.path.ismount(rw):
        try:
            linux.umount2(str(rw), linux.MNT_DETACH)
        except OSError:
            return  # still mounted: leave the directory for the next sweep rather than delete into it
    shutil.rmtree(home, ignore_errors=True)


def _hold(home: Path) -> int:
    """The owner's lock on a live sandbox's directory (released when the owner ends or pauses it)."""
    fd = os.open(home / "owner.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _recorded_cgroup(home: Path) -> Optional[cgroups.Cgroup]:
    """The cgroup the sandbox of ``home`` was launched in (keeper.json), as it is; None if not recorded."""
    try:
        dirs = json.loads((home / "keeper.json").read_text())["cgroup"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(dirs, dict) or not all(isinstance(d, str) and d.startswith(str(cgroups.ROOT) + "/")
                                             and os.path.basename(d) == home.name for d in dirs.values()):
        return None
    try:
        return cgroups.Cgroup.existing(home.name, dirs, host_sockets=False)
    except LookupError:  # gone already
        return None


def _connect_keeper(home: Path) -> Optional[socket.socket]:
    """A connection to the keeper of the sandbox in ``home``, or None when no keeper answers there."""
    try:
        home_fd = os.open(home, os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(keeper.short_address(home_fd))
    except OSError:
        sock.close()
        return None
    finally:
        os.close(home_fd)
    return sock


def sweep_stale(min_age: float = 60.0) -> int:
    """Remove what owners that died left behind (runsc state, the tmpfs, the directory); paused
    sandboxes, and live ones (their owner holds the lock), are kept. Returns how many were removed."""
    removed = 0
    root = data_dir() / "sandboxes"
    for home in root.glob("sb-*") if root.is_dir() else []:
        try:
            paused = (home / "image").is_dir()
            if paused and not _expired_checkpoint(home):
                continue
            if not paused and time.time() - home.stat().st_mtime < min_age:
                continue
            fd = os.open(home / "owner.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live sandbox of another process
        try:
            # Its keeper is gone (it held the lock): whatever of the sandbox still runs ends with its cgroup.
            cgroup = _recorded_cgroup(home)
            if cgroup is not None:
                cgroup.kill_all()
            subprocess.run(_runsc_argv("delete", "-force", home.name), capture_output=True, timeout=60)
            if cgroup is not None:
                cgroup.try_remove()
            _remove_home(home)
            if paused:  # its (empty) cgroup waited with it
                cgroups.remove_named({home.name})
            removed += 1
        finally:
            os.close(fd)
    mountpoints.sweep(data_dir() / "grants")  # granted directories a dead owner left attached
    return removed


def _hibernation(meta: Mapping[str, Any]) -> dict:
    """What an owner kept beside a checkpoint (meta.json): its deadline (wall clock) and its on_idle."""
    kept = {}
    if isinstance(meta.get("expires_at"), (int, float)):
        kept["expires_at"] = float(meta["expires_at"])
    if meta.get("on_idle") in ("kill", "pause"):
        kept["on_idle"] = meta["on_idle"]
    return kept


def _expired_checkpoint(home: Path) -> bool:
    """A paused sandbox past its lifetime, which no owner ended (its owner had exited): the sweep's."""
    try:
        expires_at = _hibernation(json.loads((home / "meta.json").read_text())).get("expires_at")
    except (OSError, ValueError, AttributeError):
        return False
    return expires_at is not None and time.time() >= expires_at


class GVisorSandbox(CgroupSandbox):
    isolation = "gvisor"
    storage_overhead = SENTRY_MEMORY
    # What its owner keeps beside a checkpoint in meta.json ({"expires_at", "on_idle"}): a later owner
    # honours them (replaced, never changed in place).
    hibernation: Mapping[str, Any] = {}

    def __init__(self, sandbox_id: str, limits: Limits, cgroup: cgroups.Cgroup, home: Path,
                 template: str = "python") -> None:
        self.id = sandbox_id
        self.template = template
        self.limits = limits
        self.cgroup = cgroup
        self.home = home  # bundle/, image/ and meta.json of this sandbox
        self.channel: Channel = Channel((None, None))
        self.killed_reason: Optional[str] = None
        self._paused = False
        self._proc: Optional[subprocess.Popen] = None  # the keeper, when this process started it
        self._keeper_pid = -1  # the keeper (sandlot/_host/keeper.py): holds runsc and the channel's far end
        self._exited: Optional[asyncio.Future] = None
        self._pidfd: Optional[int] = None  # the keeper's, also when it is not our child (adopted)
        self._cleaned = False
        self._lock_fd: Optional[int] = None
        self._netns: Optional[NetnsHolder] = None  # the host-made namespace of a sandbox with a network

    def resize_scratch(self, size: int) -> None:
        """The sandbox's tmpfs is the host's own mount (home/rw): remounted here with a new size."""
        linux.reconfigure(str(self.home / "rw"), "size", str(size))

    def cgroup_limits(self, limits: Limits) -> Limits:
        """What the cgroup gets for these limits: pids.max leaves room for runsc's own threads."""
        return _room_for_runsc(limits)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def pid(self) -> int:
        """The keeper's pid: the sandbox lives while it does."""
        return self._keeper_pid

    @property
    def returncode(self) -> Optional[int]:
        """None while the keeper runs; then its status (runsc's), or -1 for an adopted keeper (not our
        child: its status is not ours to read)."""
        if self._proc is not None:
            return self._proc.poll()
        if self._exited is not None and self._exited.done():
            return self._exited.result()
        return None

    def netns_pid(self) -> int:
        """The holder of the namespace runsc's sentry lives in (made at boot for a sandbox with a network)."""
        if self._netns is None:
            raise InvalidRequest(f"gVisor sandbox {self.id} was made without a network, and a gVisor sandbox gets "
                                 "its network only at create (runsc's network mode is fixed at boot): "
                                 "create it with network=...")
        return self._netns.pid

    async def wait(self) -> int:
        assert self._exited is not None
        return await asyncio.shield(self._exited)

    async def _launch(self, *runsc_args: str) -> None:
        """Start runsc (run or restore) inside our cgroup under a keeper of its own, and connect to the keeper:
        the channel is the keeper's socket, relayed to the container's stdin/stdout (sandlot/_host/keeper.py)."""
        network = "host" if self._netns is not None else "none"  # host: the namespace _netns holds, see start()
        dirs = {controller: str(d) for controller, d in self.cgroup.dirs.items()}
        (self.home / "keeper.json").write_text(json.dumps({"cgroup": dirs}))  # for adopt() and the sweep
        config = {"home": str(self.home), "cgroups": list(dirs.values()),
                  "run": _runsc_argv(*runsc_args, network=network), "delete": _runsc_argv("delete", "-force", self.id)}
        log = _config.boot_log()
        stderr = open(log, "ab") if log else subprocess.DEVNULL
        try:
            # -I -S: no site, no environment; the keeper imports nothing of ours but the protocol module.
            # start_new_session: the owner's terminal signals (and its death) are not for it. The owner's
            # lock on the home goes to it (the same open file): the sweep keeps a home its keeper holds, and
            # a paused sandbox is free to resume once its keeper is gone, whoever owned it.
            self._proc = subprocess.Popen([sys.executable, "-I", "-S", keeper.__file__, json.dumps(config)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd="/",
                                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, start_new_session=True,
                                          pass_fds=(self._lock_fd,) if self._lock_fd is not None else ())
        finally:
            if log:
                stderr.close()
        self._release()  # the keeper holds the lock from now on, for as long as it (the sandbox) lives
        self._keeper_pid = self._proc.pid
        self._watch_keeper(os.pidfd_open(self._proc.pid))
        try:
            line = await asyncio.wait_for(_off_loop(self._proc.stdout.readline), KEEPER_READY_WITHIN)
        except asyncio.TimeoutError:
            line = b""
        self._proc.stdout.close()
        if line != b"ready\n":
            self._kill_keeper()
            raise SandboxCrashed(f"the keeper of gVisor sandbox {self.id} did not start")
        sock = _connect_keeper(self.home)
        if sock is None:
            raise SandboxCrashed(f"the keeper of gVisor sandbox {self.id} does not answer")
        self.channel = Channel(sock)
        await self.channel.open()

    def _watch_keeper(self, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        self._pidfd = pidfd
        loop.add_reader(pidfd, self._on_exit)

    def _on_exit(self) -> None:
        """The keeper ended (runsc had ended: killed, paused, or its owner went away without a lease)."""
        if self._pidfd is None:
            return
        if self._proc is not None:
            if self._proc.poll() is None:
                return
            rc = self._proc.returncode
        else:
            rc = -1  # not our child: its status is its parent's to read
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(rc)

    async def _run_runsc(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return await _off_loop(subprocess.run, _runsc_argv(*args), capture_output=True, text=True, timeout=timeout)

    # -- pause / resume -------------------------------------------------------------------------
    async def pause(self) -> dict:
        """Checkpoint the live session to disk (memory, open files, cwd) and stop it. Returns figures."""
        if self._netns is not None:
            raise InvalidRequest("a gVisor sandbox with a network cannot be paused: its host sockets and its "
                                 "broker do not survive a checkpoint")
        # The record a later owner adopts: the limits of now (a warm sandbox took its owner's at claim).
        self._write_meta()
        image = self.home / "image"
        shutil.rmtree(image, ignore_errors=True)
        image.mkdir()
        self._paused = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        out = await self._run_runsc("checkpoint", f"--image-path={image}", self.id, timeout=300)
        if out.returncode != 0:
            self._paused = False
            shutil.rmtree(image, ignore_errors=True)
            raise SandboxCrashed(f"runsc checkpoint failed: {out.stderr.strip()[-500:]}")
        try:
            await asyncio.wait_for(self.wait(), 30)
        except asyncio.TimeoutError:
            pass
        await self.channel.aclose()
        await self._run_runsc("delete", "-force", self.id)
        self._release()
        size = sum(f.stat().st_size for f in image.rglob("*") if f.is_file())
        return {"seconds": loop.time() - started, "bytes": size}

    async def resume(self) -> dict:
        if self._lock_fd is None:
            try:
                self._lock_fd = _hold(self.home)
            except OSError:
                raise InvalidRequest(f"sandbox {self.id} is being resumed by another process") from None
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._launch("restore", f"--image-path={self.home / 'image'}", f"--bundle={self.home / 'bundle'}",
                           self.id)
        self._paused = False
        # The agent does not know it slept; a ping proves the channel works end to end.
        if not await self.channel.ping(BOOT_TIMEOUT):
            await self.kill("restore failed")
            raise SandboxCrashed(f"sandbox {self.id} did not come back from its checkpoint")
        shutil.rmtree(self.home / "image", ignore_errors=True)
        return {"seconds": loop.time() - started}

    def _write_meta(self, env: Optional[Mapping[str, str]] = None) -> None:
        """meta.json: what ``GVisorBackend.adopt`` rebuilds this handle from (its describe(), kept on disk)."""
        path = self.home / "meta.json"
        meta = json.loads(path.read_text()) if env is None and path.exists() else {"env": dict(env or {})}
        meta.update(id=self.id, template=self.template, limits=self.limits.to_dict(), **self.hibernation)
        path.write_text(json.dumps(meta))

    # -- fork a live session (gvisor_fork.py) ----------------------------------------------------
    async def fork_live(self) -> "GVisorSandbox":
        """A new sandbox restored from a checkpoint of this one (gvisor_fork.py says how); this one runs on,
        or stays paused. Its own id, home, tmpfs (the files copied) and cgroup with these limits."""
        gvisor_fork.refuse_unforkable(self)
        child_id = new_sandbox_id()
        cgroup = await asyncio.to_thread(cgroups.Cgroup, child_id, _room_for_runsc(self.limits), host_sockets=False)
        home = data_dir() / "sandboxes" / child_id
        (home / "bundle").mkdir(parents=True)
        child = GVisorSandbox(child_id, self.limits, cgroup, home, self.template)
        child.on_cleanup = self.on_cleanup
        child._lock_fd = _hold(home)
        try:
            await asyncio.to_thread(_mount_writable, home, self.limits)
            child.storage_bytes = self.limits.storage(SENTRY_MEMORY)
            if self.storage_bytes and self.storage_bytes != child.storage_bytes:  # a claimed warm one was resized
                await asyncio.to_thread(child.resize_scratch, self.storage_bytes)
                child.storage_bytes = self.storage_bytes
        except BaseException:
            await asyncio.shield(child.kill("fork failed"))
            raise
        await gvisor_fork.copy_session(self, child, BOOT_TIMEOUT)
        return child

    # -- kill -----------------------------------------------------------------------------------
    async def kill(self, reason: str = "killed") -> None:
        if self.killed_reason is None:
            self.killed_reason = reason
        if self._cleaned:
            return
        self._cleaned = True
        # runsc, the sentry, the gofer: all in the cgroup. The keeper (outside it) sees runsc end, unmounts
        # the tmpfs and exits; _cleanup waits for that before it removes the rest.
        self.cgroup.signal_all(signal.SIGKILL)
        self.on_cleanup(asyncio.get_running_loop().create_task(self._cleanup()))

    async def _cleanup(self) -> None:
        try:
            if self._exited is not None:
                try:
                    await asyncio.wait_for(self.wait(), 10)
                except asyncio.TimeoutError:
                    self._kill_keeper()
            await self.channel.aclose()
            await self._run_runsc("delete", "-force", self.id)
            await self.remove_cgroup()
            await _off_loop(_remove_home, self.home)
            self._release()
            self.release_grants()
            if self._netns is not None:  # runsc is gone: the namespace ends with its holder
                await _off_loop(self._netns.close)
        except asyncio.CancelledError:
            # The owner's event loop is closing (asyncio.run returning, a test session ending) before the
            # cleanup could finish: the killed sandbox's tmpfs is detached now, not left for the next sweep
            # (lazily: runsc, already killed, keeps its reference only until it exits).
            _remove_home(self.home)
            self._release()
            self.release_grants()
            raise

    def _kill_keeper(self) -> None:
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except OSError:
                pass

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class GVisorBackend(Backend):
    name = "gvisor"
    # Pause is a checkpoint to disk: a later process takes a paused sandbox back (adopt). A network is
    # given at boot (runsc --network=host in a namespace made for it), so a warm sandbox never has one.
    # A live session forks by checkpoint (--leave-running) and restore under a new id (gvisor_fork.py).
    # Outlive: a keeper process holds each sandbox's channel, so a leased one outlives its owner (adopt()).
    capabilities = Capabilities(pause=True, checkpoint=True, network=True, fork_live=True, outlive=True)
    network_at_boot = True
    _swept = False

    async def start(self, template: Template, limits: Limits, env: dict[str, str], *,
                    awaited: bool = False, network: bool = False,
                    mounts: Optional[PreparedMounts] = None) -> GVisorSandbox:
        runsc_path()
        if not GVisorBackend._swept:
            GVisorBackend._swept = True
            await asyncio.to_thread(sweep_stale)
        sandbox_id = new_sandbox_id()
        # With a network the sentry's sockets are host sockets: on cgroup v1 they need their share of the
        # limit for buffers (at zero, every datagram to them is dropped: UDP, hence DNS, never arrives).
        cgroup = await asyncio.to_thread(cgroups.Cgroup, sandbox_id, _room_for_runsc(limits), host_sockets=network)
        home = data_dir() / "sandboxes" / sandbox_id
        (home / "bundle").mkdir(parents=True)
        sandbox = GVisorSandbox(sandbox_id, limits, cgroup, home, template.name)
        sandbox.on_cleanup = self.track_cleanup
        sandbox.grants = mounts
        sandbox.storage_bytes = limits.storage(SENTRY_MEMORY)
        sandbox._lock_fd = _hold(home)
        try:
            writable = await asyncio.to_thread(_mount_writable, home, limits)
            # gVisor's user is uid 1000 on the host too (no user namespace): granted files map to it.
            grants = await asyncio.to_thread(mounts.attached, data_dir() / "grants", USER_UID) if mounts else []
        except BaseException:
            await sandbox.kill("boot failed")
            raise
        if network:
            try:
                sandbox._netns = await asyncio.to_thread(_network_namespace)
            except BaseException:
                await sandbox.kill("boot failed")
                raise
        env_inside = sandbox_env(template, env)
        rootfs = Path(template.rootfs) if template.rootfs else await asyncio.to_thread(_template_rootfs, template)
        if grants:
            try:
                rootfs = await asyncio.to_thread(_root_with_mount_points, rootfs, home, [t for _, t, _ in grants],
                                                 bool(template.rootfs))
            except BaseException:
                await sandbox.kill("boot failed")
                raise
        spec = _spec(template, limits, env_inside, rootfs, writable,
                     sandbox._netns.path if sandbox._netns is not None else None, tuple(grants))
        (home / "bundle" / "config.json").write_text(json.dumps(spec))
        try:
            await sandbox._launch("run", f"--bundle={home / 'bundle'}", sandbox_id)
            config = dict(template_config(template, env), **sandbox_config(limits, env_inside, SENTRY_MEMORY))
            config["limits"]["nproc_exact"] = True  # the cgroup has room for runsc; this is the app's limit
            if mounts is not None:
                config["mounts"] = mounts.plan()  # the writable ones join Landlock's write paths
            if awaited:
                # No zygote to share imports with here: importing the preload list under ptrace takes
                # seconds. Pooled sandboxes pay that ahead of time; one someone waits for starts bare,
                # and its session imports what the code uses.
                config["preload"] = []
            await sandbox.channel.send({"t": "config", "config": config})
            await asyncio.wait_for(self._expect_ready(sandbox), BOOT_TIMEOUT)
        except asyncio.TimeoutError:
            await sandbox.kill("boot timed out")
            raise TimeoutError(f"gVisor sandbox did not boot within {BOOT_TIMEOUT:.0f} s") from None
        except BaseException:
            await sandbox.kill("boot failed")
            raise
        sandbox._write_meta(env)
        return sandbox

    @staticmethod
    async def _expect_ready(sandbox: GVisorSandbox) -> None:
        while (await boot_message(sandbox.channel, "gVisor sandbox")).get("t") != "ready":
            pass

    async def adopt(self, record: Mapping[str, Any]) -> GVisorSandbox:
        """The sandbox ``record`` names, taken over by this process: a live one (its keeper answers on its
        socket; an earlier owner died or let go of it) connected to, with a ping proving its channel; a
        paused one rebuilt from the checkpoint's record on disk (resume() brings it back). SandboxNotFound
        when it is gone. The record's id finds it; its limits (the owner's, after a claim) are kept when given."""
        sandbox_id = record.get("id") if isinstance(record, Mapping) else None
        if not is_sandbox_id(sandbox_id):
            raise InvalidRequest(f"not a sandbox id: {sandbox_id!r}")
        home = data_dir() / "sandboxes" / sandbox_id
        if not (home / "meta.json").exists():
            raise SandboxNotFound(f"no gVisor sandbox {sandbox_id} on this host")
        meta = json.loads((home / "meta.json").read_text())
        sock = await _off_loop(_connect_keeper, home)
        if sock is not None:
            return await self._adopt_live(sandbox_id, home, meta, record, sock)
        if not (home / "image").is_dir():
            raise SandboxNotFound(f"gVisor sandbox {sandbox_id} is gone (its keeper no longer runs)")
        limits = Limits.build(meta["limits"])
        cgroup = await asyncio.to_thread(cgroups.Cgroup, sandbox_id, _room_for_runsc(limits), host_sockets=False)
        sandbox = GVisorSandbox(sandbox_id, limits, cgroup, home, meta["template"])
        sandbox.on_cleanup = self.track_cleanup
        sandbox._paused = True
        sandbox.hibernation = _hibernation(meta)
        return sandbox

    async def _adopt_live(self, sandbox_id: str, home: Path, meta: dict, record: Mapping[str, Any],
                          sock: socket.socket) -> GVisorSandbox:
        gone = SandboxNotFound(f"gVisor sandbox {sandbox_id} is gone (its keeper is ending)")
        try:
            # The keeper's pid from the kernel (the peer of our connection), held by pidfd: not our child.
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            pidfd = os.pidfd_open(pid)
        except OSError:
            sock.close()
            raise gone from None
        cgroup = await _off_loop(_recorded_cgroup, home)
        if cgroup is None:
            sock.close()
            os.close(pidfd)
            raise SandboxNotFound(f"gVisor sandbox {sandbox_id} has no record of its cgroup (keeper.json)")
        given = record.get("limits")
        limits = Limits.build(given if isinstance(given, Mapping) else meta["limits"])
        sandbox = GVisorSandbox(sandbox_id, limits, cgroup, home, meta["template"])
        sandbox.on_cleanup = self.track_cleanup
        sandbox._keeper_pid = pid
        sandbox._watch_keeper(pidfd)
        try:
            rw = os.statvfs(home / "rw")
            sandbox.storage_bytes = rw.f_blocks * rw.f_frsize  # what its tmpfs has now (a claim may resize it)
        except OSError:
            sandbox.storage_bytes = limits.storage(SENTRY_MEMORY)
        sandbox.channel = Channel(sock)
        await sandbox.channel.open()
        # The keeper told the agent it has a new owner before this ping: the earlier owner's requests are
        # orphaned, and the ping proves the whole path (keeper, runsc, agent) answers.
        if not await sandbox.channel.ping(ADOPT_PING_WITHIN):
            # Its keeper was ending, or its agent does not answer: not a sandbox anyone can use.
            await sandbox.kill("it did not answer when a new owner adopted it")
            raise gone
        return sandbox


def _network_namespace() -> NetnsHolder:
    """A new network namespace for one sandbox, configured (routes to lo, the nftables redirect) before
    runsc starts in it, so the sentry never sees it otherwise. Refuses this process's own namespace."""
    holder = NetnsHolder().start()
    try:
        netns.configure(holder.pid)  # opens the namespace by fd and refuses ours (netns._open_netns)
    except BaseException:
        holder.close()
        raise
    return holder


async def _off_loop(fn, *args, **kwargs):
    """``fn`` in a worker thread; inline at interpreter shutdown, when there is no executor any more."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except RuntimeError:
        return fn(*args, **kwargs)


def _room_for_runsc(limits: Limits) -> Limits:
    return Limits.build({"pids": min(limits.pids + RUNSC_PIDS_ROOM, 1_000_000)}, base=limits)
