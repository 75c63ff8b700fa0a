"""Every network decision of one sandbox, in a bounded ring (the newest kept), plus counters.

An entry is {"time": float, "kind": "dns"|"tcp", "name": str|None, "address": str|None, "port": int|None,
"verdict": "allow"|"deny"|"revoked", "rule": str|None, "reason": str}."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Optional

KINDS = ("dns", "tcp")
VERDICTS = ("allow", "deny", "revoked")
_FIELDS = ("time", "kind", "name", "address", "port", "verdict", "rule", "reason")


class DecisionLog:
    """Thread-safe (the broker's loop writes, API threads read). When full, the oldest entries go and
    `dropped` counts them; counters are never reset by the ring."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._counters: collections.Counter[str] = collections.Counter()
        self.dropped = 0

    def add(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Record one decision (a dict with the entry's keys; time defaults to now). Returns the stored entry."""
        stored = {key: entry.get(key) for key in _FIELDS}
        if stored["time"] is None:
            stored["time"] = time.time()
        if stored["kind"] not in KINDS or stored["verdict"] not in VERDICTS:
            raise ValueError(f"a decision needs kind in {KINDS} and verdict in {VERDICTS}: {entry!r}")
        stored["reason"] = stored["reason"] or ""
        with self._lock:
            if len(self._entries) == self._entries.maxlen:
                self.dropped += 1
            self._entries.append(stored)
            self._counters[f"{stored['kind']}_{stored['verdict']}"] += 1
        return stored

    def record(self, kind: str, verdict: str, *, name: Optional[str] = None, address: Optional[str] = None,
               port: Optional[int] = None, rule: Optional[str] = None, reason: str = "") -> dict[str, Any]:
        """add() with keywords."""
        return self.add({"kind": kind, "verdict": verdict, "name": name, "address": address, "port": port,
                         "rule": rule, "reason": reason})

    def entries(self, since: Optional[float] = None) -> list[dict[str, Any]]:
        """Copies of the kept entries, oldest first; with since, only those strictly after that time."""
        with self._lock:
            kept = list(self._entries)
        return [dict(e) for e in kept if since is None or e["time"] > since]

    def count(self, counter: str, n: int = 1) -> None:
        """Add to a named counter (e.g. "bytes_out", "connections")."""
        with self._lock:
            self._counters[counter] += n

    @property
    def counters(self) -> dict[str, int]:
        """Decisions per kind and verdict ("dns_allow", "tcp_deny", ...), plus any count()ed counter."""
        with self._lock:
            return dict(self._counters)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
