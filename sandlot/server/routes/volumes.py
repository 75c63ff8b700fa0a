"""Named volumes: your tenant's, by name (another tenant's volume of the same name is another volume)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ..deps import Owner, State
from ..schemas import ERRORS, CreateVolume, Volume

router = APIRouter(prefix="/v1/volumes", tags=["volumes"], responses=ERRORS)


def volume_out(info) -> Volume:
    return Volume(**info.to_json())


@router.post("", status_code=201, response_model=Volume,
             summary="Make a named volume (size and inode cap enforced by the kernel); mount it with 'vol:NAME'")
async def create(body: CreateVolume, tenant: Owner, state: State) -> Volume:
    return volume_out(await state.registry.volumes.create(tenant, body.name, body.size, body.inodes))


@router.get("", response_model=list[Volume], summary="List your volumes")
async def list_volumes(tenant: Owner, state: State) -> list[Volume]:
    return [volume_out(v) for v in await state.registry.volumes.list(tenant)]


@router.get("/{name}", response_model=Volume, summary="One volume (InvalidRequest if you have none of that name)")
async def get(name: str, tenant: Owner, state: State) -> Volume:
    return volume_out(await state.registry.volumes.info(tenant, name))


@router.delete("/{name}", status_code=204, response_class=Response,
               summary="Delete a volume and its files (refused while a sandbox has it mounted)")
async def delete(name: str, tenant: Owner, state: State) -> Response:
    await state.registry.volumes.delete(tenant, name)
    return Response(status_code=204)
