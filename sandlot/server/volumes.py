"""A tenant's named volumes on the server: their scope, their quotas (count and total size), their audit rows.

Each tenant's volumes live in a scope of their own (``tenant-<hash of its name>``, a directory under the data
dir's volumes), so two tenants may each have a volume "cache" and never see the other's: every lookup by name
happens inside the caller's scope. Quotas are checked and the volume made under one lock per tenant, so two
concurrent creates cannot both slip under them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any, Optional

from .._engine import Engine
from .._exceptions import QuotaExceeded
from .._limits import parse_size
from .._models import VolumeInfo
from .._storage.mounts import check_volume_name
from .settings import Quotas, Settings, quotas_for
from .store import Store, Tenant


def tenant_scope(tenant: Tenant) -> str:
    """The volume scope of a tenant: a file-system-safe name of its own, stable across restarts (tenant names
    are unique and never change), never the SDK's "local"."""
    return "tenant-" + hashlib.sha256(tenant.name.encode()).hexdigest()[:16]


def _size(n: float) -> str:
    return f"{n / 1024**3:.3g} GiB" if n >= 1024**3 else f"{n / 1024**2:.4g} MiB"


def check_volume_quotas(tenant_name: str, existing: list, size: int, quotas: Quotas) -> None:
    """One more volume of ``size`` bytes must keep the tenant within its count and total size."""
    if len(existing) >= quotas.max_volumes:
        raise QuotaExceeded(f"tenant {tenant_name!r} already has {len(existing)} volumes, its quota is "
                            f"{quotas.max_volumes}; delete one first")
    used = sum(v.size for v in existing)
    if used + size > quotas.total_volume_size:
        raise QuotaExceeded(f"tenant {tenant_name!r} is over its total volume size: its volumes take "
                            f"{_size(used)}, this one asks for {_size(size)}, and its total is "
                            f"{_size(quotas.total_volume_size)} ({quotas.total_volume_size} bytes); "
                            "delete one, or ask for less")


class TenantVolumes:
    def __init__(self, engine: Engine, store: Store, settings: Settings) -> None:
        self.engine, self.store, self.settings = engine, store, settings
        self._locks: dict[int, asyncio.Lock] = {}

    def _lock(self, tenant: Tenant) -> asyncio.Lock:
        return self._locks.setdefault(tenant.id, asyncio.Lock())

    def _store(self, tenant: Tenant):
        return self.engine.volumes(tenant_scope(tenant))

    async def create(self, tenant: Tenant, name: str, size: Any, inodes: Optional[int]) -> VolumeInfo:
        check_volume_name(name)
        size = parse_size(size, "size")
        store = self._store(tenant)
        async with self._lock(tenant):
            check_volume_quotas(tenant.name, await asyncio.to_thread(store.list), size,
                                quotas_for(self.settings, tenant))
            info = await asyncio.to_thread(store.create, name, size, inodes)
        self.store.audit(tenant.name, "volume_create", None,
                         json.dumps({"name": name, "size": info.size, "inodes": info.inodes}), tenant.key_id)
        return info

    async def list(self, tenant: Tenant) -> "list[VolumeInfo]":
        return await asyncio.to_thread(self._store(tenant).list)

    async def info(self, tenant: Tenant, name: str) -> VolumeInfo:
        return await asyncio.to_thread(self._store(tenant).info, name)

    async def delete(self, tenant: Tenant, name: str) -> None:
        store = self._store(tenant)
        async with self._lock(tenant):
            await asyncio.to_thread(store.delete, name)
        self.store.audit(tenant.name, "volume_delete", None, json.dumps({"name": name}), tenant.key_id)

    async def usage(self, tenant: Tenant) -> tuple[int, int]:
        """(how many volumes, their sizes summed)."""
        found = await self.list(tenant)
        return len(found), sum(v.size for v in found)
