"""Files inside a sandbox: streamed upload and download, list, stat, exists, remove, mkdir.

Paths are resolved by the sandbox's own agent, inside its root: ``../../etc/passwd`` or a planted
symlink can only ever reach the sandbox's own files, never the server's.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from ..deps import Owner, State
from ..schemas import EntryOut, ErrorBody, ExistsOut, MakeDir, MakeDirOut

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/files", tags=["files"],
                   responses={code: {"model": ErrorBody} for code in (400, 401, 404, 413, 422, 429)})
Path = Annotated[str, Query(min_length=1, max_length=4096, description="Absolute, or relative to /home/user")]
_UPLOAD = {"requestBody": {"required": True, "description": "The file's bytes (streamed; any length up to the "
                           "server's upload limit and the sandbox's disk)",
                           "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _entry(info) -> EntryOut:
    return EntryOut(**dataclasses.asdict(info))


@router.put("", response_model=EntryOut, openapi_extra=_UPLOAD, summary="Upload (streamed) a file")
async def upload(sandbox_id: str, path: Path, request: Request, tenant: Owner, state: State,
                 append: bool = False) -> EntryOut:
    live = state.registry.get(tenant, sandbox_id)
    state.store.audit(tenant.name, "file_write", sandbox_id, path, tenant.key_id)
    return _entry(await live.sandbox.files.write(path, request.stream(), append=append))


@router.get("", response_class=StreamingResponse, summary="Download (streamed) a file",
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"}})
async def download(sandbox_id: str, path: Path, tenant: Owner, state: State) -> Any:
    live = state.registry.get(tenant, sandbox_id)
    stream = await live.sandbox.files.read(path, format="stream")
    # Pull the first chunk before answering, so a missing file is a 404 and not a broken 200.
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        return Response(b"", media_type="application/octet-stream")

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    return StreamingResponse(body(), media_type="application/octet-stream")


@router.delete("", status_code=204, summary="Remove a file or a directory tree")
async def remove(sandbox_id: str, path: Path, tenant: Owner, state: State) -> Response:
    live = state.registry.get(tenant, sandbox_id)
    state.store.audit(tenant.name, "file_remove", sandbox_id, path, tenant.key_id)
    await live.sandbox.files.remove(path)
    return Response(status_code=204)


@router.get("/list", response_model=list[EntryOut], summary="List a directory")
async def list_dir(sandbox_id: str, tenant: Owner, state: State, path: Path = "/home/user",
                   depth: Annotated[int, Query(ge=1, le=32)] = 1) -> list[EntryOut]:
    live = state.registry.get(tenant, sandbox_id)
    return [_entry(e) for e in await live.sandbox.files.list(path, depth=depth)]


@router.get("/stat", response_model=EntryOut, summary="Describe one path")
async def stat(sandbox_id: str, path: Path, tenant: Owner, state: State) -> EntryOut:
    return _entry(await state.registry.get(tenant, sandbox_id).sandbox.files.stat(path))


@router.get("/exists", response_model=ExistsOut, summary="Whether a path exists")
async def exists(sandbox_id: str, path: Path, tenant: Owner, state: State) -> ExistsOut:
    return ExistsOut(exists=await state.registry.get(tenant, sandbox_id).sandbox.files.exists(path))


@router.post("/mkdir", response_model=MakeDirOut, summary="Make a directory and its parents")
async def mkdir(sandbox_id: str, body: MakeDir, tenant: Owner, state: State) -> MakeDirOut:
    live = state.registry.get(tenant, sandbox_id)
    state.store.audit(tenant.name, "mkdir", sandbox_id, body.path, tenant.key_id)
    return MakeDirOut(created=await live.sandbox.files.mkdir(body.path))
