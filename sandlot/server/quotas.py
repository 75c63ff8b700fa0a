"""Per-tenant request rate (a token bucket) and the quota checks, each answered with a clear message (429)."""

from __future__ import annotations

import dataclasses
import threading
import time

from .._exceptions import QuotaExceeded
from .settings import Quotas


class RateLimiter:
    """One token bucket per tenant: up to ``requests_per_minute`` at once, refilled evenly over a minute."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float]] = {}  # tenant id -> (tokens, at)
        self._lock = threading.Lock()

    def check(self, tenant_id: int, tenant_name: str, per_minute: int) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(tenant_id, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - at) * per_minute / 60.0)
            if tokens < 1.0:
                self._buckets[tenant_id] = (tokens, now)
                wait = (1.0 - tokens) * 60.0 / max(per_minute, 1)
                raise QuotaExceeded(f"tenant {tenant_name!r} is over its rate of {per_minute} requests per minute; "
                                    f"retry in {wait:.1f} s", retry_after=wait)
            self._buckets[tenant_id] = (tokens - 1.0, now)


def check_live(tenant_name: str, live: int, quotas: Quotas) -> None:
    if live >= quotas.max_live:
        raise QuotaExceeded(f"tenant {tenant_name!r} already has {live} live sandboxes, its quota is "
                            f"{quotas.max_live}; kill one (or let it time out) first")


@dataclasses.dataclass(frozen=True)
class Usage:
    """What a tenant holds now: live sandboxes, and the memory (bytes) and pids limits of those running."""

    live: int
    memory: int
    pids: int
    paused_bytes: int = 0  # the checkpoints of its paused sandboxes, summed


def _size(n: float) -> str:
    return f"{n / 1024**3:.3g} GiB" if n >= 1024**3 else f"{n / 1024**2:.4g} MiB"


def check_totals(tenant_name: str, usage: Usage, limits, quotas: Quotas) -> None:
    """One more sandbox with ``limits`` must keep the tenant's memory and pids totals within its quotas."""
    if usage.memory + limits.memory > quotas.total_memory:
        raise QuotaExceeded(f"tenant {tenant_name!r} is over its total of memory: its running sandboxes' memory limits "
                            f"sum to {_size(usage.memory)}, this one asks for {_size(limits.memory)}, and its total "
                            f"is {_size(quotas.total_memory)} ({quotas.total_memory} bytes); kill one, or ask for less")
    if usage.pids + limits.pids > quotas.total_pids:
        raise QuotaExceeded(f"tenant {tenant_name!r} is over its total of pids: its running sandboxes' pids limits "
                            f"sum to {usage.pids}, this one asks for {limits.pids}, and its total is "
                            f"{quotas.total_pids}; kill one, or ask for fewer")


def check_paused_bytes(tenant_name: str, used: int, checkpoint_bytes: int, quotas: Quotas) -> None:
    """One more checkpoint of ``checkpoint_bytes`` must keep the tenant's paused sandboxes within its disk quota."""
    if used + checkpoint_bytes > quotas.max_paused_bytes:
        raise QuotaExceeded(f"tenant {tenant_name!r} is over its quota of paused bytes: its paused sandboxes' "
                            f"checkpoints take {_size(used)}, this one takes {_size(checkpoint_bytes)}, and its "
                            f"quota is {_size(quotas.max_paused_bytes)} ({quotas.max_paused_bytes} bytes); "
                            "kill or resume a paused one first")


def check_lifetime(tenant_name: str, seconds: float, quotas: Quotas) -> None:
    if seconds > quotas.max_lifetime + 1e-6:
        raise QuotaExceeded(f"a sandbox of tenant {tenant_name!r} may live at most {quotas.max_lifetime:g} s from "
                            f"its creation; {seconds:.0f} s was asked")
