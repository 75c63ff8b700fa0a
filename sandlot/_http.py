"""The HTTP transport: sandboxes on a Sandlot server, over REST and NDJSON streams (httpx).

``AsyncSandbox(api_url=..., api_key=...)`` (or SANDLOT_API_URL / SANDLOT_API_KEY) puts an
:class:`HTTPTransport` under the sandbox; its handles are :class:`RemoteSandbox`. Output callbacks fire as
the server streams NDJSON events; the server's errors come back, through the one table in _wire.py, as
the exceptions a local sandbox raises.

A remote sandbox is not tied to this process: it lives on the server until it is killed (``with`` blocks
kill on exit) or times out, and ``Sandbox.connect(sandbox_id)`` reattaches to it from anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import time
import weakref
from datetime import datetime
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Optional, Union
from urllib.parse import quote

import httpx

from . import _config
from ._calls import chunks as _chunks
from ._exceptions import InvalidRequest, SandboxCrashed, SandboxNotFound, SandlotError, ServerUnavailable, TimeoutError
from ._limits import Limits
from ._models import (CommandResult, EntryInfo, Execution, ExecutionError, PauseInfo, Result, SandboxInfo,
                      SandboxMetrics, Usage, VolumeInfo)
from ._output import OutputHandler, TextLog, call as _call
from ._spec import SandboxSpec
from ._transport import (AsyncCommandHandle, CommandInfo, CommandsHandle, FilesHandle, ResultHandler, SandboxHandle,
                         Transport)
from ._wire import from_wire
# Streams carry a ping at least every 15 s (the server's heartbeat), so a silent minute means a dead peer.
_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# A fork checkpoints and restores a whole session (a big one under gVisor's ptrace takes a while).
_FORK_TIMEOUT = httpx.Timeout(10.0, read=600.0)
_UPLOAD_TIMEOUT = httpx.Timeout(60.0, connect=10.0, write=None)

def _error_of(response: httpx.Response) -> SandlotError:
    try:
        detail = response.json().get("error")
    except (ValueError, AttributeError):
        detail = None
    if not isinstance(detail, dict):
        detail = {"message": f"HTTP {response.status_code}: {response.text[:300]}"}
    return from_wire(response.status_code, detail)


class _Server:
    """One server (URL and key). Its httpx client is per event loop: an AsyncClient belongs to its loop."""

    _clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict]" = weakref.WeakKeyDictionary()

    def __init__(self, api_url: Optional[str], api_key: Optional[str]) -> None:
        url = api_url or _config.api_url()
        if not url:
            raise InvalidRequest("no Sandlot server given: pass api_url= or set SANDLOT_API_URL")
        if not url.startswith(("http://", "https://")):
            raise InvalidRequest(f"api_url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.key = api_key if api_key is not None else _config.api_key()

    def client(self) -> httpx.AsyncClient:
        clients = self._clients.setdefault(asyncio.get_running_loop(), {})
        client = clients.get((self.url, self.key))
        if client is None or client.is_closed:
            from ._version import __version__

            headers = {"User-Agent": f"sandlot-python/{__version__}"}
            if self.key:
                headers["Authorization"] = f"Bearer {self.key}"
            client = clients[(self.url, self.key)] = httpx.AsyncClient(
                base_url=self.url, headers=headers, timeout=_TIMEOUT,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        return client

    @contextlib.contextmanager
    def _transport_errors(self):
        try:
            yield
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"the Sandlot server at {self.url} did not answer in time ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"lost the Sandlot server at {self.url}: {type(exc).__name__}: {exc}") from None

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._transport_errors():
            response = await self.client().request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error_of(response)
        return response

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        with self._transport_errors():
            async with self.client().stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_of(response)
                yield response

    async def events(self, method: str, path: str, handlers: Mapping[str, Callable[[dict], Awaitable[None]]],
                     **kwargs: Any) -> dict:
        """Follow an NDJSON stream: each event goes to its handler; returns the final ``end`` event."""
        async with self.stream(method, path, **kwargs) as response:
            async for raw in response.aiter_lines():
                if not raw.strip():
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    raise SandlotError(f"the server sent a malformed event: {raw[:200]!r}") from None
                kind = event.get("type")
                if kind == "end":
                    return event
                if kind == "exception":
                    raise from_wire(200, event.get("error") or {})
                handler = handlers.get(kind)
                if handler is not None:
                    await handler(event)
        raise SandlotError(f"the server at {self.url} ended the stream before the call finished")


# -- conversions from the wire -------------------------------------------------------------------------
def _fields(cls: type, raw: Mapping[str, Any]) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}  # newer servers may add fields


def _result(raw: Mapping[str, Any]) -> Result:
    return Result(**_fields(Result, raw))


def _usage(raw: Optional[Mapping[str, Any]]) -> Usage:
    return Usage(**_fields(Usage, raw or {}))


def _entry(raw: Mapping[str, Any]) -> EntryInfo:
    return EntryInfo(**_fields(EntryInfo, raw))


def _when(raw: Optional[str]) -> Optional[datetime]:
    return None if raw is None else datetime.fromisoformat(raw.replace("Z", "+00:00"))


def _info(raw: Mapping[str, Any]) -> SandboxInfo:
    return SandboxInfo(sandbox_id=raw["sandbox_id"], template=raw["template"], status=raw["status"],
                       isolation=str(raw.get("isolation") or "process"),
                       metadata=dict(raw.get("metadata") or {}), limits=dict(raw.get("limits") or {}),
                       created_at=_when(raw["created_at"]), expires_at=_when(raw.get("expires_at")),
                       ended_at=_when(raw.get("ended_at")), end_reason=raw.get("end_reason"))


def _stdin_body(data: Union[str, bytes]) -> dict:
    if isinstance(data, str):
        return {"data": data, "base64": False}
    return {"data": base64.b64encode(bytes(data)).decode(), "base64": True}


async def _execute(server: _Server, path: str, body: dict, on_stdout: Optional[OutputHandler],
                   on_stderr: Optional[OutputHandler], on_result: Optional[ResultHandler]) -> tuple[Execution, dict]:
    """Run code through a streaming endpoint, firing the callbacks as events arrive; the execution and the
    stream's end event."""
    execution = Execution()
    logs = {"stdout": TextLog(), "stderr": TextLog()}  # small chunks merged, as the local SDK stores them

    async def stdout(event: dict) -> None:
        logs["stdout"].append(event["text"])
        await _call(on_stdout, event["text"])

    async def stderr(event: dict) -> None:
        logs["stderr"].append(event["text"])
        await _call(on_stderr, event["text"])

    async def result(event: dict) -> None:
        value = _result(event["result"])
        execution.results.append(value)
        await _call(on_result, value)

    async def error(event: dict) -> None:
        execution.error = ExecutionError(**_fields(ExecutionError, event["error"]))

    end = await server.events("POST", path, {"stdout": stdout, "stderr": stderr, "result": result, "error": error},
                              json=dict(body, stream=True))
    execution.logs.stdout, execution.logs.stderr = logs["stdout"].chunks(), logs["stderr"].chunks()
    count = end.get("execution_count")
    execution.execution_count = count if isinstance(count, int) else None
    execution.usage = _usage(end.get("usage"))
    execution.truncated = bool(end.get("truncated"))
    return execution, end


