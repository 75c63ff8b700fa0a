"""The Sandlot server: HTTP API with API keys, tenants, quotas, a reaper, Prometheus metrics.

For the CLI (``sandlot serve`` / ``sandlot keys ...``) and the MCP endpoint, the supported surface is:

    from sandlot import server

    server.serve(host="127.0.0.1", port=8000, db_path=None, log_level="info",
                 settings=None, mounts=())          # blocks; SIGINT/SIGTERM stop it cleanly
    server.create_app(settings, mounts=[server.Mount("/mcp", asgi_app, lifespan=factory)]) -> FastAPI
    server.Settings(db_path=..., quotas=server.Quotas(max_live=20, max_lifetime=14*86400,
                                                      requests_per_minute=1200), ...)

    # keys and tenants: the database directly, no HTTP (db_path: a SQLite file or a postgresql:// URL;
    # None: $SANDLOT_DB or the default path)
    server.create_key(tenant, db_path=None) -> "sl_..."   # creates the tenant if needed; shown once
    server.create_operator_key(db_path=None) -> "sl_..."  # reads /metrics; acts for no tenant
    server.list_keys(tenant=None, db_path=None) -> [KeyInfo(key_id, tenant, hint, created_at, last_used_at, revoked_at)]
    server.revoke_key(key_id_or_key, db_path=None) -> bool
    server.create_tenant(name, db_path=None) / server.list_tenants(db_path=None)
    server.set_quotas(tenant, db_path=None, max_live=..., max_lifetime=..., requests_per_minute=...,
                      total_memory="64G", total_pids=..., max_volumes=20, total_volume_size="50G",
                      max_paused_bytes="20G")
    server.operator_settings(db_path, ceilings=["memory=8G"], total_memory=..., total_pids=...,
                             audit_retention="90d", audit_max_rows=..., host_dir_roots=["/srv/shared"],
                             max_volumes=..., total_volume_size=..., max_paused_bytes=...
                             ) -> Settings   # the operator's flags
    server.Ceilings.for_host({"memory": "8G"})   # the most a tenant may ask for, per limit
    server.default_db_path()
    server.describe_database(db) -> str   # a path, or a URL with its password masked

Mounted apps (``Mount``, authenticated by default) get the same API keys and rate limit as the REST
routes; the caller's tenant is ``scope["sandlot.tenant"]`` and the server's state (``registry``,
``store``, ``settings``) is ``scope["app"].state.sandlot``. ``deps.Owner`` is the FastAPI dependency
for routes added later (``tenant: Owner``), and ``auth.check_key(state, header)`` the plain check.

Run it as ``python -m sandlot.server --port 8000 --db /path/sandlot.db`` too (or ``--db postgresql://...``:
several servers may share one PostgreSQL database; ``pip install 'sandlot[postgres]'``).
"""

from .app import Mount, create_app
from .ceilings import Ceilings
from .runner import main, serve
from .settings import Quotas, Settings, operator_settings
from .store import describe as describe_database
from .store import (DatabaseInUse, DatabaseUnavailable, KeyInfo, Store, Tenant, create_key, create_operator_key,
                    create_tenant, default_db_path, list_keys, list_tenants, revoke_key, set_quotas)

__all__ = ["serve", "main", "create_app", "Mount", "Settings", "Quotas", "Ceilings", "operator_settings", "Store",
           "Tenant", "KeyInfo", "DatabaseInUse", "DatabaseUnavailable", "create_key", "create_operator_key", "create_tenant", "list_keys",
           "list_tenants", "revoke_key", "set_quotas", "default_db_path", "describe_database"]
