"""The store written once in SQL that SQLite and PostgreSQL both run.

Statements use ``?`` placeholders (the PostgreSQL store turns them into ``%s``) and name every column they
read (rows are read by name). An implementation gives a transaction (``_tx``: it yields something with
``execute``/``executemany`` returning cursors with ``fetchone``/``fetchall``/``rowcount``), one-statement
reads (``_query``), and the few places the dialects differ: reading a number out of a JSON column
(``_json_int``) and holding a tenant's row for the rest of a transaction (``_hold_tenant``).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import secrets
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from ..._exceptions import InvalidRequest
from ..._limits import parse_size
from .base import Store
from .records import (KEY_PREFIX, OPERATOR_TENANT, TENANT_NAME, AuditEntry, KeyInfo, RowCounts, SandboxRow, Tenant,
                      hash_key, sandbox_of, tenant_of)

_SANDBOX_ROWS = "SELECT s.*, t.name AS tenant FROM sandboxes s JOIN tenants t ON t.id = s.tenant_id"
_LIVE = "('running', 'paused')"


class SQLStore(Store):
    """Every method of :class:`Store` over a SQL database."""

    @abc.abstractmethod
    def _tx(self) -> contextlib.AbstractContextManager:
        """One transaction: committed when the block ends, rolled back if it raises."""

    @abc.abstractmethod
    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        """The rows of one read."""

    @abc.abstractmethod
    def _json_int(self, column: str, key: str) -> str:
        """An SQL expression: the integer at ``key`` of the JSON object in ``column``."""

    def _hold_tenant(self, db: Any, tenant_id: int) -> None:
        """Within a transaction: no other transaction adds the tenant's sandboxes until this one ends."""

    # -- tenants -------------------------------------------------------------------------------------
    def _insert_tenant(self, name: str) -> bool:
        """Add the tenant unless it exists (even if another server adds it at the same moment). -> added."""
        if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
            raise InvalidRequest("a tenant name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        with self._tx() as db:
            return db.execute("INSERT INTO tenants (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                              (name, time.time())).rowcount > 0

    def create_tenant(self, name: str) -> Tenant:
        if not self._insert_tenant(name):
            raise InvalidRequest(f"tenant {name!r} already exists")
        return self.tenant(name)

    def tenant(self, name: str) -> Tenant:
        rows = self._query("SELECT * FROM tenants WHERE name = ?", (name,))
        if not rows:
            raise InvalidRequest(f"no tenant named {name!r}")
        return tenant_of(rows[0])

    def tenants(self) -> list[Tenant]:
        return [tenant_of(r) for r in self._query("SELECT * FROM tenants WHERE name != ? ORDER BY name",
                                                   (OPERATOR_TENANT,))]

    def set_quotas(self, name: str, *, max_live: Optional[int] = None, max_lifetime: Optional[float] = None,
                   requests_per_minute: Optional[int] = None, total_memory: "int | str | None" = None,
                   total_pids: Optional[int] = None, max_volumes: Optional[int] = None,
                   total_volume_size: "int | str | None" = None,
                   max_paused_bytes: "int | str | None" = None) -> Tenant:
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

    # -- API keys ------------------------------------------------------------------------------------
    def create_key(self, tenant: str, *, create_tenant: bool = True) -> str:
        try:
            owner = self.tenant(tenant)
        except InvalidRequest:
            if not create_tenant:
                raise
            self._insert_tenant(tenant)  # another server may have added it since: either way it exists now
            owner = self.tenant(tenant)
        return self._new_key(owner.id, "tenant")

    def create_operator_key(self) -> str:
        with self._tx() as db:
            db.execute("INSERT INTO tenants (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                       (OPERATOR_TENANT, time.time()))
        return self._new_key(self._query("SELECT id FROM tenants WHERE name = ?", (OPERATOR_TENANT,))[0]["id"],
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
        column, value = ("key_hash", hash_key(key_id)) if key_id.startswith(KEY_PREFIX) else ("key_id", key_id)
        with self._tx() as db:
            cur = db.execute(f"UPDATE api_keys SET revoked_at = ? WHERE {column} = ? AND revoked_at IS NULL",
                             (time.time(), value))
            return cur.rowcount > 0

    def authenticate(self, key: str) -> Optional[Tenant]:
        if not key.startswith(KEY_PREFIX) or len(key) > 128:
            return None
        rows = self._query("SELECT t.*, k.key_id, k.last_used_at, k.role FROM api_keys k"
                           " JOIN tenants t ON t.id = k.tenant_id"
                           " WHERE k.key_hash = ? AND k.revoked_at IS NULL", (hash_key(key),))
        if not rows:
            return None
        row = rows[0]
        now = time.time()
        if row["last_used_at"] is None or now - row["last_used_at"] > 60:  # at most one write a minute per key...
            with self._tx() as db:  # ...of all servers' requests with it: the first to come writes
                db.execute("UPDATE api_keys SET last_used_at = ? WHERE key_id = ?"
                           " AND (last_used_at IS NULL OR last_used_at < ?)", (now, row["key_id"], now - 60))
        return dataclasses.replace(tenant_of(row), key_id=row["key_id"], role=row["role"])

    # -- sandboxes -----------------------------------------------------------------------------------
    def add_sandbox(self, sandbox_id: str, tenant: Tenant, template: str, metadata: Mapping[str, str],
                    limits: Mapping[str, Any], created_at: float, expires_at: Optional[float],
                    isolation: str = "process", on_idle: str = "kill", *,
                    check: Optional[Callable[[RowCounts], None]] = None) -> None:
        with self._tx() as db:
            if check is not None:
                self._hold_tenant(db, tenant.id)  # another server's count waits until this row is in
                check(self._counts(db, tenant.id))
            db.execute("INSERT INTO sandboxes (id, tenant_id, template, status, metadata, limits,"
                       " created_at, expires_at, isolation, on_idle) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                       (sandbox_id, tenant.id, template, json.dumps(dict(metadata)), json.dumps(dict(limits)),
                        created_at, expires_at, isolation, on_idle))
            if metadata:
                db.executemany("INSERT INTO sandbox_metadata (sandbox_id, key, value) VALUES (?, ?, ?)",
                               [(sandbox_id, k, v) for k, v in metadata.items()])

    def end_sandbox(self, sandbox_id: str, status: str, reason: str) -> None:
        with self._tx() as db:
            db.execute(f"UPDATE sandboxes SET status = ?, ended_at = ?, end_reason = ? WHERE id = ?"
                       f" AND status IN {_LIVE}", (status, time.time(), reason, sandbox_id))

    def set_paused(self, sandbox_id: str, paused: bool, checkpoint_bytes: int = 0) -> None:
        new, old = ("paused", "running") if paused else ("running", "paused")
        with self._tx() as db:
            db.execute("UPDATE sandboxes SET status = ?, checkpoint_bytes = ? WHERE id = ? AND status = ?",
                       (new, checkpoint_bytes if paused else 0, sandbox_id, old))

    def paused_sandboxes(self) -> "list[tuple[SandboxRow, Tenant]]":
        rows = self._query(_SANDBOX_ROWS + " WHERE s.status = 'paused'")
        tenants = {t.name: t for t in self.tenants()}
        return [(sandbox_of(r), tenants[r["tenant"]]) for r in rows if r["tenant"] in tenants]

    def set_expiry(self, sandbox_id: str, expires_at: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE sandboxes SET expires_at = ? WHERE id = ?", (expires_at, sandbox_id))

    def sandbox(self, tenant: Tenant, sandbox_id: str) -> Optional[SandboxRow]:
        rows = self._query(_SANDBOX_ROWS + " WHERE s.id = ? AND s.tenant_id = ?", (sandbox_id, tenant.id))
        return sandbox_of(rows[0]) if rows else None

    def sandboxes(self, tenant: Tenant, *, metadata: Optional[Mapping[str, str]] = None,
                  status: Optional[str] = None, limit: int = 100) -> list[SandboxRow]:
        sql = _SANDBOX_ROWS + " WHERE s.tenant_id = ?"
        args: list = [tenant.id]
        if status:
            sql += " AND s.status = ?"
            args.append(status)
        for key, value in (metadata or {}).items():
            sql += " AND EXISTS (SELECT 1 FROM sandbox_metadata m WHERE m.sandbox_id = s.id AND m.key = ? AND m.value = ?)"
            args += [key, value]
        sql += " ORDER BY s.created_at DESC LIMIT ?"
        args.append(int(limit))
        return [sandbox_of(r) for r in self._query(sql, tuple(args))]

    def counts(self, tenant: Tenant) -> RowCounts:
        with self._tx() as db:
            return self._counts(db, tenant.id)

    def _counts(self, db: Any, tenant_id: int) -> RowCounts:
        row = db.execute(
            "SELECT COUNT(*) AS live,"
            f" SUM(CASE WHEN status = 'running' THEN {self._json_int('limits', 'memory')} ELSE 0 END) AS memory,"
            f" SUM(CASE WHEN status = 'running' THEN {self._json_int('limits', 'pids')} ELSE 0 END) AS pids,"
            " SUM(CASE WHEN status = 'paused' THEN checkpoint_bytes ELSE 0 END) AS paused_bytes"
            f" FROM sandboxes WHERE tenant_id = ? AND status IN {_LIVE}", (tenant_id,)).fetchone()
        return RowCounts(int(row["live"]), int(row["memory"] or 0), int(row["pids"] or 0),
                         int(row["paused_bytes"] or 0))

    def set_handle(self, sandbox_id: str, handle: Mapping[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE sandboxes SET handle = ? WHERE id = ?", (json.dumps(dict(handle)), sandbox_id))

    def handle(self, sandbox_id: str) -> Optional[dict]:
        rows = self._query("SELECT handle FROM sandboxes WHERE id = ?", (sandbox_id,))
        return _handle_of(rows[0]) if rows else None

    def running_handles(self) -> list[tuple[SandboxRow, Optional[dict]]]:
        rows = self._query(_SANDBOX_ROWS + " WHERE s.status = 'running'")
        return [(sandbox_of(row), _handle_of(row)) for row in rows]

    def mark_running_lost(self, reason: str, keep: "frozenset[str] | set[str]" = frozenset()) -> list[tuple[str, str]]:
        with self._tx() as db:
            rows = [r for r in db.execute("SELECT s.id, t.name AS tenant FROM sandboxes s"
                                          " JOIN tenants t ON t.id = s.tenant_id WHERE s.status = 'running'").fetchall()
                    if r["id"] not in keep]
            if rows:
                db.executemany("UPDATE sandboxes SET status = 'lost', ended_at = ?, end_reason = ? WHERE id = ?"
                               " AND status = 'running'", [(time.time(), reason, r["id"]) for r in rows])
        return [(r["id"], r["tenant"]) for r in rows]

    def prune(self, ended_before: float) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM sandboxes WHERE status != 'running' AND ended_at < ?",
                              (ended_before,)).rowcount

    # -- audit ---------------------------------------------------------------------------------------
    def prune_audit(self, before: float, max_rows: int) -> int:
        with self._tx() as db:
            removed = db.execute("DELETE FROM audit WHERE at < ?", (before,)).rowcount
            cutoff = db.execute("SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?", (int(max_rows),)).fetchone()
            if cutoff is not None:
                removed += db.execute("DELETE FROM audit WHERE id <= ?", (cutoff["id"],)).rowcount
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


def _handle_of(row: Mapping[str, Any]) -> Optional[dict]:
    try:
        handle = json.loads(row["handle"]) if row["handle"] else None
    except ValueError:
        handle = None
    return handle if isinstance(handle, dict) else None