class RemoteSandbox(SandboxHandle):
    """A sandbox on a Sandlot server, as the server describes it (its limits after the server's ceilings)."""

    dies_with_owner = False

    def __init__(self, server: _Server, raw: Mapping[str, Any]) -> None:
        self._server = server
        self._ended: Optional[str] = None
        self._end_limit: Optional[str] = None
        self._last_call = time.monotonic()
        info = _info(raw)
        # The server ends it at its lifetime and after its idle timeout: this client counts the same clocks
        # (its own calls as the activity; another client's calls it does not see).
        self._expires = info.expires_at.timestamp() if info.expires_at else float("inf")
        self.sandbox_id = info.sandbox_id
        self.template = info.template
        self.isolation = info.isolation
        self.metadata = info.metadata
        self.limits = Limits(**_fields(Limits, info.limits))
        self.on_idle = raw.get("on_idle") if raw.get("on_idle") in ("kill", "pause") else "kill"
        self.commands = RemoteCommands(self)
        self.files = RemoteFiles(self)

    async def pause(self) -> PauseInfo:
        """Checkpoint it to disk on the server and free its memory (gVisor tier); ``resume()``, or
        ``connect(id)`` later, even after a restart of the server, brings it back."""
        raw = (await self._http("POST", "/pause")).json()
        return PauseInfo(seconds=raw["seconds"], checkpoint_bytes=raw["checkpoint_bytes"])

    async def resume(self) -> PauseInfo:
        raw = (await self._http("POST", "/resume")).json()
        return PauseInfo(seconds=raw["seconds"], checkpoint_bytes=0)

    async def fork(self) -> "RemoteSandbox":
        """A new sandbox on the server with a copy of this live session (gVisor tier): same tenant, limits
        and metadata; it counts toward the tenant's quotas like a create."""
        raw = (await self._http("POST", "/fork", timeout=_FORK_TIMEOUT)).json()
        return RemoteSandbox(self._server, raw)

    async def interrupt(self) -> None:
        """KeyboardInterrupt to the code running now in this sandbox (its run_code call returns with it)."""
        await self._http("POST", "/interrupt")

    def _ended_by_clock(self) -> Optional[tuple[str, str]]:
        if time.time() >= self._expires:
            return f"its lifetime ended ({self.limits.lifetime:.0f} s)", "lifetime"
        # An idle sandbox made with on_idle="pause" sleeps on the server, and the next call wakes it.
        if self.on_idle == "kill" and time.monotonic() >= self._last_call + self.limits.idle_timeout:
            return f"it was idle for {self.limits.idle_timeout:.0f} s", "idle_timeout"
        return None

    @property
    def is_running(self) -> bool:
        """As far as this client knows (no request is made): not killed, not found gone, and within its
        lifetime and idle timeout by this client's clock and calls."""
        return self._ended is None and self._ended_by_clock() is None

    @property
    def is_paused(self) -> bool:
        """Not known without a request: pause() and connect() say what they did."""
        return False

    @property
    def end_reason(self) -> Optional[str]:
        if self._ended is None and self._ended_by_clock() is not None:
            return self._ended_by_clock()[0]  # type: ignore[index]
        return self._ended

    @property
    def end_limit(self) -> Optional[str]:
        if self._ended is None and self._ended_by_clock() is not None:
            return self._ended_by_clock()[1]  # type: ignore[index]
        return self._end_limit

    async def kill(self) -> None:
        """End the sandbox on the server. Safe to call twice."""
        if self._ended is None:
            try:
                await self._server.request("DELETE", self._path(""))
            except SandboxNotFound:
                pass
        self._ended = self._ended or "killed by its owner"

    async def set_timeout(self, seconds: float) -> None:
        await self._http("POST", "/timeout", json={"timeout": seconds})
        self._expires = time.time() + seconds

    async def keep_alive(self) -> None:
        await self._http("POST", "/keepalive")

    async def get_url(self, port: int) -> str:
        """The server's proxy to that port: same API key (Authorization: Bearer), HTTP only."""
        if self._ended is not None:
            raise SandboxNotFound(f"sandbox {self.sandbox_id} is gone: {self._ended}")
        return f"{self._server.url}{self._path(f'/ports/{port}/')}"

    async def update_network(self, allow: Optional[list], deny: Optional[list]) -> Any:
        return (await self._http("PUT", "/network", json={"allow": allow, "deny": deny})).json()["network"]

    async def network_log(self, since: Optional[float] = None) -> "list[dict]":
        params = {} if since is None else {"since": since}
        return list((await self._http("GET", "/network/log", params=params)).json())

    async def metrics(self) -> SandboxMetrics:
        return SandboxMetrics(**_fields(SandboxMetrics, (await self._http("GET", "/metrics")).json()))

    # -- plumbing --------------------------------------------------------------------------------------
    def _path(self, suffix: str) -> str:
        return f"/v1/sandboxes/{quote(self.sandbox_id, safe='')}{suffix}"

    @contextlib.contextmanager
    def _tracking(self):
        """A sandbox the server calls gone (or dead) is not running any more, as far as we know."""
        try:
            yield
        except (SandboxNotFound, SandboxCrashed) as exc:
            self._ended = self._ended or str(exc)
            raise
        finally:
            self._last_call = time.monotonic()

    async def _http(self, method: str, suffix: str, **kwargs: Any) -> httpx.Response:
        with self._tracking():
            return await self._server.request(method, self._path(suffix), **kwargs)

    # -- code --------------------------------------------------------------------------------------
    async def run_code(self, code: str, *, timeout: Optional[float] = None,
                       on_stdout: Optional[OutputHandler] = None, on_stderr: Optional[OutputHandler] = None,
                       on_result: Optional[ResultHandler] = None) -> Execution:
        with self._tracking():
            execution, end = await _execute(self._server, self._path("/code"), {"code": code, "timeout": timeout},
                                            on_stdout, on_stderr, on_result)
        ended = end.get("sandbox_ended")
        if isinstance(ended, dict):  # the call ended the sandbox (a limit), as a local sandbox would say
            self._ended = self._ended or str(ended.get("reason") or "it ended")
            limit = ended.get("limit")
            self._end_limit = limit if isinstance(limit, str) else None
        return execution


