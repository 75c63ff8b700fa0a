"""Named volumes: your tenant's, by name (another tenant's volume of the same name is another volume)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ..deps import Owner, State
from ..schemas import CreateVolume, ErrorBody, VolumeOut

router = APIRouter(prefix="/v1/volumes", tags=["volumes"],
                   responses={code: {"model": ErrorBody} for code in (400, 401, 422, 429)})


def volume_out(info) -> VolumeOut:
    return VolumeOut(**info.to_json())


@router.post("", status_code=201, response_model=VolumeOut,
             summary="Make a named volume (size and inode cap enforced by the kernel); mount it with 'vol:NAME'")
async def create(body: CreateVolume, tenant: Owner, state: State) -> VolumeOut:
    return volume_out(await state.registry.volumes.create(tenant, body.name, body.size, body.inodes))


@router.get("", response_model=list[VolumeOut], summary="List your volumes")
async def list_volumes(tenant: Owner, state: State) -> list[VolumeOut]:
    return [volume_out(v) for v in await state.registry.volumes.list(tenant)]


@router.get("/{name}", response_model=VolumeOut, summary="One volume (InvalidRequest if you have none of that name)")
async def get(name: str, tenant: Owner, state: State) -> VolumeOut:
    return volume_out(await state.registry.volumes.info(tenant, name))


@router.delete("/{name}", status_code=204, response_class=Response,
               summary="Delete a volume and its files (refused while a sandbox has it mounted)")
async def delete(name: str, tenant: Owner, state: State) -> Response:
    await state.registry.volumes.delete(tenant, name)
    return Response(status_code=204)
