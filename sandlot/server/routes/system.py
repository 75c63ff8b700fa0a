"""Health (no key: load balancers and `sandlot doctor` probe it), what a tenant may ask for (/v1/info, a tenant's
key) and Prometheus metrics (an operator's key: they span every tenant)."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..._limits import Limits as SdkLimits
from ..._templates import template_names
from ..deps import OperatorKey, Owner, State
from ..schemas import ERRORS, Health, Limits, Quotas, ServerInfo, TenantUsage
from ..settings import quotas_for

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health, summary="Liveness (no API key needed; says nothing else)")
async def healthz() -> Health:
    return Health()


@router.get("/v1/info", response_model=ServerInfo, responses=ERRORS,
            summary="What you may ask for: templates, tiers, default limits, ceilings, your quotas and usage")
async def info(tenant: Owner, state: State) -> ServerInfo:
    from ..._version import __version__

    ceilings = state.settings.ceilings
    usage = state.registry.usage(tenant)
    volumes, volume_size = await state.registry.volumes.usage(tenant)
    roots = list(state.settings.host_dir_roots)
    return ServerInfo(version=__version__, templates=template_names(), isolations=list(state.settings.isolations),
                   defaults=Limits(**ceilings.lower_defaults(SdkLimits(), {}).to_dict()),
                   ceilings=Limits(**ceilings.to_dict()),
                   quotas=Quotas(**dataclasses.asdict(quotas_for(state.settings, tenant))),
                   usage=TenantUsage(live=usage.live, memory=usage.memory, pids=usage.pids,
                                     paused_bytes=usage.paused_bytes),
                   network={"allowed": state.settings.allow_network, "within": list(state.settings.network_ceiling)},
                   mounts={"host_dirs": bool(roots), "host_dir_roots": roots, "volumes": volumes,
                           "volume_size": volume_size})


@router.get("/metrics", summary="Prometheus metrics (an operator key: `sandlot keys create --operator`)",
            response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **ERRORS})
async def metrics(operator: OperatorKey, state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