RECONNECT_WITHIN = 300.0  # how long a background command's handle waits for its server to come back


class RemoteCommandHandle(AsyncCommandHandle):
    """A background command on the server; its output streams in from the start, so ``stdout`` and
    ``stderr`` grow as it runs and callbacks fire, as with a local handle."""

    def __init__(self, sandbox: RemoteSandbox, raw: Mapping[str, Any], on_stdout: Optional[OutputHandler],
                 on_stderr: Optional[OutputHandler], skip: bool = False,
                 offset: Optional[Mapping[str, int]] = None) -> None:
        self._sandbox = sandbox
        self.command_id: str = raw["command_id"]
        self.pid: Optional[int] = raw.get("pid")
        self._chunks = {"stdout": TextLog(), "stderr": TextLog()}
        self._handlers = {"stdout": on_stdout, "stderr": on_stderr}
        # From byte offsets: read again from the sandbox (the server's stream ?offset=); the first event says
        # where the text really starts (later than asked if the sandbox dropped older bytes).
        self._offset = offset
        self.offsets = dict(offset) if offset is not None else {"stdout": 0, "stderr": 0}
        self._position = dict(self.offsets)  # the byte of each stream the stream being read has reached
        self._found_again = False
        self._replayed = asyncio.Event()
        # A reattached handle has the output so far at once; the stream replays it from the start, so that
        # many characters of each stream are skipped (callbacks get only what is printed from now on).
        self._skip = {"stdout": 0, "stderr": 0}
        if skip:
            for kind in self._chunks:
                self._chunks[kind].append(raw[kind])
                self._skip[kind] = len(raw[kind])
        self._task = asyncio.get_running_loop().create_task(self._follow())

    @property
    def stdout(self) -> str:
        return self._chunks["stdout"].text()

    @property
    def stderr(self) -> str:
        return self._chunks["stderr"].text()

    def _url(self, suffix: str = "") -> str:
        return self._sandbox._path(f"/commands/{quote(self.command_id, safe='')}{suffix}")

    async def _follow(self) -> CommandResult:
        async def output(event: dict) -> None:
            kind, text = event["type"], event["text"]
            self._position[kind] += len(text.encode())
            skipped = min(self._skip[kind], len(text))
            self._skip[kind] -= skipped
            if skipped < len(text):
                self._chunks[kind].append(text[skipped:])
                await _call(self._handlers[kind], text[skipped:])

        async def offsets(event: dict) -> None:
            self._position = {name: int(event.get(name) or 0) for name in ("stdout", "stderr")}
            if not self._found_again:  # where this handle's text starts (not where a reconnection went on)
                self.offsets = dict(self._position)

        async def replayed(event: dict) -> None:
            self._replayed.set()

        params = None if self._offset is None else {"offset": self._offset["stdout"],
                                                    "stderr_offset": self._offset["stderr"]}
        try:
            while True:
                try:
                    end = await self._sandbox._server.events("GET", self._url("/stream"), {
                        "stdout": output, "stderr": output, "offsets": offsets, "replayed": replayed}, params=params)
                    break
                except ServerUnavailable:
                    # The server went away (a restart): the command runs on in its sandbox. Once a server answers
                    # again, follow it from the bytes already read, under whatever id that server gives it.
                    params = await self._find_again()
        finally:
            self._replayed.set()
        return _command_result(end, self.stdout, self.stderr)

    async def _find_again(self, within: float = RECONNECT_WITHIN) -> dict:
        """The stream's parameters to go on reading this command on a server that came back: its id there, and
        the byte offsets of each stream read so far. ServerUnavailable if none answers ``within`` seconds."""
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + within, 0.1
        while True:
            await asyncio.sleep(pause)
            try:
                listed = (await self._sandbox._http("GET", "/commands", params={"pid": self.pid})).json()
                break
            except ServerUnavailable:
                if self.pid is None or loop.time() >= deadline:
                    raise
                pause = min(2.0, pause * 2)
        for item in listed:
            if item.get("pid") == self.pid:
                self.command_id = item["command_id"]
                self._found_again, self._skip = True, {"stdout": 0, "stderr": 0}
                return {"offset": self._position["stdout"], "stderr_offset": self._position["stderr"]}
        raise SandboxNotFound(f"background command {self.pid} is no longer kept by sandbox {self._sandbox.sandbox_id}")

    async def wait(self) -> CommandResult:
        return await asyncio.shield(self._task)

    async def kill(self, signal: int = 9) -> None:
        await self._sandbox._server.request("POST", self._url("/kill"), json={"signal": int(signal)})

    async def send_stdin(self, data: Union[str, bytes], close: bool = False) -> None:
        await self._sandbox._server.request("POST", self._url("/stdin"), json=dict(_stdin_body(data), close=close))


