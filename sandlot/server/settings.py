"""Server settings: where state lives, default tenant quotas, the operator's ceilings, the audit log's retention.

:func:`operator_settings` turns the operator's flags (`sandlot serve`, ``python -m sandlot.server``) into
Settings, so both entry points read them the same way.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from .._config import db_location
from .._exceptions import InvalidRequest
from .._limits import parse_size
from .ceilings import MAX_LIFETIME, Ceilings, host_pids, physical_memory
from .store import default_db_path


def _total_memory() -> int:
    return physical_memory()  # one tenant may reserve (sum of its memory limits) at most the machine's RAM


def _total_pids() -> int:
    return host_pids() // 2  # one tenant may reserve at most half of the tasks the kernel can hold


@dataclasses.dataclass(frozen=True)
class Quotas:
    """Per-tenant quotas. A tenant's own values (``sandlot keys``/``store.set_quotas``) override these."""

    max_live: int = 20  # sandboxes alive at once (one-shot runs count while they run)
    max_lifetime: float = MAX_LIFETIME  # seconds from creation; set_timeout cannot go past it
    requests_per_minute: int = 1200  # a token bucket: bursts up to this many, refilled evenly
    # Sums of the memory and pids limits over the tenant's live sandboxes (paused ones hold neither).
    total_memory: int = dataclasses.field(default_factory=_total_memory)
    total_pids: int = dataclasses.field(default_factory=_total_pids)
    # Named volumes (/v1/volumes): how many a tenant may keep, and the most their sizes may sum to. A volume's
    # image is sparse, so this bounds what the tenant may fill, not what its empty volumes take on disk.
    max_volumes: int = 20
    total_volume_size: int = 50 * 1024**3
    # The checkpoints of its paused (hibernated) sandboxes, summed: paused ones hold disk, not memory or pids.
    max_paused_bytes: int = 20 * 1024**3


@dataclasses.dataclass(frozen=True)
class Settings:
    db_path: "Path | str" = dataclasses.field(default_factory=default_db_path)  # a SQLite file, or a postgresql:// URL
    quotas: Quotas = Quotas()
    max_live_total: int = 1000  # across all tenants: the host's own capacity
    # The most a tenant may ask for, per limit: refused up front with a clear message, never accepted and unmet.
    ceilings: Ceilings = dataclasses.field(default_factory=Ceilings)
    max_json_bytes: int = 8 * 1024**2  # any JSON body (code travels in a frame of at most 256 KiB anyway)
    max_upload_bytes: int = 4 * 1024**3  # one file upload; the sandbox's disk limit applies too
    reap_interval: float = 1.0  # how often the reaper records sandboxes that ended on their own
    retention: float = 7 * 86400.0  # ended sandboxes stay listable this long
    audit_retention: float = 90 * 86400.0  # audit rows older than this are pruned by the reaper...
    audit_max_rows: int = 1_000_000  # ...and only the newest this many are kept, whatever their age
    heartbeat: float = 15.0  # idle NDJSON streams get a {"type": "ping"} line this often
    max_background_commands: int = 32  # tracked per sandbox (finished ones are dropped first)
    isolations: tuple[str, ...] = ("process",)  # tiers clients may ask for ("gvisor" needs runsc on the host)
    public_docs: bool = True  # /docs and /openapi.json without a key (they describe the API, hold no data)
    # Whether tenants may give their sandboxes a network (egress by their rules) and secrets. Off unless the
    # operator says so (`sandlot serve --allow-network`): egress is the operator's to grant.
    allow_network: bool = False
    # With allow_network: the rules a tenant's allow rules (and its secrets' hosts) must lie within, e.g.
    # ("pypi.org", "*.pythonhosted.org", "*:443"); empty: any rule (private ranges and the host stay refused).
    network_ceiling: tuple[str, ...] = ()
    # Whether tenants' rules may open special addresses (private ranges, link-local and cloud metadata,
    # loopback, this host's own): a tenant writes its rules, and these are the operator's network.
    allow_private_network: bool = False
    # Host directories tenants may grant (mounts={"/data": "/srv/shared/data"}): only inside these (resolved)
    # roots (`sandlot serve --host-dir-root DIR`); empty, the default: none at all (volumes still work).
    host_dir_roots: tuple[str, ...] = ()
    # Sandboxes outlive this server process (a restart, an upgrade, a crash) until their lifetime ends, and the
    # next server on the same database takes them back (those a tier can keep: no network, no mounts). Off:
    # every sandbox ends with the server (`--no-durable`).
    durable: bool = True

    def with_db(self, db_path: "str | os.PathLike[str] | None") -> "Settings":
        return self if db_path is None else dataclasses.replace(self, db_path=db_location(db_path))


