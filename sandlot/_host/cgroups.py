"""Per-sandbox cgroups on cgroup v2 (unified) and v1/hybrid hosts.

Each sandbox gets a cgroup below ``<the server's own cgroup>/sandlot``: memory (swap off, OOM counted
from the cgroup's own counters), pids, and a CPU quota. On v1 the same name is made in each
controller's hierarchy. Only the host touches these files; the sandbox sees its cgroup namespace.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .._exceptions import HostUnsupported

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


class Cgroup:
    """One sandbox's cgroup, whatever the hierarchy."""

    def __init__(self, name: str, limits) -> None:
        info = detect()
        if not info["writable"]:
            raise HostUnsupported("cannot enforce memory/pids/cpu limits: " + info["why"])
        self.version = info["version"]
        self._fds: dict = {}
        own = _own_paths()
        if self.version == 1:
            self.dirs = {c: ROOT / c / own.get(c, "/").lstrip("/") / "sandlot" / name for c in info["controllers"]}
        else:
            parent = ROOT / own.get("", "/").lstrip("/")
            _enable_v2_controllers(parent)
            self.dirs = {"": parent / "sandlot" / name}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.apply(limits)

    def _dir(self, controller: str) -> Path:
        return self.dirs["" if self.version == 2 else controller]

    def apply(self, limits) -> None:
        quota = max(1000, int(limits.cpu * _PERIOD_US))
        if self.version == 2:
            d = self.dirs[""]
            _write(d / "memory.max", str(limits.memory))
            _write(d / "memory.swap.max", "0") if (d / "memory.swap.max").exists() else None
            _write(d / "pids.max", str(limits.pids))
            _write(d / "cpu.max", "%d %d" % (quota, _PERIOD_US))
        else:
            mem = self.dirs["memory"]
            _write(mem / "memory.limit_in_bytes", str(limits.memory))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory))
            _write(mem / "memory.swappiness", "0") if (mem / "memory.swappiness").exists() else None
            _write(self.dirs["pids"] / "pids.max", str(limits.pids))
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(_PERIOD_US))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))

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
        """One pass of ``sig`` to every listed process (v2: cgroup.kill for SIGKILL). Never waits."""
        if sig == 9 and self.version == 2 and (self.dirs[""] / "cgroup.kill").exists():
            _write(self.dirs[""] / "cgroup.kill", "1")
            return
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

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