class RemoteCommands(CommandsHandle):
    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sandbox = sandbox

    async def run(self, cmd: str, *, timeout: Optional[float] = None, env: Optional[Mapping[str, str]] = None,
                  cwd: Optional[str] = None, stdin: Union[str, bytes, None] = None,
                  on_stdout: Optional[OutputHandler] = None, on_stderr: Optional[OutputHandler] = None,
                  background: bool = False) -> Union[CommandResult, RemoteCommandHandle]:
        body: dict[str, Any] = {"cmd": cmd, "timeout": timeout, "env": dict(env) if env else None, "cwd": cwd}
        if stdin is not None:
            encoded = _stdin_body(stdin)
            body.update(stdin=encoded["data"], stdin_base64=encoded["base64"])
        sandbox = self._sandbox
        if background:
            raw = (await sandbox._http("POST", "/commands", json=dict(body, background=True))).json()
            return RemoteCommandHandle(sandbox, raw, on_stdout, on_stderr)
        chunks = {"stdout": TextLog(), "stderr": TextLog()}
        handlers = {"stdout": on_stdout, "stderr": on_stderr}

        async def output(event: dict) -> None:
            chunks[event["type"]].append(event["text"])
            await _call(handlers[event["type"]], event["text"])

        with sandbox._tracking():
            end = await sandbox._server.events("POST", sandbox._path("/commands"), {"stdout": output, "stderr": output},
                                               json=dict(body, stream=True))
        return _command_result(end, chunks["stdout"].text(), chunks["stderr"].text())


    async def list(self) -> "list[CommandInfo]":
        raw = (await self._sandbox._http("GET", "/commands")).json()
        return [CommandInfo(pid=item["pid"], cmd=item["cmd"], cwd=item.get("cwd"),
                            started_at=_when(item["started_at"])) for item in raw]

    async def connect(self, pid: int, *, offset: Union[None, int, Mapping[str, int]] = None,
                      on_stdout: Optional[OutputHandler] = None,
                      on_stderr: Optional[OutputHandler] = None) -> RemoteCommandHandle:
        sandbox = self._sandbox
        # ?pid=: the command running or ended lately, also one an earlier server process started
        for item in (await sandbox._http("GET", "/commands", params={"pid": pid})).json():
            if item["pid"] != pid:
                continue
            path = f"/commands/{quote(item['command_id'], safe='')}"
            if offset is None:
                raw = (await sandbox._http("GET", path)).json()
                # The stream replays the output from its start: the callbacks skip what was printed before now.
                return RemoteCommandHandle(sandbox, raw, on_stdout, on_stderr, skip=True)
            start = {name: offset if isinstance(offset, int) else offset.get(name, 0) for name in ("stdout", "stderr")}
            handle = RemoteCommandHandle(sandbox, item, on_stdout, on_stderr, offset=start)
            await handle._replayed.wait()  # its output up to now is in hand when connect returns
            if handle._task.done():
                handle._task.result()  # the server refused (the sandbox no longer keeps it): say why
            return handle
        raise SandboxNotFound(f"no background command with pid {pid} runs or ended lately in sandbox "
                              f"{sandbox.sandbox_id} (commands.list() shows those that run)")


