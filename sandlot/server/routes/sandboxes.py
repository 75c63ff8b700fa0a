"""Sandboxes: create, list (with metadata filters), get, kill, extend, keep alive, metrics, network."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ..._exceptions import InvalidRequest
from ..deps import Owner, State
from ..schemas import (ERRORS, CreateSandbox, Error, Limits, NetworkDecision, NetworkPolicy, PauseInfo, Sandbox,
                       SandboxMetrics, SetTimeout, UpdateNetwork, when)
from ..store import SandboxRow

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"], responses=ERRORS)


def sandbox_out(row: SandboxRow) -> Sandbox:
    return Sandbox(sandbox_id=row.id, template=row.template, isolation=row.isolation, status=row.status,
                      metadata=row.metadata,
                      limits=Limits(**row.limits), created_at=when(row.created_at), expires_at=when(row.expires_at),
                      ended_at=when(row.ended_at), end_reason=row.end_reason, on_idle=row.on_idle)


@router.post("", status_code=201, response_model=Sandbox, summary="Create a sandbox")
async def create(body: CreateSandbox, tenant: Owner, state: State) -> Sandbox:
    live = await state.registry.create(tenant, template=body.template, timeout=body.timeout,
                                       limits=body.limits.overrides() if body.limits else None,
                                       env=body.env, metadata=body.metadata, isolation=body.isolation,
                                       network=body.network, secrets=body.secrets, mounts=body.mounts,
                                       on_idle=body.on_idle)
    return sandbox_out(state.registry.row(tenant, live.id))


def _metadata_filter(pairs: list[str]) -> dict[str, str]:
    wanted = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"metadata filter {pair[:80]!r} must look like key=value")
        wanted[key] = value
    return wanted


@router.get("", response_model=list[Sandbox], summary="List your sandboxes")
async def list_sandboxes(
        tenant: Owner, state: State,
        metadata: Annotated[list[str], Query(max_length=64, description="key=value; repeat to require several")] = [],
        status: Literal["running", "paused", "ended", "lost", "all"] = "running",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Sandbox]:
    state.registry.collect()
    rows = state.store.sandboxes(tenant, metadata=_metadata_filter(metadata),
                                 status=None if status == "all" else status, limit=limit)
    return [sandbox_out(r) for r in rows]


@router.get("/{sandbox_id}", response_model=Sandbox, summary="One sandbox (also after it ended or was lost)")
async def get(sandbox_id: str, tenant: Owner, state: State) -> Sandbox:
    return sandbox_out(state.registry.row(tenant, sandbox_id))


@router.delete("/{sandbox_id}", response_model=Sandbox, summary="Kill a sandbox (idempotent)")
async def kill(sandbox_id: str, tenant: Owner, state: State) -> Sandbox:
    return sandbox_out(await state.registry.kill(tenant, sandbox_id))


@router.post("/{sandbox_id}/timeout", response_model=Sandbox, summary="Let it live this long from now")
async def set_timeout(sandbox_id: str, body: SetTimeout, tenant: Owner, state: State) -> Sandbox:
    return sandbox_out(await state.registry.set_timeout(tenant, sandbox_id, body.timeout))


@router.post("/{sandbox_id}/keepalive", response_model=Sandbox, summary="Restart its idle timeout")
async def keep_alive(sandbox_id: str, tenant: Owner, state: State) -> Sandbox:
    await (await state.registry.find(tenant, sandbox_id)).sandbox.keep_alive()
    return sandbox_out(state.registry.row(tenant, sandbox_id))


@router.post("/{sandbox_id}/pause", response_model=PauseInfo,
             summary="Checkpoint it to disk and free its memory (gVisor tier); it survives a server restart")
async def pause(sandbox_id: str, tenant: Owner, state: State) -> PauseInfo:
    info = await state.registry.pause(tenant, sandbox_id)
    return PauseInfo(sandbox_id=sandbox_id, status="paused", seconds=info.seconds,
                    checkpoint_bytes=info.checkpoint_bytes)


@router.post("/{sandbox_id}/resume", response_model=PauseInfo,
             summary="Bring a paused sandbox back with its variables, open files and working directory")
async def resume(sandbox_id: str, tenant: Owner, state: State) -> PauseInfo:
    info = await state.registry.resume(tenant, sandbox_id)
    return PauseInfo(sandbox_id=sandbox_id, status="running", seconds=info.seconds)


@router.post("/{sandbox_id}/fork", status_code=201, response_model=Sandbox,
             summary="A new sandbox with a copy of this live session (variables, files, cwd): gVisor tier")
async def fork(sandbox_id: str, tenant: Owner, state: State) -> Sandbox:
    live = await state.registry.fork(tenant, sandbox_id)
    return sandbox_out(state.registry.row(tenant, live.id))


@router.post("/{sandbox_id}/interrupt", response_model=Sandbox,
             summary="KeyboardInterrupt to the code running now (the live keeps its variables)")
async def interrupt(sandbox_id: str, tenant: Owner, state: State) -> Sandbox:
    await (await state.registry.find(tenant, sandbox_id)).sandbox.interrupt()
    return sandbox_out(state.registry.row(tenant, sandbox_id))


@router.get("/{sandbox_id}/metrics", response_model=SandboxMetrics, summary="Memory, CPU, processes (from its cgroup)")
async def metrics(sandbox_id: str, tenant: Owner, state: State) -> SandboxMetrics:
    m = await (await state.registry.find(tenant, sandbox_id)).sandbox.metrics()
    return SandboxMetrics(**dataclasses.asdict(m))


@router.put("/{sandbox_id}/network", response_model=NetworkPolicy,
            summary="Replace its allow and/or deny rules, live (connections no longer allowed are cut)")
async def update_network(sandbox_id: str, body: UpdateNetwork, tenant: Owner, state: State) -> NetworkPolicy:
    policy = await state.registry.update_network(tenant, sandbox_id, body.allow, body.deny)
    return NetworkPolicy(sandbox_id=sandbox_id, network=policy)


@router.get("/{sandbox_id}/network/log", response_model=list[NetworkDecision],
            summary="Its network decisions, oldest first (DNS answers and connections: allowed, denied, revoked)")
async def network_log(sandbox_id: str, tenant: Owner, state: State,
                      since: Annotated[Optional[float], Query(description="only decisions after this time")] = None
                      ) -> list[NetworkDecision]:
    entries = await (await state.registry.find(tenant, sandbox_id)).sandbox.network.log(since)
    return [NetworkDecision(**{k: v for k, v in e.items() if k in NetworkDecision.model_fields}) for e in entries]


_PORT_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


async def port_proxy(sandbox_id: str, port: int, path: str, request: Request, tenant: Owner,
                     state: State) -> StreamingResponse:
    from ..._net.ports import check_port

    live = await state.registry.find(tenant, sandbox_id)
    target = "/" + path + (f"?{request.url.query}" if request.url.query else "")
    headers = [(k, v) for k, v in request.headers.items()]
    status, out_headers, body = await live.local.proxy(check_port(port), request.method, target, headers,
                                                       request.stream())
    response = StreamingResponse(body, status_code=status)
    response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in out_headers]  # repeats kept
    return response


# One operation per method, each with its own id (one route for all would give them one id, which breaks
# client generators).
for _method in _PORT_METHODS:
    router.add_api_route("/{sandbox_id}/ports/{port}/{path:path}", port_proxy, methods=[_method],
                         operation_id=f"port_proxy_{_method.lower()}",
                         summary="HTTP to a server the sandbox's code started on that port (sb.get_url(port))",
                         responses={502: {"model": Error,
                                          "description": "nothing listens on that port in the sandbox"}})
