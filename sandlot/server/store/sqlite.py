"""The store in one SQLite file (stdlib ``sqlite3``): the embedded default.

One server process holds the database (see ``lock.lock_database``); the CLI's ``sandlot keys`` commands
open it alongside (short-lived connections; SQLite's WAL mode lets both coexist).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from .base import default_db_path
from .sql import SQLStore

SCHEMA = """
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
ADDED_COLUMNS = [("tenants", "total_memory", "INTEGER"), ("tenants", "total_pids", "INTEGER"),
                 ("api_keys", "role", "TEXT NOT NULL DEFAULT 'tenant'"),
                 ("sandboxes", "isolation", "TEXT NOT NULL DEFAULT 'process'"),
                 ("tenants", "max_volumes", "INTEGER"), ("tenants", "total_volume_size", "INTEGER"),
                 # what a restarted server takes a live sandbox back from: its tier's record and its spec (JSON)
                 ("sandboxes", "handle", "TEXT"),
                 ("sandboxes", "on_idle", "TEXT NOT NULL DEFAULT 'kill'"),
                 ("sandboxes", "checkpoint_bytes", "INTEGER NOT NULL DEFAULT 0"),
                 ("tenants", "max_paused_bytes", "INTEGER")]
ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS audit_by_time ON audit(at);"


class SQLiteStore(SQLStore):
    """Thread-safe access to one SQLite database (one connection, one lock: the work is tiny)."""

    schemes = ("",)  # a path, not a URL

    def __init__(self, path: "str | os.PathLike[str] | None" = None) -> None:
        self.path = Path(path) if path else Path(default_db_path())
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
            self._db.executescript(SCHEMA)
            for table, column, declaration in ADDED_COLUMNS:
                if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            self._db.executescript(ADDED_INDEXES)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # writers take turns: what a transaction read stays true in it
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _json_int(self, column: str, key: str) -> str:
        return f"CAST(json_extract({column}, '$.{key}') AS INTEGER)"