class RemoteFiles(FilesHandle):
    """Files inside the remote sandbox; uploads and downloads stream, whatever their size."""

    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sandbox = sandbox

    async def write(self, path: str, data: Union[str, bytes, Any], *, append: bool = False) -> EntryInfo:
        if isinstance(data, str):
            content: Any = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            content = bytes(data)
        else:
            content = _chunks(data)  # streamed with chunked transfer encoding
        response = await self._sandbox._http("PUT", "/files", params={"path": path, "append": str(append).lower()},
                                                content=content, timeout=_UPLOAD_TIMEOUT)
        return _entry(response.json())

    async def stream(self, path: str) -> AsyncIterator[bytes]:
        sandbox = self._sandbox
        with sandbox._tracking():
            async with sandbox._server.stream("GET", sandbox._path("/files"), params={"path": path}) as response:
                async for chunk in response.aiter_bytes():
                    yield chunk

    async def list(self, path: str = "/home/user", *, depth: int = 1) -> "list[EntryInfo]":
        response = await self._sandbox._http("GET", "/files/list",
                                                params={"path": path, "depth": depth})
        return [_entry(raw) for raw in response.json()]

    async def stat(self, path: str) -> EntryInfo:
        return _entry((await self._sandbox._http("GET", "/files/stat", params={"path": path})).json())

    async def exists(self, path: str) -> bool:
        response = await self._sandbox._http("GET", "/files/exists", params={"path": path})
        return bool(response.json()["exists"])

    async def remove(self, path: str) -> None:
        await self._sandbox._http("DELETE", "/files", params={"path": path})

    async def mkdir(self, path: str) -> bool:
        response = await self._sandbox._http("POST", "/files/mkdir", json={"path": path})
        return bool(response.json()["created"])


