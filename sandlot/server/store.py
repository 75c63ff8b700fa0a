"""The server's state in SQLite (stdlib ``sqlite3``): tenants, API keys, sandboxes, audit log.

API keys look like ``sl_<43 url-safe chars>``; only their SHA-256 is stored (a random 256-bit token
needs no slow hash: there is nothing to brute-force). Each key also has a short public id (``key_id``)
to list and revoke it by. Sandboxes are rows so that their owner can still learn what became of them
after they ended or after the server restarted (status ``lost``).

The store is used by the server (one process holds the database, see :func:`lock_database`) and by
the CLI's ``sandlot keys`` commands (short-lived connections; SQLite's WAL mode lets both coexist).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from .. import _config
from .._exceptions import InvalidRequest, SandlotError
from .._limits import parse_size

KEY_PREFIX = "sl_"
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    max_live INTEGER,              -- NULL: the server's default quota
    max_lifetime REAL,
    requests_per_minute INTEGER,
    total_memory INTEGER,          -- bytes: the sum of memory limits over its live sandboxes
    total_pids INTEGER,
    max_volumes INTEGER,           -- named volumes it may keep
    total_volume_size INTEGER,     -- bytes: the sum of its volumes' sizes
    max_paused_bytes INTEGER       -- bytes: the sum of its paused sandboxes' checkpoints
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants(id),
    key_hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,            -- the first characters of the key, to recognise it
    created_at REAL NOT NULL,
    last_used_at REAL,
    revoked_at REAL,
    role TEXT NOT NULL DEFAULT 'tenant'  -- tenant | operator (see OPERATOR_TENANT)
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants(id),
    template TEXT NOT NULL,
    status TEXT NOT NULL,          -- running | paused | ended | lost
    metadata TEXT NOT NULL,
    limits TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    ended_at REAL,
    end_reason TEXT,
    on_idle TEXT NOT NULL DEFAULT 'kill',       -- kill | pause (hibernate after its idle timeout)
    checkpoint_bytes INTEGER NOT NULL DEFAULT 0 -- while paused: the size of its checkpoint on disk
);
CREATE INDEX IF NOT EXISTS sandboxes_by_tenant ON sandboxes(tenant_id, status, created_at);
CREATE TABLE IF NOT EXISTS sandbox_metadata (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, key)
);
CREATE INDEX IF NOT EXISTS metadata_by_pair ON sandbox_metadata(key, value);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT,                   -- NULL: the server itself (reaper, restart)
    action TEXT NOT NULL,
    sandbox_id TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit(tenant, at);
"""
# Added after a database may have been created: columns (table, column, declaration), then indexes.
_ADDED_COLUMNS = [("tenants", "total_memory", "INTEGER"), ("tenants", "total_pids", "INTEGER"),
                  ("api_keys", "role", "TEXT NOT NULL DEFAULT 'tenant'"),
                  ("sandboxes", "isolation", "TEXT NOT NULL DEFAULT 'process'"),
                  ("tenants", "max_volumes", "INTEGER"), ("tenants", "total_volume_size", "INTEGER"),
                  # what a restarted server takes a live sandbox back from: its tier's record and its spec (JSON)
                  ("sandboxes", "handle", "TEXT"),
                  ("sandboxes", "on_idle", "TEXT NOT NULL DEFAULT 'kill'"),
                  ("sandboxes", "checkpoint_bytes", "INTEGER NOT NULL DEFAULT 0"),
                  ("tenants", "max_paused_bytes", "INTEGER")]
_ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS audit_by_time ON audit(at);"
# Operator keys hang off this tenant. Its name cannot be a tenant's (they start with a letter or digit), and
# an operator key is refused wherever a tenant acts (sandboxes, /mcp): it holds nothing and runs nothing.
OPERATOR_TENANT = "@operator"


def default_db_path() -> Path:
    """``$SANDLOT_DB``, else sandlot.db in the data directory (``$SANDLOT_DATA_DIR``, /var/lib/sandlot as root)."""
    return _config.db_path()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    max_live: Optional[int] = None  # None: the server's default
    max_lifetime: Optional[float] = None
    requests_per_minute: Optional[int] = None
    total_memory: Optional[int] = None
    total_pids: Optional[int] = None
    max_volumes: Optional[int] = None
    total_volume_size: Optional[int] = None
    max_paused_bytes: Optional[int] = None
    key_id: Optional[str] = None  # the key this request authenticated with
    role: str = "tenant"  # the role of that key: "tenant", or "operator" (/metrics)


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant: str
    hint: str
    created_at: float
    last_used_at: Optional[float]
    revoked_at: Optional[float]
    role: str = "tenant"


