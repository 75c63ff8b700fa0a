"""Sandlot as an MCP server (the official ``mcp`` SDK, v2): code, sessions, commands and files for agents.

Two faces, one tool set:

- ``sandlot mcp`` serves stdio (``run_stdio``) for desktop agents and IDEs;
- ``build_mcp_app(provider, caller_of=...)`` returns a Starlette app speaking streamable HTTP; the
  Sandlot server mounts it at ``/mcp`` behind its API keys (see ``mcp_hosted.server_mount``).

A *session* is a live sandbox this MCP server keeps for the caller (variables persist across
``run_code`` calls); it ends with ``close_session``, with the sandbox's own idle timeout or lifetime,
or when the MCP server shuts down. Without ``session_id``, ``run_code`` and ``run_command`` use a
fresh sandbox that is gone afterwards. Images the code displays come back as MCP image content;
a failed program comes back as a tool error (``isError``) carrying its traceback.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib.util
import os
import posixpath
import sys
import time
from typing import Annotated, Any, AsyncIterator, Callable, Hashable, Literal, Optional, Protocol, Sequence, Union

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import Field
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from ._calls import MAX_CMD, MAX_CODE
from ._exceptions import InvalidRequest, SandboxNotFound, SandlotError
from ._limits import Limits
from ._spec import SandboxSpec
from ._storage.hostdir import check_allowed
from ._version import __version__

Content = Union[TextContent, ImageContent]
MAX_FILE_BYTES = 8 * 1024 * 1024  # read_file answers travel inside one JSON-RPC message
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif"}


class SessionInfo(TypedDict):
    session_id: str
    home: str


class SessionListing(TypedDict):
    session_id: str
    created_at: float  # epoch seconds
    idle_timeout_seconds: float


class FileInfo(TypedDict):
    name: str
    path: str
    type: str
    size: int
    mtime: float


class SandboxProvider(Protocol):
    """Where the MCP server's sandboxes come from.

    ``create(caller, one_shot=...)`` returns a started sandbox (an ``AsyncSandbox`` or anything with its
    methods) whose ``kill()`` ends it; ``one_shot`` is True for a session-less call, which kills it
    right after. ``mounts=`` is passed only when the agent asked for some (a provider that takes none
    refuses them). ``caller`` is None on stdio and whatever ``caller_of(request)`` returned on HTTP.
    ``aclose()`` runs when the MCP server stops.
    """

    async def create(self, caller: Any, *, one_shot: bool, network: Any = None, **grants: Any) -> Any: ...

    async def aclose(self) -> None: ...


# What the sandboxes hold, as the tool descriptions say it: a provider may have ``describe() -> str``.
_WELL_KNOWN = (("numpy", "numpy"), ("pandas", "pandas"), ("matplotlib", "matplotlib"), ("scipy", "scipy"),
               ("scikit-learn", "sklearn"))


def describe_template(template: str, *, on_this_machine: bool) -> str:
    """One true sentence about what code in a sandbox of ``template`` finds installed.

    The builtin ``python`` template is the interpreter this process runs under (with its packages), so
    on this machine it can be asked; an image's packages, or a server's, are for the agent to look up."""
    if template == "python" and on_this_machine:
        found = [name for name, module in _WELL_KNOWN if importlib.util.find_spec(module) is not None]
        version = f"Python {sys.version_info.major}.{sys.version_info.minor}"
        if found:
            return f"{version} with {', '.join(found)} installed (`pip list` in run_command shows the rest)."
        return (f"{version} with the standard library only: numpy, pandas, matplotlib and the like are not "
                "installed.")
    return (f"Template {template!r}: run `pip list` with run_command to see which packages it has; do not "
            "assume numpy or pandas.")


# The tools' shared parameter types: the JSON schema an agent reads (descriptions, bounds) comes from these.
_TIMEOUT_BOUNDS = Limits._BOUNDS["timeout"]  # the same ranges the SDK enforces
_LIFETIME_BOUNDS = Limits._BOUNDS["lifetime"]
SessionId = Annotated[str, Field(description="A session_id returned by create_session.", min_length=1,
                                 max_length=128)]
OptionalSessionId = Annotated[Optional[str], Field(
    description="A session_id from create_session to run in that session (its variables and files); "
                "omit it for a fresh sandbox discarded after this call.", max_length=128)]
Timeout = Annotated[Optional[float], Field(
    description="Wall-clock seconds this call may take before it is stopped (default 60).",
    ge=_TIMEOUT_BOUNDS[0], le=_TIMEOUT_BOUNDS[1])]

CallerOf = Callable[[Any], Any]  # the HTTP request (Starlette) -> who is calling; None on stdio


def caller_key(caller: Any) -> Hashable:
    """Sessions are visible only to callers with the same key: ``caller.key`` if it has one, else itself."""
    return getattr(caller, "key", caller)


class LocalSandboxes:
    """The default provider: sandboxes on this machine (or on a Sandlot server, given ``api_url``).

    An MCP server lives long and creates many sandboxes, so it keeps the engine's fast path
    (zygote and warm pool); ``aclose`` ends the pool's spare sandboxes and waits for cleanups.
    """

    def __init__(self, template: str = "python", *, api_url: Optional[str] = None,
                 api_key: Optional[str] = None, allow_network: bool = False,
                 host_dir_roots: Sequence[str] = ()) -> None:
        self.spec = SandboxSpec.build(template)  # validated once, when the MCP server starts
        self.template = template
        self.api_url = api_url or ""  # "": local, whatever SANDLOT_API_URL says
        self.api_key = api_key
        self.allow_network = allow_network  # whoever started this MCP server decides, not the agent
        # Host directories the agent may have mounted: only inside these (none: no host directory at all). With
        # a server they are the server's paths, taken as written (the server resolves them, and has its own roots).
        self.host_dir_roots = tuple(os.path.normpath(root) if self.api_url else os.path.realpath(root)
                                    for root in host_dir_roots)

    def describe(self) -> str:
        return describe_template(self.template, on_this_machine=not self.api_url)

    async def create(self, caller: Any, *, one_shot: bool, network: Any = None, mounts: Any = None) -> Any:
        from ._sandbox import AsyncSandbox

        if network is not None and not self.allow_network:
            raise InvalidRequest("this MCP server gives sandboxes no network: start it with "
                                 "`sandlot mcp --allow-network`")
        # Tagged as the server's own /mcp tags them, so `sandlot ls --metadata via=mcp` finds an agent's sandboxes.
        spec = SandboxSpec.from_json(dict(self.spec.to_json(), network=network, mounts=mounts,
                                          metadata=dict(self.spec.metadata, via="mcp")))
        self._check_host_dirs(spec.mounts)
        if self.api_url or not spec.mounts:
            return await AsyncSandbox.create(**spec.to_json(), api_url=self.api_url, api_key=self.api_key)
        # Local with mounts: the engine itself holds host directories to the roots, when it opens them (a
        # path swapped after the check above is refused there, never followed).
        from ._engine import LocalTransport, default_engine

        transport = LocalTransport(default_engine())
        transport.check(spec)
        handle = await transport.engine.create(spec, host_dir_roots=self.host_dir_roots)
        return AsyncSandbox._of(handle, spec, transport)

    def _check_host_dirs(self, mounts: tuple) -> None:
        """Each host directory the agent asked for, within this MCP server's roots (a clear tool error if not)."""
        for mount in mounts:
            if mount.kind != "dir":
                continue  # volumes: the local ones here, the tenant's own on a server
            if not self.host_dir_roots:
                raise InvalidRequest("this MCP server grants no host directories: start it with `sandlot mcp "
                                     "--host-dir-root DIR` to allow those inside DIR; volumes ('vol:NAME') are "
                                     "available")
            if self.api_url:  # the server's paths: it resolves them, and holds them to its own roots too
                if not any(mount.source == root or mount.source.startswith(root.rstrip("/") + "/")
                           for root in self.host_dir_roots):
                    raise InvalidRequest(f"host directory {mount.source!r} is outside the directories this MCP "
                                         f"server allows: {', '.join(self.host_dir_roots)}")
            else:
                check_allowed(mount.source, self.host_dir_roots)

    async def aclose(self) -> None:
        if self.api_url:
            return
        from ._engine import default_engine

        await default_engine().shutdown()


