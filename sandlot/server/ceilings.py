"""Operator ceilings: the most a tenant may ask for, limit by limit, with defaults that fit this host.

A tenant's request over a ceiling is refused up front (400 ``InvalidRequest`` naming the limit and the
ceiling) and creates nothing. A default that is over a ceiling (a small host, or an operator's choice)
is lowered to it: a tenant that asks for nothing always gets a sandbox this server can hold.

The defaults are read from the machine once, when the server starts (see :func:`host_ceilings`).
"""

from __future__ import annotations

import dataclasses
import os
import resource
from typing import Any, Mapping, Optional

from .._exceptions import InvalidRequest
from .._limits import Limits

LIMIT_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Limits))
_SIZES = ("memory", "disk", "output")
_UNITS = {"cpu": "cores", "timeout": "s", "idle_timeout": "s", "lifetime": "s"}
MAX_LIFETIME = 14 * 86400.0  # the longest a session may live, as Vertex AI allows


def _read_int(path: str, fallback: int) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return fallback


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1024**4


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def host_pids() -> int:
    """How many tasks this kernel can hold: pid_max, or threads-max if lower."""
    return min(_read_int("/proc/sys/kernel/pid_max", 32768), _read_int("/proc/sys/kernel/threads-max", 1 << 22))


def _open_files() -> int:
    # A sandbox cannot raise RLIMIT_NOFILE past the hard limit it inherits from this process; nr_open caps
    # every process; and a sandbox should hold at most 1/64 of the host-wide file table.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    file_max = _read_int("/proc/sys/fs/file-max", 1 << 20)
    return min(hard, _read_int("/proc/sys/fs/nr_open", 1 << 20), max(Limits.open_files, file_max // 64))


def host_ceilings() -> dict[str, float]:
    """Default ceilings from this machine. Sizes are bytes, times seconds.

    cpu: the cores this process may run on; memory and disk (a tmpfs, so RAM too): half the RAM;
    pids: an eighth of what the kernel can hold (pid_max, threads-max); inodes: one per 16 KiB of RAM
    (each costs kernel memory); open_files: what a sandbox can be given here (see _open_files);
    output (kept in the server's memory per call): 1/512 of the RAM, between 16 MiB and 256 MiB;
    timeout and idle_timeout: a day; lifetime: 14 days.
    """
    ram = physical_memory()
    values: dict[str, float] = {
        "cpu": float(cores()), "memory": ram // 2, "pids": host_pids() // 8, "disk": ram // 2,
        "inodes": ram // (16 * 1024), "open_files": _open_files(), "timeout": 86400.0, "idle_timeout": 86400.0,
        "lifetime": MAX_LIFETIME, "output": min(256 * 1024**2, max(16 * 1024**2, ram // 512)),
    }
    for name, value in values.items():  # inside the range Limits accepts at all
        low, high = Limits._BOUNDS[name]
        values[name] = min(max(value, low), high)
    return values


def human(name: str, value: float) -> str:
    """``805306368 (768 MiB)``, ``1.5 cores``, ``600 s``: the number as asked, and what it means."""
    number = str(int(value)) if float(value).is_integer() else f"{value:g}"
    if name in _SIZES:
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value >= size:
                return f"{number} ({value / size:.4g} {unit})"
        return number
    return f"{number} {_UNITS[name]}" if name in _UNITS else number


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The most a tenant may ask for, per limit (``values[name]``, in Limits' units)."""

    values: Mapping[str, float] = dataclasses.field(default_factory=host_ceilings)

    @classmethod
    def for_host(cls, overrides: Optional[Mapping[str, Any]] = None) -> "Ceilings":
        """The host's defaults, with the operator's ``{"memory": "8G", "pids": 2048}`` on top."""
        values = host_ceilings()
        if overrides:
            unknown = set(overrides) - set(LIMIT_NAMES)
            if unknown:
                raise InvalidRequest(f"no limit named {sorted(unknown)}; the limits are {list(LIMIT_NAMES)}")
            parsed = Limits.build(overrides)  # sizes like 8G, and the range every limit must be in
            values.update({name: getattr(parsed, name) for name in overrides})
        return cls(values)

    def check(self, requested: Mapping[str, Any], built: Limits) -> None:
        """Refuse any limit the tenant asked for (a name in ``requested``) that is over its ceiling."""
        for name in LIMIT_NAMES:
            if requested.get(name) is None:
                continue
            value, ceiling = getattr(built, name), self.values[name]
            if value > ceiling + 1e-9:
                raise InvalidRequest(f"limit {name}={human(name, value)} is more than this server allows: "
                                     f"its ceiling for {name} is {human(name, ceiling)}")

    def lower_defaults(self, built: Limits, requested: Mapping[str, Any]) -> Limits:
        """The limits the tenant did not ask for, lowered to their ceilings where they are over."""
        lowered = {name: type(getattr(built, name))(self.values[name]) for name in LIMIT_NAMES
                   if requested.get(name) is None and getattr(built, name) > self.values[name]}
        return dataclasses.replace(built, **lowered) if lowered else built

    def check_call_timeout(self, seconds: Optional[float]) -> None:
        """A call's own timeout (run_code, commands) meets the ``timeout`` ceiling too."""
        if seconds is not None and seconds > self.values["timeout"] + 1e-9:
            raise InvalidRequest(f"limit timeout={human('timeout', seconds)} (this call's) is more than this server "
                                 f"allows: its ceiling for timeout is {human('timeout', self.values['timeout'])}")

    def check_lifetime(self, seconds: float) -> None:
        """A sandbox's lifetime from its creation (at create, and when extended) meets the ``lifetime`` ceiling."""
        ceiling = self.values["lifetime"]
        if seconds > ceiling + 1e-6:
            raise InvalidRequest(f"limit lifetime={human('lifetime', round(seconds))} (from the sandbox's creation) is "
                                 f"more than this server allows: its ceiling for lifetime is {human('lifetime', ceiling)}")

    def to_dict(self) -> dict[str, float]:
        return {name: self.values[name] for name in LIMIT_NAMES}
