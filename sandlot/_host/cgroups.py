"""Per-sandbox cgroups on cgroup v2 (unified) and v1/hybrid hosts.

Each sandbox gets a cgroup below ``<the server's own cgroup>/sandlot``: memory (swap off, OOM counted
from the cgroup's own counters), pids, and a CPU quota. On v1 the same name is made in each
controller's hierarchy. Only the host touches these files; the sandbox sees its cgroup namespace.

The memory limit covers the kernel memory a sandbox makes the host hold for its sockets too. On v2,
socket buffers are charged to memory.current (MEMCG_SOCK) by default, so memory.max covers them. On v1
they are not, unless the cgroup has a TCP limit of its own (memory.kmem.tcp.limit_in_bytes, a separate
counter, which then takes UDP buffers too): without it, one sandbox's loopback connections could fill
the host-wide tcp_mem/udp_mem. So on v1 the limit is split: ``tcp_share(memory)`` for socket buffers,
the rest for everything else.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from .._exceptions import HostUnsupported, InvalidRequest

ROOT = Path("/sys/fs/cgroup")
_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
_PERIOD_US = 100_000


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _set(path: Path, value: "int | str", what: str, asked: "int | None" = None) -> None:
    """Write one limit; a write the kernel refuses becomes a SandlotError that says which and why.
    ``asked``: the limit as the owner gave it, when the file gets a part of it (v1's memory and TCP)."""
    try:
        _write(path, str(value))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            # v1 refuses to lower a limit below what the cgroup already holds (it cannot reclaim it).
            raise InvalidRequest(f"cannot set the {what} to {_size(asked if asked is not None else value)}: the "
                                 f"sandbox already holds more than that ({path.name}: {exc.strerror})") from None
        raise HostUnsupported(f"cannot set the {what} ({path} = {value}): {exc.strerror}") from None


def _size(value: "int | str") -> str:
    return f"{int(value) / 1024**2:.0f} MiB" if str(value).isdigit() else str(value)


_PAGE = os.sysconf("SC_PAGE_SIZE")
_MiB = 1024**2


def tcp_share(memory: int) -> int:
    """The part of a v1 memory limit set aside for the sandbox's TCP (and UDP) socket buffers.

    An eighth of the limit, between 1 MiB and 256 MiB, in whole pages: room for ordinary loopback
    traffic (a local server and its client), while the rest stays for the sandbox's processes. The two
    add up to the limit, so the sandbox's total (memory + TCP buffers) never exceeds it.
    """
    share = min(max(memory // 8, _MiB), 256 * _MiB)
    return share // _PAGE * _PAGE


def _keyed(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _own_paths() -> dict:
    """Map controller (or '' for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0":
            paths[""] = path
        for c in controllers.split(","):
            if c:
                paths[c] = path
    return paths


def detect() -> dict:
    """What this host offers: {'version': 2|1|None, 'controllers': [...], 'writable': bool, 'why': str}."""
    own = _own_paths()
    v1 = [c for c in _V1_CONTROLLERS if (ROOT / c / "tasks").exists()] if (ROOT / "memory").is_dir() else []
    if {"memory", "pids", "cpu"} <= set(v1):
        base = {c: ROOT / c / own.get(c, "/").lstrip("/") for c in v1}
        writable = all(os.access(p, os.W_OK) for p in base.values())
        return {"version": 1, "controllers": v1, "writable": writable,
                "why": "" if writable else "cgroup v1 hierarchies are not writable by this user"}
    if (ROOT / "cgroup.controllers").exists():
        base = ROOT / own.get("", "/").lstrip("/")
        available = _read(base / "cgroup.controllers").split()
        writable = os.access(base, os.W_OK)
        missing = {"memory", "pids", "cpu"} - set(available)
        why = ""
        if missing:
            why = "cgroup v2 controllers %s are not delegated to %s" % (sorted(missing), base)
        elif not writable:
            why = "cgroup %s is not writable (run as root or under a delegated systemd scope)" % base
        return {"version": 2, "controllers": available, "writable": writable and not missing, "why": why}
    return {"version": None, "controllers": [], "writable": False, "why": "no usable cgroup hierarchy found"}


def socket_memory_charged() -> "tuple[bool, str]":
    """Do a sandbox's socket buffers count against its memory limit on this host? (ok, why)"""
    info = detect()
    if info["version"] == 1:
        own = _own_paths().get("memory", "/").lstrip("/")
        if (ROOT / "memory" / own / "memory.kmem.tcp.limit_in_bytes").exists():
            return True, "v1: TCP buffers have their own share of the memory limit (memory.kmem.tcp)"
        return False, "v1 without memory.kmem.tcp: TCP buffers are the host's, outside every sandbox's limit"
    if info["version"] == 2:
        if "cgroup.memory=nosocket" in _read(Path("/proc/cmdline")).split():
            return False, "the kernel boots with cgroup.memory=nosocket: socket buffers are outside memory.max"
        return True, "v2: socket buffers count in memory.current, under memory.max"
    return False, "no cgroups"


class Cgroup:
    """One sandbox's cgroup, whatever the hierarchy."""

    def __init__(self, name: str, limits, *, host_sockets: bool = True) -> None:
        """``host_sockets=False``: the sandbox's sockets are not the host's (gVisor's netstack keeps its
        buffers in the sentry's ordinary memory), so on v1 no part of the limit goes to host TCP buffers:
        the TCP counter is capped at zero and the whole limit is memory."""
        info = detect()
        if not info["writable"]:
            raise HostUnsupported("cannot enforce memory/pids/cpu limits: " + info["why"])
        self.version = info["version"]
        self._fds: dict = {}
        self.host_sockets = host_sockets
        own = _own_paths()
        if self.version == 1:
            self.dirs = {c: ROOT / c / own.get(c, "/").lstrip("/") / "sandlot" / name for c in info["controllers"]}
        else:
            parent = ROOT / own.get("", "/").lstrip("/")
            _enable_v2_controllers(parent)
            self.dirs = {"": parent / "sandlot" / name}
        try:
            for d in self.dirs.values():
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.try_remove()
            raise HostUnsupported(f"cannot make the sandbox's cgroup ({exc.filename}): {exc.strerror}") from None
        try:
            self.apply(limits)
        except BaseException:
            self.try_remove()  # nothing runs in it yet
            raise

    @classmethod
    def existing(cls, name: str, dirs: "dict[str, str]", *, host_sockets: bool = True) -> "Cgroup":
        """A sandbox's cgroup made by an earlier process (a restarted server taking its sandbox back), from
        the paths that process recorded (``dirs``). Its limits are as that process left them. Raises
        LookupError when it is gone or the paths are not a sandbox cgroup called ``name``."""
        info = detect()
        found = {str(k): Path(v) for k, v in dirs.items()} if isinstance(dirs, dict) else {}
        wanted = set(info["controllers"]) if info["version"] == 1 else {""}
        if set(found) != wanted:
            raise LookupError(f"cgroup {name}: recorded for another hierarchy")
        for path in found.values():
            real = Path(os.path.realpath(path))
            if (real != path or real.name != name or real.parent.name != "sandlot" or ROOT not in real.parents
                    or not (real / "cgroup.procs").is_file()):
                raise LookupError(f"cgroup {name}: {path} is not there")
        cgroup = cls.__new__(cls)
        cgroup.version, cgroup._fds, cgroup.host_sockets, cgroup.dirs = info["version"], {}, host_sockets, found
        return cgroup

    def _dir(self, controller: str) -> Path:
        return self.dirs["" if self.version == 2 else controller]

    # CPU weight of a warm pool's sandbox while it boots (a 16th of a normal one: a claimed sandbox's code comes
    # first when both want the CPU); a claim gives it the normal weight.
    _WEIGHTS = {1: ("cpu", "cpu.shares", 1024, 64), 2: ("", "cpu.weight", 100, 6)}

    def set_background(self, background: bool) -> None:
        """A lower CPU weight (``background``) or the normal one."""
        controller, name, normal, low = self._WEIGHTS[self.version]
        _set(self._dir(controller) / name, low if background else normal, "CPU weight")
        self.background = background

    background = False

    def apply(self, limits) -> None:
        """Set (or change: a warm sandbox takes its owner's limits) memory, pids and CPU.

        Raises InvalidRequest when the kernel refuses to lower a limit below current use, HostUnsupported
        for any other refusal; a refused write leaves that limit as it was.
        """
        quota = max(1000, int(limits.cpu * _PERIOD_US))
        if self.version == 2:
            d = self.dirs[""]
            # Socket buffers count in memory.current (unless the kernel boots with cgroup.memory=nosocket:
            # doctor says so), so memory.max alone bounds them.
            _set(d / "memory.max", limits.memory, "memory limit")
            if (d / "memory.swap.max").exists():
                _set(d / "memory.swap.max", 0, "swap limit")
            _set(d / "pids.max", limits.pids, "process limit")
            _set(d / "cpu.max", "%d %d" % (quota, _PERIOD_US), "CPU quota")
        else:
            self._apply_v1_memory(limits.memory)
            _set(self.dirs["pids"] / "pids.max", limits.pids, "process limit")
            _set(self.dirs["cpu"] / "cpu.cfs_period_us", _PERIOD_US, "CPU period")
            _set(self.dirs["cpu"] / "cpu.cfs_quota_us", quota, "CPU quota")

    def _apply_v1_memory(self, memory: int) -> None:
        mem = self.dirs["memory"]
        tcp_file = mem / "memory.kmem.tcp.limit_in_bytes"
        tcp = tcp_share(memory) if self.host_sockets and tcp_file.exists() else 0
        rest = memory - tcp
        memsw = mem / "memory.memsw.limit_in_bytes"
        has_memsw = memsw.exists()
        current = int(_read(mem / "memory.limit_in_bytes").strip() or 0)
        # The kernel keeps memory+swap >= memory at every moment (EINVAL otherwise): when raising, memsw
        # goes first; when lowering, memory does. Swap stays off (memsw == memory).
        if has_memsw and rest > current:
            _set(memsw, rest, "memory limit (memory+swap)", memory)
            _set(mem / "memory.limit_in_bytes", rest, "memory limit", memory)
        else:
            _set(mem / "memory.limit_in_bytes", rest, "memory limit", memory)
            if has_memsw:
                _set(memsw, rest, "memory limit (memory+swap)", memory)
        if tcp_file.exists():
            # Writing any TCP limit also turns on TCP accounting for this cgroup: sockets created from
            # now on are charged to it (a warm sandbox's cgroup has it from its birth, before any socket).
            _set(tcp_file, tcp, f"TCP buffer share of the {_size(memory)} memory limit")
        if (mem / "memory.swappiness").exists():
            _set(mem / "memory.swappiness", 0, "swappiness")

    def add(self, pid: int) -> None:
        for d in self.dirs.values():
            _write(d / "cgroup.procs", str(pid))

    # -- counters (all read by the host, never reported by the sandbox) -----------------------
    def _fd(self, path: Path) -> int:
        # Counters are read around every call: descriptors kept open make a read one pread.
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDWR if path.name.endswith("usage_in_bytes")
                                           or path.name == "memory.peak" else os.O_RDONLY)
        return fd

    def _pread(self, path: Path) -> str:
        try:
            return os.pread(self._fd(path), 4096, 0).decode()
        except OSError:
            return ""

    def _pwrite(self, path: Path, value: str) -> None:
        os.pwrite(self._fd(path), value.encode(), 0)

    def close_counters(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def memory_current(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return int(self._pread(self._dir("memory") / name) or 0)

    def memory_peak(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return int(self._pread(self._dir("memory") / name) or 0)

    def reset_peak(self) -> None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            self._pwrite(self._dir("memory") / name, "0")
        except OSError:
            pass  # v2 kernels before 6.12 cannot reset the peak; it then covers the sandbox's life

    def oom_kills(self) -> int:
        if self.version == 2:
            return _keyed(self._pread(self.dirs[""] / "memory.events")).get("oom_kill", 0)
        return _keyed(self._pread(self.dirs["memory"] / "memory.oom_control")).get("oom_kill", 0)

    def memory_limit_hits(self) -> int:
        """How often usage ran into the limit (v1 failcnt, v2 events 'max'): pressure, even without an OOM kill."""
        if self.version == 2:
            return _keyed(self._pread(self.dirs[""] / "memory.events")).get("max", 0)
        return int(self._pread(self.dirs["memory"] / "memory.failcnt") or 0)

    def pids_limit_hits(self) -> int:
        return _keyed(self._pread(self._dir("pids") / "pids.events")).get("max", 0)

    def cpu_seconds(self) -> float:
        if self.version == 2:
            return _keyed(self._pread(self.dirs[""] / "cpu.stat")).get("usage_usec", 0) / 1e6
        acct = self.dirs.get("cpuacct")
        return int(self._pread(acct / "cpuacct.usage") or 0) / 1e9 if acct else 0.0

    def pids(self) -> list[int]:
        d = self._dir("pids")
        return [int(p) for p in _read(d / "cgroup.procs").split()]

    def signal_all(self, sig: int) -> None:
        """``sig`` to every process in the cgroup (v2: cgroup.kill for SIGKILL). Never waits.

        Without cgroup.kill the list is read, then signalled: a process forked in between (gVisor's
        sentry makes a stub process per new address space) would be missed. So the list is read again
        until it names no process not signalled yet; a process with SIGKILL pending cannot fork, so
        this ends after a pass or two."""
        if sig == 9 and self.version == 2 and (self.dirs[""] / "cgroup.kill").exists():
            _write(self.dirs[""] / "cgroup.kill", "1")
            return
        signalled: set[int] = set()
        for _ in range(16):
            new = [pid for pid in self.pids() if pid not in signalled]
            if not new:
                return
            for pid in new:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                signalled.add(pid)

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, and wait until it is empty."""
        if self.version == 2 and (self.dirs[""] / "cgroup.kill").exists():
            _write(self.dirs[""] / "cgroup.kill", "1")
        deadline = time.monotonic() + 5
        while True:
            pids = self.pids()
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(500):
            if self.try_remove():
                return
            time.sleep(0.01)  # the last exiting task is still being torn down

    def try_remove(self) -> bool:
        """One non-blocking attempt to delete the cgroup; True once every directory is gone."""
        self.close_counters()
        done = True
        for d in self.dirs.values():
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                done = False
        return done


def sweep_stale(min_age: float = 60.0) -> int:
    """Delete empty sandbox cgroups left by a process that died before cleaning up. Returns how many."""
    own = _own_paths()
    info = detect()
    if not info["writable"]:
        return 0
    if info["version"] == 1:
        holders = [ROOT / c / own.get(c, "/").lstrip("/") / "sandlot" for c in info["controllers"]]
    else:
        holders = [ROOT / own.get("", "/").lstrip("/") / "sandlot"]
    removed = 0
    now = time.time()
    for holder in holders:
        for d in holder.glob("sb-*") if holder.is_dir() else []:
            try:
                if now - d.stat().st_mtime < min_age or _read(d / "cgroup.procs").strip():
                    continue
                d.rmdir()
                removed += 1
            except OSError:
                continue
    return removed


def _enable_v2_controllers(parent: Path) -> None:
    """Make ``parent/sandlot`` able to host sandboxes with memory, pids and cpu control."""
    holder = parent / "sandlot"
    holder.mkdir(exist_ok=True)
    want = {"memory", "pids", "cpu"}
    for d in (parent, holder):
        enabled = set(_read(d / "cgroup.subtree_control").split())
        missing = want - enabled
        if not missing:
            continue
        try:
            try:
                _write(d / "cgroup.subtree_control", " ".join("+" + c for c in sorted(missing)))
            except OSError as exc:
                if exc.errno != 16 or d != parent:  # EBUSY: v2's "no internal processes" rule
                    raise
                # Our own cgroup holds us: step into a leaf of our own, then delegate below.
                leaf = parent / "sandlot-server"
                leaf.mkdir(exist_ok=True)
                _write(leaf / "cgroup.procs", str(os.getpid()))
                _write(d / "cgroup.subtree_control", " ".join("+" + c for c in sorted(missing)))
        except OSError as exc:
            raise HostUnsupported(
                "cannot enable %s in %s (%s). Under systemd run Sandlot in a unit with Delegate=yes, "
                "or as root outside any cgroup that holds other processes." % (sorted(missing), d, exc)) from None


def remove_named(names: "set[str] | frozenset[str]") -> int:
    """Kill whatever is left in the sandbox cgroups called ``names`` and delete them, wherever they are.

    For a server restarting after a crash: its previous process may have lived in another cgroup, so
    this searches every ``.../sandlot/sb-*`` directory rather than only below our own. Returns how many
    directories it removed.
    """
    if not names:
        return 0
    info = detect()
    roots = [ROOT / c for c in info["controllers"]] if info["version"] == 1 else [ROOT]
    removed = 0
    for root in roots:
        for d in root.glob("**/sandlot/sb-*"):
            if d.name not in names:
                continue
            if (d / "cgroup.kill").exists():
                try:
                    _write(d / "cgroup.kill", "1")
                except OSError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pids = _read(d / "cgroup.procs").split()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(int(pid), 9)
                    except (ProcessLookupError, ValueError):
                        pass
                time.sleep(0.01)
            for _ in range(200):
                try:
                    d.rmdir()
                    removed += 1
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
    return removed