def _command_result(end: Mapping[str, Any], stdout: str, stderr: str) -> CommandResult:
    limit = end.get("limit")
    return CommandResult(exit_code=end.get("exit_code"), stdout=stdout, stderr=stderr, error=end.get("error"),
                         usage=_usage(end.get("usage")), truncated=bool(end.get("truncated")),
                         limit=limit if isinstance(limit, str) else None)


class HTTPTransport(Transport):
    """Sandboxes on the Sandlot server at ``api_url`` (or $SANDLOT_API_URL), with ``api_key``."""

    def __init__(self, api_url: Optional[str] = None, api_key: Optional[str] = None) -> None:
        self.server = _Server(api_url, api_key)

    async def create(self, spec: SandboxSpec) -> RemoteSandbox:
        raw = (await self.server.request("POST", "/v1/sandboxes", json=spec.to_json())).json()
        return RemoteSandbox(self.server, raw)

    async def connect(self, sandbox_id: str, *, isolation: Optional[str] = None) -> RemoteSandbox:
        if not isinstance(sandbox_id, str) or not sandbox_id:
            raise InvalidRequest("sandbox_id must be a non-empty string")
        path = f"/v1/sandboxes/{quote(sandbox_id, safe='')}"
        raw = (await self.server.request("GET", path)).json()
        if raw["status"] == "paused":  # connecting to a paused sandbox brings it back
            await self.server.request("POST", path + "/resume")
            raw = (await self.server.request("GET", path)).json()
        if raw["status"] != "running":
            raise SandboxNotFound(f"sandbox {sandbox_id} is {raw['status']}: {raw.get('end_reason')}")
        return RemoteSandbox(self.server, raw)

    async def list(self, metadata: Mapping[str, str], status: str) -> "list[SandboxInfo]":
        params = [("metadata", f"{k}={v}") for k, v in (metadata or {}).items()]
        params += [("status", status), ("limit", "1000")]
        return [_info(raw) for raw in (await self.server.request("GET", "/v1/sandboxes", params=params)).json()]

    async def run_once(self, spec: SandboxSpec, code: str, *, timeout: Optional[float],
                       on_stdout: Optional[OutputHandler], on_stderr: Optional[OutputHandler],
                       on_result: Optional[ResultHandler]) -> Execution:
        """Stateless, on a server: one request, a fresh sandbox that is gone afterwards."""
        body = dict(spec.to_json(), code=code, timeout=timeout)  # here the timeout is the call's
        execution, _ = await _execute(self.server, "/v1/run", body, on_stdout, on_stderr, on_result)
        return execution

    # -- volumes: the caller's tenant's, on the server ---------------------------------------------------
    async def create_volume(self, name: str, size: Any, inodes: Optional[int]) -> VolumeInfo:
        body = {"name": name, "size": size, "inodes": inodes}
        return VolumeInfo(**(await self.server.request("POST", "/v1/volumes", json=body)).json())

    async def list_volumes(self) -> "list[VolumeInfo]":
        return [VolumeInfo(**raw) for raw in (await self.server.request("GET", "/v1/volumes")).json()]

    async def volume_info(self, name: str) -> VolumeInfo:
        return VolumeInfo(**(await self.server.request("GET", f"/v1/volumes/{_volume_path(name)}")).json())

    async def delete_volume(self, name: str) -> None:
        await self.server.request("DELETE", f"/v1/volumes/{_volume_path(name)}")


def _volume_path(name: str) -> str:
    from ._storage.mounts import check_volume_name

    return check_volume_name(name)  # a name is one URL segment of safe characters, checked before it travels
