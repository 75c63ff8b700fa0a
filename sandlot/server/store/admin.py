"""Helpers for the CLI (`sandlot keys ...`): each opens the database, does one thing, closes it."""

from __future__ import annotations

import os
from typing import Any, Optional

from .base import Store
from .records import KeyInfo, Tenant


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
