"""Files inside a sandbox: streamed upload and download, list, stat, exists, remove, mkdir.

Paths are resolved by the sandbox's own agent, inside its root: ``../../etc/passwd`` or a planted
symlink can only ever reach the sandbox's own files, never the server's.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, AsyncIterator, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from ..deps import Owner, State
from ..schemas import ERRORS, DirCreated, FileEntry, MakeDir, PathExists

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/files", tags=["files"], responses=ERRORS)
Path = Annotated[str, Query(min_length=1, max_length=4096, description="Absolute, or relative to /home/user")]
_UPLOAD = {"requestBody": {"required": True, "description": "The file's bytes (streamed; any length up to the "
                           "server's upload limit and the sandbox's disk)",
                           "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _entry(info) -> FileEntry:
    return FileEntry(**dataclasses.asdict(info))


@router.put("", response_model=FileEntry, openapi_extra=_UPLOAD, summary="Upload (streamed) a file")
async def upload(sandbox_id: str, path: Path, request: Request, tenant: Owner, state: State,
                 append: bool = False) -> FileEntry:
    live = await state.registry.find(tenant, sandbox_id)
    state.store.audit(tenant.name, "file_write", sandbox_id, path, tenant.key_id)
    return _entry(await live.sandbox.files.write(path, request.stream(), append=append))


@router.get("", response_class=StreamingResponse, summary="Download (streamed) a file",
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}},
                             "description": "The file's bytes",
                             "headers": {"Content-Length": {"schema": {"type": "integer"}, "description":
                                         "the file's size (absent for a pseudo-file that reports none, like "
                                         "those in /proc: then the body is chunked)"}}}})
async def download(sandbox_id: str, path: Path, tenant: Owner, state: State) -> Any:
    live = await state.registry.find(tenant, sandbox_id)
    entry = await live.sandbox.files.stat(path)  # a missing path is a 404 here, before any byte
    size = entry.size if entry.type == "file" else None  # a symlink's own size is not its target's: no promise
    stream = await live.sandbox.files.read(path, format="stream")
    # Pull the first chunk before answering, so an unreadable file is an error and not a broken 200.
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        return Response(b"", media_type="application/octet-stream")
    if not size:  # a pseudo-file (/proc) reports 0 and has bytes all the same, a symlink: no length to promise
        return StreamingResponse(_body(first, stream, None), media_type="application/octet-stream")
    return StreamingResponse(_body(first, stream, size), media_type="application/octet-stream",
                             headers={"Content-Length": str(size)})


async def _body(first: bytes, stream: AsyncIterator[bytes], size: Optional[int]) -> AsyncIterator[bytes]:
    """The file's chunks; with a promised ``size``, never more than that (a file that grew meanwhile is cut
    there, so the length stays true; one that shrank ends short, which the client sees as a broken read)."""
    left = size
    try:
        async for chunk in _chain(first, stream):
            if left is not None:
                chunk = chunk[:left]
                left -= len(chunk)
            if chunk:
                yield chunk
            if left == 0:
                return
    finally:
        await stream.aclose()


async def _chain(first: bytes, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in stream:
        yield chunk


@router.delete("", status_code=204, summary="Remove a file or a directory tree")
async def remove(sandbox_id: str, path: Path, tenant: Owner, state: State) -> Response:
    live = await state.registry.find(tenant, sandbox_id)
    state.store.audit(tenant.name, "file_remove", sandbox_id, path, tenant.key_id)
    await live.sandbox.files.remove(path)
    return Response(status_code=204)


@router.get("/list", response_model=list[FileEntry], summary="List a directory")
async def list_dir(sandbox_id: str, tenant: Owner, state: State, path: Path = "/home/user",
                   depth: Annotated[int, Query(ge=1, le=32)] = 1) -> list[FileEntry]:
    live = await state.registry.find(tenant, sandbox_id)
    return [_entry(e) for e in await live.sandbox.files.list(path, depth=depth)]


@router.get("/stat", response_model=FileEntry, summary="Describe one path")
async def stat(sandbox_id: str, path: Path, tenant: Owner, state: State) -> FileEntry:
    return _entry(await (await state.registry.find(tenant, sandbox_id)).sandbox.files.stat(path))


@router.get("/exists", response_model=PathExists, summary="Whether a path exists")
async def exists(sandbox_id: str, path: Path, tenant: Owner, state: State) -> PathExists:
    return PathExists(exists=await (await state.registry.find(tenant, sandbox_id)).sandbox.files.exists(path))


@router.post("/mkdir", response_model=DirCreated, summary="Make a directory and its parents")
async def mkdir(sandbox_id: str, body: MakeDir, tenant: Owner, state: State) -> DirCreated:
    live = await state.registry.find(tenant, sandbox_id)
    state.store.audit(tenant.name, "mkdir", sandbox_id, body.path, tenant.key_id)
    return DirCreated(created=await live.sandbox.files.mkdir(body.path))
