"""Authentication: ``Authorization: Bearer sl_...`` on every request (except /healthz and the docs).

Two ways in, one check: :func:`authenticate` is the FastAPI dependency of every route, and
:class:`RequireKey` wraps a mounted ASGI app (the MCP endpoint) so it gets the same keys, the same
rate limit and the tenant in ``scope["sandlot.tenant"]``. Admin work (tenants, keys, quotas) is not on
HTTP at all: it goes through the CLI, which opens the database directly.

Every key has a role. A tenant's key acts for its tenant (sandboxes, /mcp); an operator's key
(`sandlot keys create --operator`) reads what spans tenants (/metrics) and acts for nobody. A valid key
used outside its role is a 403; a missing or unknown one a 401.
"""

from __future__ import annotations

from typing import Optional

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .._exceptions import AuthError, SandlotError
from .errors import Forbidden
from .settings import quotas_for
from .store import Tenant


def bearer_token(header: Optional[str]) -> Optional[str]:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


_WRONG_ROLE = {
    "tenant": "an operator key acts for no tenant: it cannot create, see or use sandboxes (use a tenant's key, "
              "`sandlot keys create --tenant NAME`)",
    "operator": "this endpoint needs an operator key (`sandlot keys create --operator`); a tenant's key cannot read it",
}


def check_key(state, header: Optional[str], role: str = "tenant") -> Tenant:
    """The tenant of a valid key with ``role``, after charging one request to its rate.
    Raises AuthError (401), Forbidden (403, a key of another role) or QuotaExceeded."""
    token = bearer_token(header)
    if token is None:
        raise AuthError("missing API key: send 'Authorization: Bearer sl_...' (create one with `sandlot keys create`)")
    tenant = state.store.authenticate(token)
    if tenant is None:
        raise AuthError("invalid or revoked API key")
    state.rate.check(tenant.id, tenant.name, quotas_for(state.settings, tenant).requests_per_minute)
    if tenant.role != role:
        raise Forbidden(_WRONG_ROLE[role])
    return tenant


async def authenticate(request: Request) -> Tenant:
    """FastAPI dependency: ``tenant: Tenant = Depends(authenticate)``."""
    tenant = check_key(request.app.state.sandlot, request.headers.get("authorization"))
    request.state.tenant = tenant
    return tenant


async def authenticate_operator(request: Request) -> Tenant:
    """FastAPI dependency of the operator's endpoints (/metrics)."""
    return check_key(request.app.state.sandlot, request.headers.get("authorization"), role="operator")


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