@dataclasses.dataclass
class _Session:
    sandbox: Any
    owner: Hashable
    created: float


class Sessions:
    """Live sandboxes by session id (the sandbox id), each visible only to the caller that made it."""

    def __init__(self, provider: SandboxProvider, max_per_caller: int = 32) -> None:
        self.provider = provider
        self.max_per_caller = max_per_caller
        self._sessions: dict[str, _Session] = {}

    async def create(self, caller: Any, network: Any = None, mounts: Any = None) -> Any:
        owner = caller_key(caller)
        if sum(1 for s in self._sessions.values() if s.owner == owner) >= self.max_per_caller:
            raise ToolError(f"too many open sessions (at most {self.max_per_caller}); close one with close_session")
        grants = {"mounts": mounts} if mounts else {}  # a provider that predates mounts still serves the rest
        sandbox = await self.provider.create(caller, one_shot=False, network=network, **grants)
        self._sessions[sandbox.sandbox_id] = _Session(sandbox, owner, time.time())
        return sandbox

    def get(self, caller: Any, session_id: str) -> Any:
        session = self._sessions.get(session_id)
        # Another caller's session is reported exactly like a missing one: no way to probe ids.
        if session is None or session.owner != caller_key(caller):
            raise ToolError(f"no session {session_id!r}: create one with create_session")
        if not session.sandbox.is_running:
            self._sessions.pop(session_id, None)
            reason = getattr(session.sandbox, "end_reason", None) or "idle timeout, lifetime or a limit"
            raise ToolError(f"session {session_id!r} has ended ({reason}); create a new one with create_session")
        return session.sandbox

    def listing(self, caller: Any) -> list[SessionListing]:
        """The caller's sessions that still run, oldest first (ended ones are forgotten on the way)."""
        owner = caller_key(caller)
        found: list[SessionListing] = []
        for session_id, session in list(self._sessions.items()):
            if session.owner != owner:
                continue
            if not session.sandbox.is_running:
                self._sessions.pop(session_id, None)
                continue
            limits = getattr(session.sandbox, "limits", None)
            found.append({"session_id": session_id, "created_at": session.created,
                          "idle_timeout_seconds": getattr(limits, "idle_timeout", Limits().idle_timeout)})
        return sorted(found, key=lambda s: s["created_at"])

    async def fork(self, caller: Any, session_id: str) -> Any:
        """A new session of the same caller: a copy of ``session_id``'s live sandbox (counted in its limit)."""
        sandbox = self.get(caller, session_id)
        owner = caller_key(caller)
        if sum(1 for s in self._sessions.values() if s.owner == owner) >= self.max_per_caller:
            raise ToolError(f"too many open sessions (at most {self.max_per_caller}); close one with close_session")
        child = await sandbox.fork()
        self._sessions[child.sandbox_id] = _Session(child, owner, time.time())
        return child

    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def close(self, caller: Any, session_id: str) -> None:
        sandbox = self.get(caller, session_id)
        self._sessions.pop(session_id, None)
        await sandbox.kill()

    async def close_all(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            with contextlib.suppress(Exception):
                await session.sandbox.kill()


def _caller(ctx: Context, caller_of: Optional[CallerOf]) -> Any:
    if caller_of is None:
        return None
    try:
        request = ctx.request_context.request
    except ValueError:
        request = None
    return caller_of(request)


def scope_tenant(request: Any) -> Any:
    """Default ``caller_of`` on HTTP: ``scope["sandlot.tenant"]``, where the server's auth puts the tenant."""
    scope = getattr(request, "scope", None)
    return scope.get("sandlot.tenant") if isinstance(scope, dict) else None


def execution_content(execution: Any) -> CallToolResult:
    """An Execution as MCP content: output, results (images as image content), then the error."""
    blocks: list[Content] = []
    stdout, stderr = "".join(execution.logs.stdout), "".join(execution.logs.stderr)
    if stdout:
        blocks.append(TextContent(type="text", text=stdout))
    if stderr:
        blocks.append(TextContent(type="text", text="[stderr]\n" + stderr))
    for result in execution.results:
        if result.png is not None:
            blocks.append(ImageContent(type="image", data=result.png, mime_type="image/png"))
        elif result.jpeg is not None:
            blocks.append(ImageContent(type="image", data=result.jpeg, mime_type="image/jpeg"))
        elif result.text is not None:
            label = f"Out[{execution.execution_count}]: " if result.is_main_result and execution.execution_count else ""
            blocks.append(TextContent(type="text", text=label + result.text))
        elif result.svg is not None:
            blocks.append(TextContent(type="text", text=result.svg))
    error = execution.error
    if error is not None:
        trace = error.traceback.rstrip() if error.traceback.strip() else f"{error.name}: {error.value}"
        if error.limit and error.value not in trace:
            trace += f"\n{error.name}: {error.value}"
        blocks.append(TextContent(type="text", text=trace))
    if execution.truncated:
        blocks.append(TextContent(type="text", text="[output truncated: the per-call output limit was reached]"))
    if not blocks:
        blocks.append(TextContent(type="text", text="(no output)"))
    return CallToolResult(content=blocks, is_error=error is not None)


def command_content(result: Any) -> CallToolResult:
    parts = [f"exit code: {result.exit_code}"]
    if result.stdout:
        parts.append("[stdout]\n" + result.stdout)
    if result.stderr:
        parts.append("[stderr]\n" + result.stderr)
    if result.error:
        parts.append(f"[error] {result.error}")
    return CallToolResult(content=[TextContent(type="text", text="\n".join(parts))],
                          is_error=bool(result.error) or result.exit_code != 0)


def _entry_dict(entry: Any) -> FileInfo:
    return {"name": entry.name, "path": entry.path, "type": entry.type, "size": entry.size,
            "mtime": entry.mtime}


def build_mcp_server(provider: Optional[SandboxProvider] = None, *, caller_of: Optional[CallerOf] = None,
                     max_sessions: int = 32) -> MCPServer:
    """The MCP server with Sandlot's tools. ``provider`` defaults to local sandboxes; ``caller_of`` (HTTP
    only) tells callers apart so each sees only its own sessions; ``max_sessions`` is per caller."""
    provider = provider or LocalSandboxes()
    sessions = Sessions(provider, max_per_caller=max_sessions)

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[dict]:
        try:
            yield {}
        finally:
            # Sessions are this server's to end: no sandbox outlives the MCP server that made it.
            await sessions.close_all()
            await provider.aclose()

    server: MCPServer = MCPServer(
        "sandlot",
        version=__version__,
        instructions=("Run Python and shell commands in isolated Sandlot sandboxes. Use create_session to keep "
                      "variables and files across calls, and close_session when done. Charts shown with "
                      "matplotlib come back as images."),
        lifespan=lifespan,
        log_level="WARNING",  # stdio's stderr is the agent's log; keep it for problems
    )

    @contextlib.asynccontextmanager
    async def sandbox_for(ctx: Context, session_id: Optional[str]) -> AsyncIterator[Any]:
        """The session's sandbox, or a fresh one for this call only; Sandlot errors become tool errors."""
        caller = _caller(ctx, caller_of)
        try:
            if session_id:
                sandbox = sessions.get(caller, session_id)
                try:
                    yield sandbox
                except SandboxNotFound:
                    sessions.forget(session_id)
                    raise
            else:
                sandbox = await provider.create(caller, one_shot=True)
                try:
                    yield sandbox
                finally:
                    await sandbox.kill()
        except ToolError:
            raise
        except SandlotError as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc

    installed = describe() if callable(describe := getattr(provider, "describe", None)) else ""
    # Hints for the client (MCP tool annotations): what a tool may change. Every tool acts in a sandbox, not
    # in the world; none reaches outside it unless the session was given a network.
    reads = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

    @server.tool(description=(
        "Run Python code in a sandbox and return its output, the value of the last expression, and images.\n\n"
        "Without session_id the code runs in a fresh sandbox that is discarded afterwards. With a session_id "
        "from create_session, variables, imports and files persist between calls. " + installed + " There is "
        "no network unless the session was created with one. Figures shown with plt.show() (or displayed) are "
        "returned as PNG images. If the code raises, the result is an error carrying the traceback; "
        "sys.exit(0) is no error."),
        annotations=ToolAnnotations(title="Run Python", read_only_hint=False, destructive_hint=True,
                                    idempotent_hint=False, open_world_hint=False))
    async def run_code(code: Annotated[str, Field(description=f"Python source to run, as a notebook cell (at most "
                                                              f"{MAX_CODE // 1024} KiB of UTF-8).")],
                       ctx: Context, session_id: OptionalSessionId = None, timeout: Timeout = None) -> CallToolResult:
        async with sandbox_for(ctx, session_id) as sandbox:
            return execution_content(await sandbox.run_code(code, timeout=timeout))

    @server.tool(annotations=ToolAnnotations(title="Create a session", read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=False, open_world_hint=False))
    async def create_session(
            ctx: Context,
            ttl_seconds: Annotated[Optional[float], Field(
                description="Seconds the session may live at most, from now (default 24 h, at most 14 days); it "
                            "also ends after 30 minutes without a call.",
                ge=_LIFETIME_BOUNDS[0], le=_LIFETIME_BOUNDS[1])] = None,
            network: Annotated[Optional[Union[Literal["none", "public"], dict[str, list[str]]]], Field(
                description='No network by default. "public": the internet (never private ranges or the host); '
                            'or {"allow": ["pypi.org", "*.pythonhosted.org"], "deny": [...]} (hosts, IPs or '
                            'CIDRs, optional :port). Only where this MCP server allows a network.')] = None,
            mounts: Annotated[Optional[dict[str, str]], Field(
                description='Storage in the sandbox, target path -> source: {"/project": "/host/dir:rw", '
                            '"/data": "/host/data", "/cache": "vol:NAME"}. Host directories (read-only unless '
                            '":rw") only where this MCP server allows them; named volumes (writable unless '
                            '":ro"). Files written there outlive the session.')] = None) -> SessionInfo:
        """Start a stateful sandbox session; pass its session_id to the other tools.

        The session keeps Python variables and files until close_session, 30 minutes without a call,
        or ttl_seconds. Close sessions you no longer need; list_sessions shows the open ones.
        """
        if network == "none":
            network = None
        try:
            sandbox = await sessions.create(_caller(ctx, caller_of), network=network, mounts=mounts)
            if ttl_seconds is not None:
                await sandbox.set_timeout(ttl_seconds)
        except SandlotError as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc
        return {"session_id": sandbox.sandbox_id, "home": "/home/user"}

    @server.tool(annotations=ToolAnnotations(title="List sessions", **reads.model_dump(exclude={"title"})))
    async def list_sessions(ctx: Context) -> list[SessionListing]:
        """List your open sessions (session_id, created_at in epoch seconds, idle timeout), oldest first."""
        return sessions.listing(_caller(ctx, caller_of))

    @server.tool(annotations=ToolAnnotations(title="Fork a session", read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=False, open_world_hint=False))
    async def fork_session(session_id: SessionId, ctx: Context) -> SessionInfo:
        """Copy a live session into a new one: the same Python variables, files and working directory, independent
        from then on (random state reseeded), to try two things from one point. Returns the new session_id;
        close both when done. Only sessions of the gVisor tier can be forked (the error says so otherwise).
        """
        try:
            child = await sessions.fork(_caller(ctx, caller_of), session_id)
        except SandlotError as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc
        return {"session_id": child.sandbox_id, "home": "/home/user"}

    @server.tool(annotations=ToolAnnotations(title="Close a session", read_only_hint=False, destructive_hint=True,
                                             idempotent_hint=False, open_world_hint=False))
    async def close_session(session_id: SessionId, ctx: Context) -> str:
        """End a session: its sandbox, variables and files are gone (volumes and host directories stay)."""
        try:
            await sessions.close(_caller(ctx, caller_of), session_id)
        except SandlotError as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc
        return f"session {session_id} closed"

    @server.tool(annotations=ToolAnnotations(title="Run a shell command", read_only_hint=False,
                                             destructive_hint=True, idempotent_hint=False, open_world_hint=False))
    async def run_command(command: Annotated[str, Field(description="Shell command line, run by /bin/sh -c (at "
                                                                    f"most {MAX_CMD // 1024} KiB).", min_length=1)],
                          ctx: Context, session_id: OptionalSessionId = None, timeout: Timeout = None,
                          cwd: Annotated[Optional[str], Field(
                              description="Working directory (default /home/user).")] = None) -> CallToolResult:
        """Run a shell command (/bin/sh -c) in a sandbox; returns exit code, stdout and stderr.

        With a session_id it runs in that session's sandbox (same files as run_code); without, in
        a fresh sandbox. A non-zero exit code is reported as an error.
        """
        async with sandbox_for(ctx, session_id) as sandbox:
            return command_content(await sandbox.commands.run(command, timeout=timeout, cwd=cwd))

    @server.tool(annotations=ToolAnnotations(title="Write a file", read_only_hint=False, destructive_hint=True,
                                             idempotent_hint=True, open_world_hint=False))
    async def write_file(session_id: SessionId,
                         path: Annotated[str, Field(description="File path; relative paths are under /home/user. "
                                                                "An existing file is replaced.", min_length=1)],
                         content: Annotated[str, Field(description="The file's content: text, or base64 when "
                                                                   "encoding is \"base64\".")],
                         ctx: Context,
                         encoding: Annotated[Literal["utf-8", "base64"], Field(
                             description='"utf-8" for text content, "base64" for binary content.')] = "utf-8",
                         ) -> FileInfo:
        """Write a file in a session's sandbox, creating parent directories."""
        try:
            data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
        except ValueError as exc:
            raise ToolError(f"content is not valid base64: {exc}") from exc
        async with sandbox_for(ctx, session_id) as sandbox:
            parent = posixpath.dirname(path)
            if parent and parent != "/":
                await sandbox.files.mkdir(parent)
            return _entry_dict(await sandbox.files.write(path, data))

    @server.tool(annotations=ToolAnnotations(title="Read a file", **reads.model_dump(exclude={"title"})))
    async def read_file(session_id: SessionId,
                        path: Annotated[str, Field(description="File path; relative paths are under /home/user.",
                                                   min_length=1)],
                        ctx: Context) -> CallToolResult:
        """Read a file from a session's sandbox. Text comes back as text, PNG/JPEG/GIF images as images,
        other binary data as base64. Files over 8 MiB are refused (use run_command to inspect them)."""
        async with sandbox_for(ctx, session_id) as sandbox:
            info = await sandbox.files.stat(path)
            if info.type == "dir":
                raise ToolError(f"{path} is a directory; use list_files")
            if info.size > MAX_FILE_BYTES:
                raise ToolError(f"{path} is {info.size} bytes; read_file returns at most {MAX_FILE_BYTES}")
            data = bytearray()
            async for chunk in await sandbox.files.read(path, format="stream"):
                data += chunk
                if len(data) > MAX_FILE_BYTES:  # a file that grew, or a pseudo-file with no size
                    raise ToolError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        for magic, mime in _IMAGE_MAGIC.items():
            if data.startswith(magic):
                return CallToolResult(content=[ImageContent(type="image", data=base64.b64encode(data).decode(),
                                                            mime_type=mime)])
        try:
            return CallToolResult(content=[TextContent(type="text", text=data.decode("utf-8"))])
        except UnicodeDecodeError:
            text = f"[binary, {len(data)} bytes, base64]\n" + base64.b64encode(data).decode()
            return CallToolResult(content=[TextContent(type="text", text=text)])

    @server.tool(annotations=ToolAnnotations(title="List files", **reads.model_dump(exclude={"title"})))
    async def list_files(session_id: SessionId, ctx: Context,
                         path: Annotated[str, Field(description="Directory to list; relative paths are under "
                                                                "/home/user.")] = "/home/user",
                         depth: Annotated[int, Field(description="1 lists the directory itself; more descends "
                                                                 "that many levels into subdirectories.",
                                                     ge=1, le=10)] = 1) -> list[FileInfo]:
        """List a directory in a session's sandbox: each entry's name, path, type (file, dir, symlink, other),
        size and mtime."""
        async with sandbox_for(ctx, session_id) as sandbox:
            entries = await sandbox.files.list(path, depth=depth)
        return [_entry_dict(e) for e in entries]

    return server


def build_mcp_app(provider: Optional[SandboxProvider] = None, *, caller_of: Optional[CallerOf] = None,
                  path: str = "/", host: str = "127.0.0.1", max_sessions: int = 32, json_response: bool = False) -> Any:
    """A Starlette app serving Sandlot's MCP tools over streamable HTTP at ``path`` (mount it at /mcp).

    ``caller_of(request)`` names the caller once the auth in front of the app has run (default:
    ``scope["sandlot.tenant"]``, the Sandlot server's convention); sessions are kept per caller.
    ``host`` is the public host name, for the MCP SDK's DNS-rebinding check (loopback names turn it on).
    The app's lifespan runs the MCP session manager; Starlette does not run a mounted app's lifespan,
    so a parent app enters ``app.router.lifespan_context(app)`` from its own (``mcp_hosted`` does).
    """
    server = build_mcp_server(provider, caller_of=caller_of or scope_tenant, max_sessions=max_sessions)
    return server.streamable_http_app(streamable_http_path=path, host=host, json_response=json_response)


def run_stdio(provider: Optional[SandboxProvider] = None) -> None:
    """Serve MCP on stdin/stdout until the client closes it (``sandlot mcp``)."""
    build_mcp_server(provider).run("stdio")