@dataclasses.dataclass(frozen=True)
class SandboxRow:
    id: str
    tenant: str
    template: str
    status: str
    metadata: dict
    limits: dict
    created_at: float
    expires_at: Optional[float]
    ended_at: Optional[float]
    end_reason: Optional[str]
    isolation: str = "process"
    on_idle: str = "kill"
    checkpoint_bytes: int = 0  # while paused


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    at: float
    tenant: str
    key_id: Optional[str]
    action: str
    sandbox_id: Optional[str]
    detail: Optional[str]


class Store:
    """Thread-safe access to one SQLite database (one connection, one lock: the work is tiny)."""

    def __init__(self, path: "str | os.PathLike[str] | None" = None) -> None:
        self.path = Path(path) if path else default_db_path()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        if fresh:
            os.chmod(self.path, 0o600)  # key hashes and the audit log (which holds code) are private
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes of the process
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            for table, column, declaration in _ADDED_COLUMNS:
                if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            self._db.executescript(_ADDED_INDEXES)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- tenants -------------------------------------------------------------------------------
    def create_tenant(self, name: str) -> Tenant:
        if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name):
            raise InvalidRequest("a tenant name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
                raise InvalidRequest(f"tenant {name!r} already exists")
            db.execute("INSERT INTO tenants (name, created_at) VALUES (?, ?)", (name, time.time()))
        return self.tenant(name)

    def tenant(self, name: str) -> Tenant:
        rows = self._query("SELECT * FROM tenants WHERE name = ?", (name,))
        if not rows:
            raise InvalidRequest(f"no tenant named {name!r}")
        return _tenant(rows[0])

    def tenants(self) -> list[Tenant]:
        return [_tenant(r) for r in self._query("SELECT * FROM tenants WHERE name != ? ORDER BY name",
                                                 (OPERATOR_TENANT,))]

    def set_quotas(self, name: str, *, max_live: Optional[int] = None, max_lifetime: Optional[float] = None,
                   requests_per_minute: Optional[int] = None, total_memory: "int | str | None" = None,
                   total_pids: Optional[int] = None, max_volumes: Optional[int] = None,
                   total_volume_size: "int | str | None" = None,
                   max_paused_bytes: "int | str | None" = None) -> Tenant:
        """Override the server's default quotas for one tenant (None keeps the current value).
        ``total_memory``, ``total_volume_size`` and ``max_paused_bytes`` take sizes like ``"8G"``."""
        tenant = self.tenant(name)
        if total_memory is not None:
            total_memory = parse_size(total_memory, "total_memory")
        if total_volume_size is not None:
            total_volume_size = parse_size(total_volume_size, "total_volume_size")
        if max_paused_bytes is not None:
            max_paused_bytes = parse_size(max_paused_bytes, "max_paused_bytes")
        values = {"max_live": max_live, "max_lifetime": max_lifetime, "requests_per_minute": requests_per_minute,
                  "total_memory": total_memory, "total_pids": total_pids, "max_volumes": max_volumes,
                  "total_volume_size": total_volume_size, "max_paused_bytes": max_paused_bytes}
        for field, value in values.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise InvalidRequest(f"quota {field} must be a number >= 0")
        with self._tx() as db:
            for field, value in values.items():
                if value is not None:
                    db.execute(f"UPDATE tenants SET {field} = ? WHERE id = ?", (value, tenant.id))
        return self.tenant(name)

    # -- API keys --------------------------------------------------------------------------------
    def create_key(self, tenant: str, *, create_tenant: bool = True) -> str:
        """A new API key for ``tenant`` (created if missing). The key is shown once: only its hash is kept."""
        try:
            owner = self.tenant(tenant)
        except InvalidRequest:
            if not create_tenant:
                raise
            owner = self.create_tenant(tenant)
        return self._new_key(owner.id, "tenant")

    def create_operator_key(self) -> str:
        """A new operator key: it reads /metrics, and is refused wherever a tenant acts. Shown once."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO tenants (name, created_at) VALUES (?, ?)", (OPERATOR_TENANT, time.time()))
        return self._new_key(self._query("SELECT id FROM tenants WHERE name = ?", (OPERATOR_TENANT,))[0][0],
                             "operator")

    def _new_key(self, tenant_id: int, role: str) -> str:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as db:
            db.execute("INSERT INTO api_keys (key_id, tenant_id, key_hash, hint, created_at, role)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       ("k_" + secrets.token_hex(4), tenant_id, hash_key(key), key[:9] + "…", time.time(), role))
        return key

    def list_keys(self, tenant: Optional[str] = None) -> list[KeyInfo]:
        sql = ("SELECT k.*, t.name AS tenant FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
               + (" WHERE t.name = ?" if tenant else "") + " ORDER BY k.created_at")
        return [KeyInfo(r["key_id"], r["tenant"], r["hint"], r["created_at"], r["last_used_at"], r["revoked_at"],
                        r["role"]) for r in self._query(sql, (tenant,) if tenant else ())]

    def revoke_key(self, key_id: str) -> bool:
        """Revoke by key id (``k_...``) or by the key itself. False if no such live key."""
        column, value = ("key_hash", hash_key(key_id)) if key_id.startswith(KEY_PREFIX) else ("key_id", key_id)
        with self._tx() as db:
            cur = db.execute(f"UPDATE api_keys SET revoked_at = ? WHERE {column} = ? AND revoked_at IS NULL",
                             (time.time(), value))
            return cur.rowcount > 0

    def authenticate(self, key: str) -> Optional[Tenant]:
        """The tenant owning this live key, or None."""
        if not key.startswith(KEY_PREFIX) or len(key) > 128:
            return None
        rows = self._query("SELECT t.*, k.key_id, k.last_used_at, k.role FROM api_keys k"
                           " JOIN tenants t ON t.id = k.tenant_id"
                           " WHERE k.key_hash = ? AND k.revoked_at IS NULL", (hash_key(key),))
        if not rows:
            return None
        row = rows[0]
        now = time.time()
        if row["last_used_at"] is None or now - row["last_used_at"] > 60:  # at most one write a minute per key
            with self._tx() as db:
                db.execute("UPDATE api_keys SET last_used_at = ? WHERE key_id = ?", (now, row["key_id"]))
        return dataclasses.replace(_tenant(row), key_id=row["key_id"], role=row["role"])

    # -- sandboxes -------------------------------------------------------------------------------
    def add_sandbox(self, sandbox_id: str, tenant: Tenant, template: str, metadata: Mapping[str, str],
                    limits: Mapping[str, Any], created_at: float, expires_at: Optional[float],
                    isolation: str = "process", on_idle: str = "kill") -> None:
        with self._tx() as db:
            db.execute("INSERT INTO sandboxes (id, tenant_id, template, status, metadata, limits,"
                       " created_at, expires_at, isolation, on_idle) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                       (sandbox_id, tenant.id, template, json.dumps(dict(metadata)), json.dumps(dict(limits)),
                        created_at, expires_at, isolation, on_idle))
            db.executemany("INSERT INTO sandbox_metadata (sandbox_id, key, value) VALUES (?, ?, ?)",
                           [(sandbox_id, k, v) for k, v in metadata.items()])

    def end_sandbox(self, sandbox_id: str, status: str, reason: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE sandboxes SET status = ?, ended_at = ?, end_reason = ? WHERE id = ?"
                       " AND status IN ('running', 'paused')", (status, time.time(), reason, sandbox_id))

    def set_paused(self, sandbox_id: str, paused: bool, checkpoint_bytes: int = 0) -> None:
        """A paused sandbox (gVisor tier) waits on disk: it outlives a restart of the server."""
        new, old = ("paused", "running") if paused else ("running", "paused")
        with self._tx() as db:
            db.execute("UPDATE sandboxes SET status = ?, checkpoint_bytes = ? WHERE id = ? AND status = ?",
                       (new, checkpoint_bytes if paused else 0, sandbox_id, old))

    def paused_sandboxes(self) -> "list[tuple[SandboxRow, Tenant]]":
        """Every tenant's paused sandboxes (at startup: a later server holds them again)."""
        rows = self._query("SELECT s.*, t.name AS tenant FROM sandboxes s JOIN tenants t ON t.id = s.tenant_id"
                           " WHERE s.status = 'paused'")
        tenants = {t.name: t for t in self.tenants()}
        return [(_sandbox(r), tenants[r["tenant"]]) for r in rows if r["tenant"] in tenants]

    def set_expiry(self, sandbox_id: str, expires_at: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE sandboxes SET expires_at = ? WHERE id = ?", (expires_at, sandbox_id))

    def sandbox(self, tenant: Tenant, sandbox_id: str) -> Optional[SandboxRow]:
        """The tenant's sandbox row; None also when it belongs to another tenant (they must not learn of it)."""
        rows = self._query("SELECT s.*, t.name AS tenant FROM sandboxes s JOIN tenants t ON t.id = s.tenant_id"
                           " WHERE s.id = ? AND s.tenant_id = ?", (sandbox_id, tenant.id))
        return _sandbox(rows[0]) if rows else None

    def sandboxes(self, tenant: Tenant, *, metadata: Optional[Mapping[str, str]] = None,
                  status: Optional[str] = None, limit: int = 100) -> list[SandboxRow]:
        """The tenant's sandboxes, newest first, having every given metadata pair."""
        sql = "SELECT s.*, t.name AS tenant FROM sandboxes s JOIN tenants t ON t.id = s.tenant_id WHERE s.tenant_id = ?"
        args: list = [tenant.id]
        if status:
            sql += " AND s.status = ?"
            args.append(status)
        for key, value in (metadata or {}).items():
            sql += " AND EXISTS (SELECT 1 FROM sandbox_metadata m WHERE m.sandbox_id = s.id AND m.key = ? AND m.value = ?)"
            args += [key, value]
        sql += " ORDER BY s.created_at DESC LIMIT ?"
        args.append(int(limit))
        return [_sandbox(r) for r in self._query(sql, tuple(args))]

    def set_handle(self, sandbox_id: str, handle: Mapping[str, Any]) -> None:
        """What a later server process needs to take this live sandbox back (``running_handles``)."""
        with self._tx() as db:
            db.execute("UPDATE sandboxes SET handle = ? WHERE id = ?", (json.dumps(dict(handle)), sandbox_id))

    def running_handles(self) -> list[tuple[SandboxRow, Optional[dict]]]:
        """At startup: the sandboxes still 'running' (a previous server process left them), with their handles."""
        rows = self._query("SELECT s.*, t.name AS tenant FROM sandboxes s JOIN tenants t ON t.id = s.tenant_id"
                           " WHERE s.status = 'running'")
        out = []
        for row in rows:
            try:
                handle = json.loads(row["handle"]) if row["handle"] else None
            except ValueError:
                handle = None
            out.append((_sandbox(row), handle if isinstance(handle, dict) else None))
        return out

    def mark_running_lost(self, reason: str, keep: "frozenset[str] | set[str]" = frozenset()) -> list[tuple[str, str]]:
        """At startup: every sandbox still 'running' belonged to a previous server process; those not in ``keep``
        (the ones taken back) died with it. -> [(id, tenant)] of those marked lost."""
        with self._tx() as db:
            rows = [r for r in db.execute("SELECT s.id, t.name FROM sandboxes s JOIN tenants t ON t.id = s.tenant_id"
                                          " WHERE s.status = 'running'").fetchall() if r[0] not in keep]
            db.executemany("UPDATE sandboxes SET status = 'lost', ended_at = ?, end_reason = ? WHERE id = ?"
                           " AND status = 'running'", [(time.time(), reason, r[0]) for r in rows])
        return [(r[0], r[1]) for r in rows]

    def prune(self, ended_before: float) -> int:
        """Forget sandboxes that ended before ``ended_before`` (the audit log keeps their history)."""
        with self._tx() as db:
            return db.execute("DELETE FROM sandboxes WHERE status != 'running' AND ended_at < ?",
                              (ended_before,)).rowcount

    # -- audit -----------------------------------------------------------------------------------
    def prune_audit(self, before: float, max_rows: int) -> int:
        """Forget audit rows older than ``before``, and all but the newest ``max_rows``. -> rows removed."""
        with self._tx() as db:
            removed = db.execute("DELETE FROM audit WHERE at < ?", (before,)).rowcount
            cutoff = db.execute("SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?", (int(max_rows),)).fetchone()
            if cutoff is not None:
                removed += db.execute("DELETE FROM audit WHERE id <= ?", (cutoff[0],)).rowcount
        return removed

    def audit(self, tenant: str, action: str, sandbox_id: Optional[str] = None, detail: Optional[str] = None,
              key_id: Optional[str] = None) -> None:
        if detail is not None and len(detail) > 2000:
            detail = detail[:2000] + "…"
        with self._tx() as db:
            db.execute("INSERT INTO audit (at, tenant, key_id, action, sandbox_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
                       (time.time(), tenant, key_id, action, sandbox_id, detail))

    def audit_log(self, tenant: Optional[str] = None, *, sandbox_id: Optional[str] = None,
                  limit: int = 100) -> list[AuditEntry]:
        sql, args = "SELECT * FROM audit WHERE 1=1", []
        if tenant:
            sql += " AND tenant = ?"
            args.append(tenant)
        if sandbox_id:
            sql += " AND sandbox_id = ?"
            args.append(sandbox_id)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(int(limit))
        return [AuditEntry(r["at"], r["tenant"], r["key_id"], r["action"], r["sandbox_id"], r["detail"])
                for r in self._query(sql, tuple(args))]


def _tenant(row: sqlite3.Row) -> Tenant:
    return Tenant(row["id"], row["name"], row["max_live"], row["max_lifetime"], row["requests_per_minute"],
                  row["total_memory"], row["total_pids"], row["max_volumes"], row["total_volume_size"],
                  row["max_paused_bytes"])


def _sandbox(row: sqlite3.Row) -> SandboxRow:
    return SandboxRow(row["id"], row["tenant"], row["template"], row["status"], json.loads(row["metadata"]),
                      json.loads(row["limits"]), row["created_at"], row["expires_at"], row["ended_at"],
                      row["end_reason"], row["isolation"], row["on_idle"], row["checkpoint_bytes"])


class DatabaseInUse(SandlotError):
    """Another server process already serves this database."""


def lock_database(path: "str | os.PathLike[str]") -> int:
    """Hold ``<db>.lock`` for the life of this process, so two servers never share one database
    (each would take the other's sandboxes for lost). Released by the kernel when we exit, even on kill -9."""
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DatabaseInUse(f"another Sandlot server is using {path}") from None
    return fd


# -- helpers for the CLI (`sandlot keys ...`): each opens the database, does one thing, closes it ----------
def _with_store(db_path, fn):
    store = Store(db_path)
    try:
        return fn(store)
    finally:
        store.close()


def create_tenant(name: str, db_path: "str | os.PathLike[str] | None" = None) -> Tenant:
    return _with_store(db_path, lambda s: s.create_tenant(name))


def create_key(tenant: str, db_path: "str | os.PathLike[str] | None" = None) -> str:
    """A new API key (``sl_...``) for ``tenant``, creating the tenant if needed. Shown once; only its hash is kept."""
    return _with_store(db_path, lambda s: s.create_key(tenant))


def create_operator_key(db_path: "str | os.PathLike[str] | None" = None) -> str:
    """A new operator key (``sl_...``): it reads /metrics and nothing of any tenant's. Shown once."""
    return _with_store(db_path, lambda s: s.create_operator_key())


def list_keys(tenant: Optional[str] = None, db_path: "str | os.PathLike[str] | None" = None) -> list[KeyInfo]:
    return _with_store(db_path, lambda s: s.list_keys(tenant))


def revoke_key(key_id: str, db_path: "str | os.PathLike[str] | None" = None) -> bool:
    return _with_store(db_path, lambda s: s.revoke_key(key_id))


def list_tenants(db_path: "str | os.PathLike[str] | None" = None) -> list[Tenant]:
    return _with_store(db_path, lambda s: s.tenants())


def set_quotas(tenant: str, db_path: "str | os.PathLike[str] | None" = None, **quotas: Any) -> Tenant:
    """``set_quotas("acme", max_live=50, max_lifetime=86400, requests_per_minute=600, total_memory="64G",
    total_pids=8192, max_volumes=20, total_volume_size="50G", max_paused_bytes="20G")``."""
    return _with_store(db_path, lambda s: s.set_quotas(tenant, **quotas))
