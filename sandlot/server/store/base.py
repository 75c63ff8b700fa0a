"""The server's state store, as an interface: tenants, API keys, sandboxes, audit log.

Two implementations: SQLite (``sqlite.py``, the embedded default: one server per database file) and
PostgreSQL (``postgres.py``: several server replicas share one database). ``Store(db)`` opens the one its
argument names, a path or a ``postgresql://`` URL, as ``pathlib.Path(...)`` picks its flavour; code that
holds a store sees only this interface.

Sandboxes are rows so that their owner can still learn what became of them after they ended or after the
server restarted (status ``lost``). Every method is safe to call from several threads, and (PostgreSQL)
from several processes on several machines at once.
"""

from __future__ import annotations

import abc
import os
import urllib.parse
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional

from ... import _config
from ..._exceptions import InvalidRequest
from .records import AuditEntry, KeyInfo, RowCounts, SandboxRow, Tenant


def default_db_path() -> "Path | str":
    """``$SANDLOT_DB``, else sandlot.db in the data directory (``$SANDLOT_DATA_DIR``, /var/lib/sandlot as root)."""
    return _config.db_path()


def describe(db: "str | os.PathLike[str]") -> str:
    """A database as it may be printed or logged: a URL's password (if it carries one) is masked."""
    if not _config.is_db_url(db):
        return str(db)
    parts = urllib.parse.urlsplit(str(db))
    if parts.password is not None:
        user, _, host = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "password" for name, _ in query):  # libpq takes ?password=... too
        parts = parts._replace(query="&".join(f"{name}=***" if name == "password" else f"{name}={value}"
                                              for name, value in query))
    return urllib.parse.urlunsplit(parts)


