"""Health (no key needed: load balancers and `sandlot doctor` probe it) and Prometheus metrics (a key needed)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..._templates import template_names
from ..deps import Owner, State
from ..schemas import HealthOut

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness (no API key needed)")
async def healthz(state: State) -> HealthOut:
    from ... import __version__

    return HealthOut(version=__version__, live_sandboxes=state.registry.live_count(), templates=template_names(),
                     isolations=list(state.settings.isolations))


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(tenant: Owner, state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
