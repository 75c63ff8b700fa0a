"""The app factory: ``create_app(settings, mounts=[...]) -> FastAPI``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import AsyncContextManager, AsyncIterator, Callable, Optional, Sequence

from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from . import errors
from .auth import RequireKey
from .bodylimit import BodyLimit
from .deps import ServerState
from .._engine import default_engine
from .metrics import Metrics, RequestTimer
from .quotas import RateLimiter
from .registry import Registry
from .routes import execution, files, sandboxes, system, volumes
from .settings import Settings
from .store import Store, lock_database


@dataclasses.dataclass
class Mount:
    """An extra ASGI app under ``path`` (the MCP endpoint at /mcp).

    ``authenticated``: requests need an API key, and the tenant is in ``scope["sandlot.tenant"]``; the
    server's state (registry, store) is at ``scope["app"].state.sandlot``. ``lifespan``: a factory of an
    async context manager run for the server's life (Starlette does not run a mounted app's own lifespan),
    e.g. the MCP streamable-HTTP session manager's ``run()``.
    """

    path: str
    app: ASGIApp
    authenticated: bool = True
    lifespan: Optional[Callable[[], AsyncContextManager]] = None


class _MountRoot:
    """Serves a mount's bare path (``/mcp``) as its root (``/mcp/``) instead of Starlette's 307 to it: an MCP
    client that does not follow redirects on POST (many do not) must reach the endpoint the README names."""

    def __init__(self, app: ASGIApp, paths: Sequence[str]) -> None:
        self.app = app
        self.paths = {path.rstrip("/") for path in paths}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("path") in self.paths:
            path = scope["path"] + "/"
            scope = dict(scope, path=path, raw_path=path.encode())
        await self.app(scope, receive, send)


_DESCRIPTION = """Self-hosted sandboxes for code written by AI agents.

Every request needs `Authorization: Bearer sl_...` (an API key from `sandlot keys create --tenant NAME`),
except `/healthz` and these docs. Errors are `{"error": {"type": <SDK exception name>, "message": ...}}`.
Calls that run code or commands can stream NDJSON events with `"stream": true`.
"""


def _name_stream_events(app: FastAPI) -> None:
    """The NDJSON events the streaming routes describe inline, as named components of the document."""
    from .schemas import with_event_components

    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = with_event_components(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Optional[Settings] = None, *, mounts: Sequence[Mount] = ()) -> FastAPI:
    settings = settings or Settings()
    store = Store(settings.db_path)
    engine = default_engine()  # this process's backends, zygotes and warm pools
    metrics = Metrics(lambda: registry.live_count(), engine.pools.stats,  # registry: bound on the next line
                      lambda: registry.network_totals())
    registry = Registry(store, settings, metrics, engine)
    state = ServerState(settings=settings, store=store, rate=RateLimiter(), registry=registry, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One server per SQLite database: otherwise each would take the other's sandboxes for lost. (None for
        # PostgreSQL, which replicas share.)
        state.lock_fd = lock_database(settings.db_path)
        # While it serves, the engine's sandboxes outlive this process (the next server takes them back); after,
        # the process's engine is what it was (an embedding program's own SDK sandboxes end with it again).
        was_durable, engine.durable = engine.durable, settings.durable
        try:
            await registry.startup()
            async with contextlib.AsyncExitStack() as stack:
                for mount in mounts:
                    if mount.lifespan is not None:
                        await stack.enter_async_context(mount.lifespan())
                yield
        finally:
            await registry.close()
            engine.durable = was_durable
            store.close()
            if state.lock_fd is not None:
                os.close(state.lock_fd)

    docs = settings.public_docs
    from .._version import __version__

    app = FastAPI(title="Sandlot", version=__version__, description=_DESCRIPTION, lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.state.sandlot = state
    errors.install(app)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request, exc) -> JSONResponse:  # the client hung up mid-upload: nobody to answer
        return JSONResponse({"error": {"type": "InvalidRequest", "message": "client disconnected"}}, status_code=400)

    for module in (sandboxes, execution, files, volumes, system):
        app.include_router(module.router)
    _name_stream_events(app)
    for mount in mounts:
        app.mount(mount.path, RequireKey(mount.app) if mount.authenticated else mount.app)
    # The last added is the outermost: timing sees every answer (413s included), the body limit guards every route.
    if mounts:
        app.add_middleware(_MountRoot, paths=[mount.path for mount in mounts])
    app.add_middleware(BodyLimit, json_limit=settings.max_json_bytes, upload_limit=settings.max_upload_bytes)
    app.add_middleware(RequestTimer, metrics=metrics)
    return app