class Store(abc.ABC):
    """What the server and the CLI keep and read. ``Store(db)`` opens the implementation ``db`` names:
    a SQLite file's path (None: :func:`default_db_path`), or a ``postgresql://`` URL."""

    # URL scheme -> implementation, filled by the implementations' modules; "" is the one for paths.
    _kinds: ClassVar[dict[str, type["Store"]]] = {}
    schemes: ClassVar[tuple[str, ...]] = ()
    # Several server processes may use this database at once (replicas): what one holds in memory is not all.
    shared: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for scheme in cls.__dict__.get("schemes", ()):
            Store._kinds[scheme] = cls

    def __new__(cls, db: "str | os.PathLike[str] | None" = None, *args: Any, **kwargs: Any) -> "Store":
        if cls is Store:
            cls = Store.kind_of(default_db_path() if db is None else db)
        return super().__new__(cls)

    @staticmethod
    def kind_of(db: "str | os.PathLike[str]") -> type["Store"]:
        """The implementation for a path or URL; InvalidRequest for a URL no implementation takes."""
        scheme = urllib.parse.urlsplit(str(db)).scheme.lower() if _config.is_db_url(db) else ""
        kind = Store._kinds.get(scheme)
        if kind is None:
            raise InvalidRequest(f"cannot open the database {describe(db)!r}: give a SQLite file's path or a "
                                 "postgresql://USER@HOST:PORT/DATABASE URL")
        return kind

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- tenants -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_tenant(self, name: str) -> Tenant:
        """InvalidRequest if the name is malformed or taken."""

    @abc.abstractmethod
    def tenant(self, name: str) -> Tenant:
        """InvalidRequest if there is no such tenant."""

    @abc.abstractmethod
    def tenants(self) -> list[Tenant]:
        """Every tenant (not the operator's), by name."""

    @abc.abstractmethod
    def set_quotas(self, name: str, *, max_live: Optional[int] = None, max_lifetime: Optional[float] = None,
                   requests_per_minute: Optional[int] = None, total_memory: "int | str | None" = None,
                   total_pids: Optional[int] = None, max_volumes: Optional[int] = None,
                   total_volume_size: "int | str | None" = None,
                   max_paused_bytes: "int | str | None" = None) -> Tenant:
        """Override the server's default quotas for one tenant (None keeps the current value).
        ``total_memory``, ``total_volume_size`` and ``max_paused_bytes`` take sizes like ``"8G"``."""

    # -- API keys ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_key(self, tenant: str, *, create_tenant: bool = True) -> str:
        """A new API key for ``tenant`` (created if missing). The key is shown once: only its hash is kept."""

    @abc.abstractmethod
    def create_operator_key(self) -> str:
        """A new operator key: it reads /metrics, and is refused wherever a tenant acts. Shown once."""

    @abc.abstractmethod
    def list_keys(self, tenant: Optional[str] = None) -> list[KeyInfo]: ...

    @abc.abstractmethod
    def revoke_key(self, key_id: str) -> bool:
        """Revoke by key id (``k_...``) or by the key itself. False if no such live key."""

    @abc.abstractmethod
    def authenticate(self, key: str) -> Optional[Tenant]:
        """The tenant owning this live key, or None."""

    # -- sandboxes -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_sandbox(self, sandbox_id: str, tenant: Tenant, template: str, metadata: Mapping[str, str],
                    limits: Mapping[str, Any], created_at: float, expires_at: Optional[float],
                    isolation: str = "process", on_idle: str = "kill", *,
                    check: Optional[Callable[[RowCounts], None]] = None) -> None:
        """A new 'running' row. ``check(counts)`` is given what the tenant's rows hold just before (see
        ``counts``) and may raise (QuotaExceeded) to add nothing: counting and adding are one step, whichever
        servers add the tenant's sandboxes at the same moment."""

    @abc.abstractmethod
    def end_sandbox(self, sandbox_id: str, status: str, reason: str) -> None: ...

    @abc.abstractmethod
    def set_paused(self, sandbox_id: str, paused: bool, checkpoint_bytes: int = 0) -> None:
        """A paused sandbox (gVisor tier) waits on disk: it outlives a restart of the server."""

    @abc.abstractmethod
    def paused_sandboxes(self) -> "list[tuple[SandboxRow, Tenant]]":
        """Every tenant's paused sandboxes (at startup: a later server holds them again)."""

    @abc.abstractmethod
    def set_expiry(self, sandbox_id: str, expires_at: float) -> None: ...

    @abc.abstractmethod
    def sandbox(self, tenant: Tenant, sandbox_id: str) -> Optional[SandboxRow]:
        """The tenant's sandbox row; None also when it belongs to another tenant (they must not learn of it)."""

    @abc.abstractmethod
    def sandboxes(self, tenant: Tenant, *, metadata: Optional[Mapping[str, str]] = None,
                  status: Optional[str] = None, limit: int = 100) -> list[SandboxRow]:
        """The tenant's sandboxes, newest first, having every given metadata pair."""

    @abc.abstractmethod
    def counts(self, tenant: Tenant) -> RowCounts:
        """What the tenant's rows hold now, across every server on this database."""

    @abc.abstractmethod
    def set_handle(self, sandbox_id: str, handle: Mapping[str, Any]) -> None:
        """What a later server process needs to take this live sandbox back (``running_handles``)."""

    @abc.abstractmethod
    def handle(self, sandbox_id: str) -> Optional[dict]:
        """What ``set_handle`` recorded for this sandbox (None: nothing, or no such sandbox): how another
        server process reaches a sandbox it does not hold."""

    @abc.abstractmethod
    def running_handles(self) -> list[tuple[SandboxRow, Optional[dict]]]:
        """The sandboxes still 'running', with their handles."""

    @abc.abstractmethod
    def mark_running_lost(self, reason: str, keep: "frozenset[str] | set[str]" = frozenset()) -> list[tuple[str, str]]:
        """Every sandbox still 'running' and not in ``keep`` becomes 'lost'. -> [(id, tenant)] of those marked."""

    @abc.abstractmethod
    def prune(self, ended_before: float) -> int:
        """Forget sandboxes that ended before ``ended_before`` (the audit log keeps their history)."""

    # -- audit ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def audit(self, tenant: str, action: str, sandbox_id: Optional[str] = None, detail: Optional[str] = None,
              key_id: Optional[str] = None) -> None: ...

    @abc.abstractmethod
    def audit_log(self, tenant: Optional[str] = None, *, sandbox_id: Optional[str] = None,
                  limit: int = 100) -> list[AuditEntry]:
        """Newest first."""

    @abc.abstractmethod
    def prune_audit(self, before: float, max_rows: int) -> int:
        """Forget audit rows older than ``before``, and all but the newest ``max_rows``. -> rows removed."""