def quotas_for(settings: Settings, tenant) -> Quotas:
    """The tenant's effective quotas: its own overrides, else the server's defaults."""
    base = settings.quotas

    def pick(own: Optional[float], default: float):
        return default if own is None else own

    return Quotas(max_live=int(pick(tenant.max_live, base.max_live)),
                  max_lifetime=float(min(pick(tenant.max_lifetime, base.max_lifetime), MAX_LIFETIME)),
                  requests_per_minute=int(pick(tenant.requests_per_minute, base.requests_per_minute)),
                  total_memory=int(pick(tenant.total_memory, base.total_memory)),
                  total_pids=int(pick(tenant.total_pids, base.total_pids)),
                  max_volumes=int(pick(tenant.max_volumes, base.max_volumes)),
                  total_volume_size=int(pick(tenant.total_volume_size, base.total_volume_size)),
                  max_paused_bytes=int(pick(tenant.max_paused_bytes, base.max_paused_bytes)))


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any, name: str) -> float:
    """``90d``, ``12h``, ``30m``, ``8s`` or plain seconds -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.fullmatch(str(value))
    if not m or float(m.group(1)) <= 0:
        raise InvalidRequest(f"{name}: cannot read {value!r} as a duration (try 90d, 12h, 30m or 45s)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def parse_assignments(pairs: Iterable[str], what: str) -> dict[str, str]:
    """``["memory=8G", "pids=2048"]`` -> ``{"memory": "8G", "pids": "2048"}`` (a later one wins)."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InvalidRequest(f"{what} {pair!r} must look like NAME=VALUE, e.g. memory=8G")
        out[name.strip()] = value.strip()
    return out


def _number(value: str) -> "float | str":
    """``"1.5"`` -> 1.5, ``"256"`` -> 256; a size like ``"8G"`` stays as it is (Limits.build reads it)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() else number


def _check_isolations(isolations: Iterable[str]) -> tuple[str, ...]:
    """The tiers named (``process,gvisor``), each known, none twice; InvalidRequest otherwise."""
    from .._backends.registry import ISOLATIONS

    chosen: list[str] = []
    for name in isolations:
        if name not in ISOLATIONS:
            raise InvalidRequest(f"isolations: unknown tier {name!r}; the tiers are {', '.join(ISOLATIONS)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise InvalidRequest(f"isolations: name at least one tier ({', '.join(ISOLATIONS)})")
    return tuple(chosen)


def operator_settings(db_path: "str | os.PathLike[str] | None" = None, *, ceilings: Iterable[str] = (),
                      total_memory: Optional[str] = None, total_pids: Optional[int] = None,
                      audit_retention: Optional[str] = None, audit_max_rows: Optional[int] = None,
                      max_live: Optional[int] = None, max_lifetime: Optional[float] = None,
                      requests_per_minute: Optional[int] = None, isolations: Optional[Iterable[str]] = None,
                      allow_network: bool = False, network_ceiling: Iterable[str] = (),
                      allow_private_network: bool = False, host_dir_roots: Iterable[str] = (),
                      max_volumes: Optional[int] = None, total_volume_size: Optional[str] = None,
                      max_paused_bytes: Optional[str] = None, durable: bool = True) -> Settings:
    """Settings from the operator's flags; None keeps a default. Raises InvalidRequest on a bad value."""
    quotas = Quotas()
    changes: dict[str, Any] = {}
    for field, value in (("max_live", max_live), ("max_lifetime", max_lifetime),
                         ("requests_per_minute", requests_per_minute), ("total_pids", total_pids),
                         ("max_volumes", max_volumes)):
        if value is not None:
            if value <= 0:
                raise InvalidRequest(f"{field.replace('_', '-')} must be more than 0")
            changes[field] = value
    if total_memory is not None:
        changes["total_memory"] = parse_size(total_memory, "total-memory")
    if total_volume_size is not None:
        changes["total_volume_size"] = parse_size(total_volume_size, "total-volume-size")
    if max_paused_bytes is not None:
        changes["max_paused_bytes"] = parse_size(max_paused_bytes, "max-paused-bytes")
    quotas = dataclasses.replace(quotas, **changes)
    settings = Settings(db_path=db_location(db_path) if db_path else default_db_path(), quotas=quotas,
                        ceilings=Ceilings.for_host({k: _number(v) for k, v in
                                                    parse_assignments(ceilings, "ceiling").items()}))
    more: dict[str, Any] = {"durable": bool(durable)}
    if audit_retention is not None:
        more["audit_retention"] = parse_duration(audit_retention, "audit-retention")
    if audit_max_rows is not None:
        if audit_max_rows < 1:
            raise InvalidRequest("audit-max-rows must be at least 1")
        more["audit_max_rows"] = int(audit_max_rows)
    if isolations is not None:
        more["isolations"] = _check_isolations(isolations)
    ceiling = tuple(network_ceiling)
    if ceiling:
        from .._net.policy import Rule

        for rule in ceiling:
            Rule.parse(rule)  # InvalidRequest names a bad one
        more["network_ceiling"] = ceiling
    if allow_network or ceiling:
        more["allow_network"] = True
    if allow_private_network:
        more["allow_private_network"] = True
    roots = check_host_dir_roots(host_dir_roots)
    if roots:
        more["host_dir_roots"] = roots
    return dataclasses.replace(settings, **more) if more else settings


def check_host_dir_roots(roots: Iterable[str]) -> tuple[str, ...]:
    """The operator's --host-dir-root values, resolved: each an existing directory that may be granted at all
    (never /, /etc, /proc..., nor Sandlot's own state: the same rules as any grant)."""
    from .._storage.hostdir import check_allowed

    resolved: list[str] = []
    for root in roots:
        if not isinstance(root, str) or not root.startswith("/"):
            raise InvalidRequest(f"host-dir-root {root!r} must be an absolute path")
        path = check_allowed(root, None)
        if path not in resolved:
            resolved.append(path)
    return tuple(resolved)
