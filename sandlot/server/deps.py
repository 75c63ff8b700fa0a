"""FastAPI dependencies shared by the routes: the server's state and the authenticated tenant."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Optional

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .auth import authenticate, authenticate_operator
from .metrics import Metrics
from .quotas import RateLimiter
from .registry import Registry
from .settings import Settings
from .store import Store, Tenant


@dataclasses.dataclass
class ServerState:
    """Everything a request may need, at ``app.state.sandlot`` (mounted apps reach it via ``scope["app"]``)."""

    settings: Settings
    store: Store
    rate: RateLimiter
    registry: Registry
    metrics: Metrics
    lock_fd: Optional[int] = None


def get_state(request: Request) -> ServerState:
    return request.app.state.sandlot


# HTTPBearer only documents the scheme in OpenAPI (the "Authorize" button of /docs); authenticate checks it.
_bearer = HTTPBearer(auto_error=False, description="An API key: `sandlot keys create --tenant NAME`")


async def _owner(request: Request, _: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> Tenant:
    return await authenticate(request)


async def _operator(request: Request, _: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> Tenant:
    return await authenticate_operator(request)


Owner = Annotated[Tenant, Depends(_owner)]
OperatorKey = Annotated[Tenant, Depends(_operator)]
State = Annotated[ServerState, Depends(get_state)]
