"""The server's state: tenants, API keys, sandboxes, audit log (see ``base.Store``, the interface).

``Store(db)`` opens a SQLite file (a path: the embedded default, one server per file, see ``lock_database``)
or a PostgreSQL database (a ``postgresql://`` URL: several server replicas share it). The CLI's helpers
(``create_key`` and the others) open, do one thing, and close.
"""

from .admin import create_key, create_operator_key, create_tenant, list_keys, list_tenants, revoke_key, set_quotas
from .base import Store, default_db_path, describe
from .errors import DatabaseInUse, DatabaseUnavailable
from .lock import lock_database
from .postgres import PostgresStore
from .records import (KEY_PREFIX, OPERATOR_TENANT, AuditEntry, KeyInfo, RowCounts, SandboxRow, Tenant,
                      hash_key)
from .sqlite import SQLiteStore

__all__ = ["Store", "SQLiteStore", "PostgresStore", "default_db_path", "describe", "DatabaseInUse",
           "DatabaseUnavailable", "lock_database", "KEY_PREFIX", "OPERATOR_TENANT", "AuditEntry", "KeyInfo",
           "RowCounts", "SandboxRow", "Tenant", "hash_key", "create_key", "create_operator_key", "create_tenant",
           "list_keys", "list_tenants", "revoke_key", "set_quotas"]
