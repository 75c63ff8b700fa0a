"""Server settings: where state lives, default tenant quotas, and the bounds every request must respect."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

from .store import default_db_path

MAX_LIFETIME = 14 * 86400.0  # the longest a session may live, as Vertex AI allows


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1024**4


@dataclasses.dataclass(frozen=True)
class Quotas:
    """Per-tenant quotas. A tenant's own values (``sandlot keys``/``store.set_quotas``) override these."""

    max_live: int = 20  # sandboxes alive at once (one-shot runs count while they run)
    max_lifetime: float = MAX_LIFETIME  # seconds from creation; set_timeout cannot go past it
    requests_per_minute: int = 1200  # a token bucket: bursts up to this many, refilled evenly


@dataclasses.dataclass(frozen=True)
class Settings:
    db_path: Path = dataclasses.field(default_factory=default_db_path)
    quotas: Quotas = Quotas()
    max_live_total: int = 1000  # across all tenants: the host's own capacity
    # Absurd limits are refused up front with a clear message rather than accepted and never met.
    max_cpu: float = float(os.cpu_count() or 1)
    max_memory: int = dataclasses.field(default_factory=_physical_memory)
    max_json_bytes: int = 8 * 1024**2  # any JSON body (code travels in a frame of at most 256 KiB anyway)
    max_upload_bytes: int = 4 * 1024**3  # one file upload; the sandbox's disk limit applies too
    reap_interval: float = 1.0  # how often the reaper records sandboxes that ended on their own
    retention: float = 7 * 86400.0  # ended sandboxes stay listable this long
    heartbeat: float = 15.0  # idle NDJSON streams get a {"type": "ping"} line this often
    max_background_commands: int = 32  # tracked per sandbox (finished ones are dropped first)
    isolations: tuple[str, ...] = ("process",)  # tiers clients may ask for ("gvisor" needs runsc on the host)
    public_docs: bool = True  # /docs and /openapi.json without a key (they describe the API, hold no data)

    def with_db(self, db_path: "str | os.PathLike[str] | None") -> "Settings":
        return self if db_path is None else dataclasses.replace(self, db_path=Path(db_path))


def quotas_for(settings: Settings, tenant) -> Quotas:
    """The tenant's effective quotas: its own overrides, else the server's defaults."""
    base = settings.quotas

    def pick(own: Optional[float], default: float):
        return default if own is None else own

    return Quotas(max_live=int(pick(tenant.max_live, base.max_live)),
                  max_lifetime=float(min(pick(tenant.max_lifetime, base.max_lifetime), MAX_LIFETIME)),
                  requests_per_minute=int(pick(tenant.requests_per_minute, base.requests_per_minute)))
