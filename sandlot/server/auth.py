"""Authentication: ``Authorization: Bearer sl_...`` on every request (except /healthz and the docs).

Two ways in, one check: :func:`authenticate` is the FastAPI dependency of every route, and
:class:`RequireKey` wraps a mounted ASGI app (the MCP endpoint) so it gets the same keys, the same
rate limit and the tenant in ``scope["sandlot.tenant"]``. Admin work (tenants, keys, quotas) is not on
HTTP at all: it goes through the CLI, which opens the database directly.
"""

from __future__ import annotations

from typing import Optional

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .._exceptions import AuthError, SandlotError
from .settings import quotas_for
from .store import Tenant


def bearer_token(header: Optional[str]) -> Optional[str]:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def check_key(state, header: Optional[str]) -> Tenant:
    """The tenant of a valid key, after charging one request to its rate. Raises AuthError / QuotaExceeded."""
    token = bearer_token(header)
    if token is None:
        raise AuthError("missing API key: send 'Authorization: Bearer sl_...' (create one with `sandlot keys create`)")
    tenant = state.store.authenticate(token)
    if tenant is None:
        raise AuthError("invalid or revoked API key")
    state.rate.check(tenant.id, tenant.name, quotas_for(state.settings, tenant).requests_per_minute)
    return tenant


async def authenticate(request: Request) -> Tenant:
    """FastAPI dependency: ``tenant: Tenant = Depends(authenticate)``."""
    tenant = check_key(request.app.state.sandlot, request.headers.get("authorization"))
    request.state.tenant = tenant
    return tenant


class RequireKey:
    """ASGI wrapper: only requests with a valid key reach ``app``; the tenant travels in the scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            tenant = check_key(scope["app"].state.sandlot, headers.get("authorization"))
        except SandlotError as exc:
            from .errors import error_response

            await error_response(exc)(scope, receive, send)
            return
        scope["sandlot.tenant"] = tenant
        await self.app(scope, receive, send)
