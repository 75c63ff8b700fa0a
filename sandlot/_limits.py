"""Resource limits: defaults, parsing of human sizes, validation. Enforced by the kernel, never by scanning code."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from ._exceptions import InvalidRequest

_UNITS = {"": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tib": 1024**4}


def parse_size(value: Any, name: str) -> int:
    """``512M``, ``"1GiB"``, ``2_000_000`` -> bytes."""
    if isinstance(value, bool):
        raise InvalidRequest(f"limit {name!r} must be a size, not a boolean")
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise InvalidRequest(f"limit {name!r}: cannot read {value!r} as a size (try 512M or 1GiB)")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-sandbox limits. Every field can be overridden at create time.

    ``cpu`` is in cores (a cgroup quota); ``memory`` and ``disk`` in bytes (``"512M"`` accepted);
    ``disk`` and ``inodes`` cap the sandbox's writable storage (home, /tmp and /dev/shm together);
    ``timeout`` is the default wall time of one call, ``idle_timeout`` and ``lifetime`` end the
    sandbox itself; ``output`` caps what the host keeps of one call: stdout+stderr bytes and every rich
    result at its serialized size (see _output.py).
    """

    cpu: float = 1.0
    memory: int = 1024**3
    pids: int = 128
    disk: int = 512 * 1024**2
    inodes: int = 65536
    open_files: int = 1024
    timeout: float = 60.0
    idle_timeout: float = 30 * 60.0
    lifetime: float = 24 * 3600.0
    output: int = 16 * 1024**2

    _BOUNDS = {  # sane ranges: reject typos like memory=512 (bytes) before they become confusing crashes
        "cpu": (0.01, 1024), "memory": (16 * 1024**2, 1024**4), "pids": (8, 1_000_000),
        "disk": (1024**2, 1024**4), "inodes": (64, 100_000_000), "open_files": (16, 1_048_576),
        "timeout": (0.01, 14 * 86400), "idle_timeout": (1, 14 * 86400), "lifetime": (1, 14 * 86400),
        "output": (1024, 1024**3),
    }

    @classmethod
    def build(cls, overrides: "Limits | Mapping[str, Any] | None" = None, base: "Limits | None" = None) -> "Limits":
        base = base or cls()
        if overrides is None:
            return base
        if isinstance(overrides, Limits):
            overrides = dataclasses.asdict(overrides)
        if not isinstance(overrides, Mapping):
            raise InvalidRequest("limits must be a mapping or a Limits")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise InvalidRequest(f"unknown limit(s) {sorted(unknown)}; known: {sorted(fields)}")
        values = dataclasses.asdict(base)
        for name, raw in overrides.items():
            if raw is None:
                continue
            if name in ("memory", "disk", "output"):
                value: float = parse_size(raw, name)
            elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
                value = raw
            else:
                raise InvalidRequest(f"limit {name!r} must be a number, got {raw!r}")
            low, high = cls._BOUNDS[name]
            if not low <= value <= high:
                raise InvalidRequest(f"limit {name}={raw!r} is outside [{low}, {high}]")
            values[name] = int(value) if name in ("memory", "pids", "disk", "inodes", "open_files", "output") else float(value)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def storage(self, overhead: int = 0) -> int:
        """The bytes home, /tmp and /dev/shm may hold together: ``disk``, but never so close to ``memory`` that
        filling them would end in an OOM kill instead of ENOSPC (they are a tmpfs, whose pages count toward
        the memory limit): an eighth of ``memory``, at least 64 MiB (half of a smaller one), stays for the
        processes, plus ``overhead``, what the tier itself keeps in the sandbox's memory (gVisor's sentry)."""
        room = max(self.memory // 8, min(64 * 1024**2, self.memory // 2)) + overhead
        return max(1024**2, min(self.disk, self.memory - room))


# What one create may carry besides its limits: its environment and metadata together, in bytes of
# JSON (as they travel and are stored). Well inside one protocol frame (protocol.MAX_HEADER, 256 KiB,
# which also carries the template's part of the plan), so no create can be too big for its frame.
MAX_CREATE_INPUT = 128 * 1024
