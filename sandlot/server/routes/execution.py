"""Running things: code in a sandbox's live, shell commands (foreground or background), one-shot code.

Each has a JSON answer and, with ``stream: true``, an NDJSON one whose events arrive while the work runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
from typing import Any, Callable, Optional, Union

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from ..._agent import protocol
from ..._exceptions import InvalidRequest, SandboxNotFound
from ..._models import CommandResult, Execution
from .. import ndjson
from ..background import BackgroundCommand
from ..deps import Owner, ServerState, State
from ..metrics import limit_label
from ..registry import LiveSandbox
from .. import schemas as api
from ..schemas import ERRORS, CommandInput, CommandSignal, RunCode, RunCommand, RunOnce, execution_out, stream_responses
from ..store import Tenant

router = APIRouter(tags=["execution"], responses=ERRORS)
_CODE_STREAM = stream_responses(api.CodeEvent)
_COMMAND_STREAM = stream_responses(api.CommandEvent)
_FOLLOW = stream_responses(api.CommandEvent, "NDJSON (application/x-ndjson): the command's output from its start, "
                                             'then live, then `{"type": "end", ...}` with the fields of its result')


def _fits_one_frame(header: dict) -> None:
    """Code, a command and its environment travel in one frame to the sandbox: refuse what cannot."""
    size = len(json.dumps(header, separators=(",", ":")))
    if size > protocol.MAX_HEADER - 1024:
        raise InvalidRequest(f"the request is too large for the sandbox ({size} bytes encoded, at most about "
                             f"{protocol.MAX_HEADER // 1024} KiB); send big inputs as files")


def _emitters(emit: Optional[ndjson.Emit]) -> dict:
    if emit is None:
        return {}
    return {"on_stdout": lambda text: emit({"type": "stdout", "text": text}),
            "on_stderr": lambda text: emit({"type": "stderr", "text": text})}


# -- code -------------------------------------------------------------------------------------------
async def _run_code(state: ServerState, live: LiveSandbox, tenant: Tenant, code: str, timeout: Optional[float],
                    emit: Optional[ndjson.Emit] = None) -> Execution:
    callbacks = _emitters(emit)
    if emit is not None:
        callbacks["on_result"] = lambda r: emit({"type": "result", "result": dataclasses.asdict(r)})
    execution = await live.sandbox.run_code(code, timeout=timeout, **callbacks)
    error = execution.error
    state.metrics.execution("code", execution.usage.wall_seconds, error.limit if error else None, error is not None)
    return execution


def _code_end(execution: Execution, emit: ndjson.Emit, live: LiveSandbox) -> dict:
    if execution.error is not None:
        emit({"type": "error", "error": dataclasses.asdict(execution.error)})
    end = {"type": "end", **execution_out(execution)}  # the same fields as the answer without stream
    sandbox = live.sandbox
    if not sandbox.is_running and not sandbox.is_paused:  # the call ended it (a limit): the client knows at once
        end["sandbox_ended"] = {"reason": sandbox.end_reason, "limit": sandbox.end_limit}
    return end


@router.post("/v1/sandboxes/{sandbox_id}/code", response_model=api.Execution, responses=_CODE_STREAM,
             summary="Run Python in the sandbox's live (state persists between calls)")
async def run_code(sandbox_id: str, body: RunCode, tenant: Owner, state: State) -> Any:
    live = await state.registry.find(tenant, sandbox_id)
    state.registry.check_call_timeout(body.timeout)
    _fits_one_frame({"t": "exec", "id": 1, "code": body.code})
    state.store.audit(tenant.name, "run_code", sandbox_id, body.code[:1000], tenant.key_id)
    if not body.stream:
        return ndjson.finite(execution_out(await _run_code(state, live, tenant, body.code, body.timeout)))

    async def work(emit: ndjson.Emit) -> dict:
        return _code_end(await _run_code(state, live, tenant, body.code, body.timeout, emit), emit, live)

    return ndjson.response(work, state.settings.heartbeat)


@router.post("/v1/run", response_model=api.Execution, responses=_CODE_STREAM,
             summary="One-shot: run code in a fresh sandbox that is gone afterwards")
async def run_once(body: RunOnce, tenant: Owner, state: State) -> Any:
    _fits_one_frame({"t": "exec", "id": 1, "code": body.code})
    state.registry.check_call_timeout(body.timeout)
    live = await state.registry.create(tenant, template=body.template,
                                          limits=body.limits.overrides() if body.limits else None, env=body.env,
                                          isolation=body.isolation, one_shot=True, mounts=body.mounts,
                                          code=body.code)
    state.store.audit(tenant.name, "run_once", None, body.code[:1000], tenant.key_id)
    if not body.stream:
        try:
            return ndjson.finite(execution_out(await _run_code(state, live, tenant, body.code, body.timeout)))
        finally:
            await state.registry.end_one_shot(live)

    async def work(emit: ndjson.Emit) -> dict:
        try:
            return _code_end(await _run_code(state, live, tenant, body.code, body.timeout, emit), emit, live)
        finally:
            await state.registry.end_one_shot(live)

    return ndjson.response(work, state.settings.heartbeat)


# -- commands ----------------------------------------------------------------------------------------
def _command_end(result: CommandResult) -> dict:
    return {"type": "end", **dataclasses.asdict(result)}  # the same fields as the answer without stream


def _background_out(command: BackgroundCommand) -> api.BackgroundCommand:
    handle = command.handle
    result = command.result
    return api.BackgroundCommand(command_id=command.id, pid=handle.pid, running=command.running,
                                 stdout=handle.stdout, stderr=handle.stderr,
                                 result=api.CommandResult(**dataclasses.asdict(result)) if result else None)


@router.post("/v1/sandboxes/{sandbox_id}/commands", response_model=Union[api.CommandResult, api.BackgroundCommand],
             responses=_COMMAND_STREAM, summary="Run a shell command (/bin/sh -c) in the sandbox")
async def run_command(sandbox_id: str, body: RunCommand, tenant: Owner, state: State) -> Any:
    live = await state.registry.find(tenant, sandbox_id)
    state.registry.check_call_timeout(body.timeout)
    stdin: Union[str, bytes, None] = body.stdin
    if body.stdin is not None and body.stdin_base64:
        try:
            stdin = base64.b64decode(body.stdin, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("stdin is not valid base64") from None
    options = {"timeout": body.timeout, "env": body.env, "cwd": body.cwd, "stdin": stdin}
    _fits_one_frame({"t": "cmd", "id": 1, "cmd": body.cmd, "env": body.env or {}, "cwd": body.cwd, "stdin": True})
    state.store.audit(tenant.name, "command", sandbox_id, body.cmd[:1000], tenant.key_id)
    if body.background:
        command = live.commands.add()
        try:
            await command.start(live.sandbox, body.cmd, **options)
        except BaseException:
            live.commands.discard(command)
            raise
        for _ in range(50):  # its pid arrives with the agent's first word about it, within milliseconds
            if command.handle.pid is not None or not command.running:
                break
            await asyncio.sleep(0.01)
        return _background_out(command)

    async def run(emit: Optional[ndjson.Emit] = None) -> CommandResult:
        result = await live.sandbox.commands.run(body.cmd, **options, **_emitters(emit))
        limit = limit_label(result)
        state.metrics.execution("command", result.usage.wall_seconds, limit, bool(result.exit_code) or bool(limit))
        return result

    if not body.stream:
        return api.CommandResult(**dataclasses.asdict(await run()))

    async def work(emit: ndjson.Emit) -> dict:
        return _command_end(await run(emit))

    return ndjson.response(work, state.settings.heartbeat)


def _listed(command: BackgroundCommand) -> api.RunningCommand:
    info = command.handle.info
    return api.RunningCommand(command_id=command.id, pid=info.pid, cmd=info.cmd, cwd=info.cwd,
                              started_at=info.started_at, running=command.running)


@router.get("/v1/sandboxes/{sandbox_id}/commands", response_model=list[api.RunningCommand],
            summary="The sandbox's background commands still running (reattach by command_id, from any client)")
async def list_commands(sandbox_id: str, tenant: Owner, state: State,
                        pid: Optional[int] = Query(None, ge=1, description=(
                            "Only the command with this pid, running or ended lately (the sandbox remembers its "
                            "last 16 commands): its exit code and output stay readable"))) -> list[api.RunningCommand]:
    live = await state.registry.find(tenant, sandbox_id)
    # The sandbox's agent knows its commands, also those an earlier server process started (a sandbox
    # re-adopted after a restart): those this process has not seen yet are adopted into its table.
    if pid is not None:
        command = await live.commands.adopt(live.sandbox, pid, running=False)
        return [] if command is None else [_listed(command)]
    listed = []
    for info in await live.sandbox.commands.list():
        command = await live.commands.adopt(live.sandbox, info.pid, running=True)
        if command is not None and command.running:
            listed.append(_listed(command))
    return listed


async def _command(state: ServerState, tenant: Tenant, sandbox_id: str, command_id: str) -> BackgroundCommand:
    command = (await state.registry.find(tenant, sandbox_id)).commands.get(command_id)
    if command is None:
        raise SandboxNotFound(f"no background command {command_id[:80]!r} in sandbox {sandbox_id}")
    return command


@router.get("/v1/sandboxes/{sandbox_id}/commands/{command_id}", response_model=api.BackgroundCommand,
            summary="A background command: output so far, and its result once it ended")
async def command_status(sandbox_id: str, command_id: str, tenant: Owner, state: State,
                         wait: float = Query(0, ge=0, le=3600, description="Wait up to this many seconds for it to end")
                         ) -> api.BackgroundCommand:
    command = await _command(state, tenant, sandbox_id, command_id)
    if wait > 0 and command.running:
        try:
            await asyncio.wait_for(command.done.wait(), wait)
        except asyncio.TimeoutError:
            pass
    return _background_out(command)


@router.get("/v1/sandboxes/{sandbox_id}/commands/{command_id}/stream", response_class=StreamingResponse,
            responses=_FOLLOW,
            summary="NDJSON: a background command's output from the start (or from a byte offset), then live")
async def command_stream(sandbox_id: str, command_id: str, tenant: Owner, state: State,
                         offset: Optional[int] = Query(None, ge=0, description=(
                             "Read from this byte of stdout and of stderr (a client that reconnects gives what it "
                             "has read): the sandbox keeps the newest `output`-limit bytes of a command; the first "
                             'event, {"type": "offsets", "stdout": N, "stderr": M}, says where the text starts, '
                             '{"type": "replayed"} follows what it had printed by then')),
                         stderr_offset: Optional[int] = Query(None, ge=0, description="stderr's own offset")) -> Any:
    live = await state.registry.find(tenant, sandbox_id)
    command = await _command(state, tenant, sandbox_id, command_id)
    if offset is not None or stderr_offset is not None:
        return await _stream_from(live, command, offset or 0, offset or 0 if stderr_offset is None else stderr_offset,
                                  state)

    async def work(emit: ndjson.Emit) -> dict:
        async for event in command.follow():
            emit(event)
        if command.failure is not None:
            raise command.failure
        return _command_end(command.result)

    return ndjson.response(work, state.settings.heartbeat)


async def _stream_from(live: LiveSandbox, command: BackgroundCommand, stdout: int, stderr: int,
                       state: ServerState) -> Any:
    """A command's output from byte offsets, read again from the sandbox's agent (which keeps it in bytes)."""
    replayed: list[dict] = []  # what arrives before the stream starts (connect returns with the replay)
    forward: list[Callable[[dict], None]] = [replayed.append]
    handle = await live.sandbox.commands.connect(
        command.handle.pid, offset={"stdout": stdout, "stderr": stderr},
        on_stdout=lambda text: forward[0]({"type": "stdout", "text": text}),
        on_stderr=lambda text: forward[0]({"type": "stderr", "text": text}))

    async def work(emit: ndjson.Emit) -> dict:
        try:
            emit({"type": "offsets", **handle.offsets})
            for event in replayed:
                emit(event)
            emit({"type": "replayed"})  # what it had printed when this reader came is all above
            forward[0] = emit
            result = await handle.wait()
            if command.result is not None:  # what ended it (a limit, a timeout), as its own handle saw it
                result = dataclasses.replace(result, error=command.result.error, limit=command.result.limit)
            return _command_end(result)
        finally:
            await handle.detach()  # a client that went away: the agent stops sending to this reader

    # A reader only: when its client goes away it stops (the command runs on), unlike a call's own work.
    return ndjson.response(work, state.settings.heartbeat, cancel_on_leave=True)


@router.post("/v1/sandboxes/{sandbox_id}/commands/{command_id}/kill", response_model=api.BackgroundCommand,
             summary="Signal a background command (default SIGKILL)")
async def command_kill(sandbox_id: str, command_id: str, body: CommandSignal, tenant: Owner,
                       state: State) -> api.BackgroundCommand:
    command = await _command(state, tenant, sandbox_id, command_id)
    await command.handle.kill(body.signal)
    return _background_out(command)


@router.post("/v1/sandboxes/{sandbox_id}/commands/{command_id}/stdin", response_model=api.BackgroundCommand,
             summary="Write to a background command's stdin")
async def command_stdin(sandbox_id: str, command_id: str, body: CommandInput, tenant: Owner,
                        state: State) -> api.BackgroundCommand:
    command = await _command(state, tenant, sandbox_id, command_id)
    try:
        data = base64.b64decode(body.data, validate=True) if body.base64 else body.data.encode()
    except (binascii.Error, ValueError):
        raise InvalidRequest("data is not valid base64") from None
    if command.running:
        await command.handle.send_stdin(data, body.close)
    return _background_out(command)
