"""The MCP endpoint of the Sandlot server: ``/mcp`` over streamable HTTP, behind the server's API keys.

``sandlot serve`` passes ``server_mount()`` to ``sandlot.server.serve(mounts=[...])``. MCP sandboxes
are made by the server's own registry, so tenants' quotas, the audit log, ``sandlot ls`` and the reaper
cover them like any other; a tenant's MCP sessions are invisible to every other tenant.

A transport session (the ``mcp-session-id`` of streamable HTTP) belongs to the tenant that opened it:
each request carries its tenant to the MCP SDK as the authenticated principal (``scope["user"]``), and
the SDK's session manager answers a request whose principal is not the session's creator exactly as it
answers an unknown session (404), so another tenant can neither use, follow, nor end it. Each tenant may
hold a bounded number of transport sessions (:class:`McpConnections`), so no tenant can take all of
the SDK's (a server-wide pool) from the others.

The dependency points one way: this client-layer module uses the server package, never the reverse.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Hashable, Optional

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import DEFAULT_SESSION_IDLE_TIMEOUT
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .mcp_server import build_mcp_app, describe_template
from .server import Mount
from .server.metrics import limit_label

_STATE = "sandlot.state"  # where the outer app's server state is kept for the MCP handlers


@dataclasses.dataclass(frozen=True)
class ServerCaller:
    """An authenticated tenant, with the server state (registry, store, metrics) that serves it."""

    tenant: Any  # sandlot.server.Tenant
    state: Any  # sandlot.server.deps.ServerState

    @property
    def key(self) -> Hashable:
        return ("tenant", self.tenant.id)  # every key of one tenant sees the same sessions

    def audit(self, action: str, sandbox_id: Optional[str], detail: Optional[str]) -> None:
        self.state.store.audit(self.tenant.name, action, sandbox_id, detail, self.tenant.key_id)


class _HostedSandbox:
    """A registry's live sandbox, used as the REST routes use it: work is audited and measured, and
    ending or extending it goes through the registry (the tenant's quota is freed, the audit log says who)."""

    def __init__(self, live: Any, caller: ServerCaller) -> None:
        self._live = live
        self._caller = caller
        self.commands = _HostedCommands(self)
        self.files = _HostedFiles(self)

    def __getattr__(self, name: str) -> Any:  # sandbox_id, is_running, end_reason...
        return getattr(self._live.sandbox, name)

    @property
    def _audit_id(self) -> Optional[str]:
        return None if self._live.one_shot else self._live.id

    async def run_code(self, code: str, **kwargs: Any) -> Any:
        self._caller.state.registry.check_call_timeout(kwargs.get("timeout"))
        self._caller.audit("run_once" if self._live.one_shot else "run_code", self._audit_id, code[:1000])
        execution = await self._live.sandbox.run_code(code, **kwargs)
        error = execution.error
        self._caller.state.metrics.execution("code", execution.usage.wall_seconds, error.limit if error else None,
                                             error is not None)
        return execution

    async def kill(self) -> None:
        if self._live.one_shot:
            await self._caller.state.registry.end_one_shot(self._live)
        else:
            await self._caller.state.registry.kill(self._caller.tenant, self._live.id)

    async def set_timeout(self, seconds: float) -> None:
        await self._caller.state.registry.set_timeout(self._caller.tenant, self._live.id, seconds)

    async def fork(self) -> "_HostedSandbox":
        """Through the registry, as POST .../fork: the copy counts toward the tenant's quotas, has its row and
        an audit row "fork" naming this one."""
        return _HostedSandbox(await self._caller.state.registry.fork(self._caller.tenant, self._live.id), self._caller)


class _HostedCommands:
    def __init__(self, hosted: _HostedSandbox) -> None:
        self._hosted = hosted

    async def run(self, cmd: str, **kwargs: Any) -> Any:
        hosted = self._hosted
        hosted._caller.state.registry.check_call_timeout(kwargs.get("timeout"))
        hosted._caller.audit("command", hosted._audit_id, cmd[:1000])
        result = await hosted._live.sandbox.commands.run(cmd, **kwargs)
        limit = limit_label(result)
        hosted._caller.state.metrics.execution("command", result.usage.wall_seconds, limit,
                                               bool(result.exit_code) or bool(limit))
        return result


class _HostedFiles:
    def __init__(self, hosted: _HostedSandbox) -> None:
        self._hosted = hosted

    def __getattr__(self, name: str) -> Any:  # read, list, stat: not audited, as over REST
        return getattr(self._hosted._live.sandbox.files, name)

    async def write(self, path: str, data: Any, **kwargs: Any) -> Any:
        self._hosted._caller.audit("file_write", self._hosted._audit_id, path)
        return await self._hosted._live.sandbox.files.write(path, data, **kwargs)

    async def mkdir(self, path: str) -> bool:
        self._hosted._caller.audit("mkdir", self._hosted._audit_id, path)
        return await self._hosted._live.sandbox.files.mkdir(path)


class RegistrySandboxes:
    """The provider for the hosted endpoint: the server's registry, with the caller's tenant."""

    def describe(self) -> str:
        # The registry's sandboxes are of the builtin template, this server process's own interpreter.
        return describe_template("python", on_this_machine=True)

    async def create(self, caller: Optional[ServerCaller], *, one_shot: bool, network: Any = None,
                     mounts: Any = None) -> Any:
        if caller is None:  # the mount is authenticated; this would be a wiring bug, not a user error
            raise RuntimeError("an MCP request reached the server's registry without a tenant")
        metadata = None if one_shot else {"via": "mcp"}
        # Mounts as over REST: the tenant's volumes, host directories only within the operator's --host-dir-root.
        live = await caller.state.registry.create(caller.tenant, one_shot=one_shot, metadata=metadata,
                                                  network=network, mounts=mounts)
        return _HostedSandbox(live, caller)

    async def aclose(self) -> None:
        """Nothing to do: the registry ends its sandboxes when the server stops."""


def _caller(request: Any) -> Optional[ServerCaller]:
    scope = getattr(request, "scope", None) or {}
    tenant, state = scope.get("sandlot.tenant"), scope.get(_STATE)
    if tenant is None or state is None:
        return None
    return ServerCaller(tenant, state)


def tenant_principal(tenant: Any) -> AuthenticatedUser:
    """The tenant as the MCP SDK's authenticated user: the principal a transport session is bound to.
    Every key of one tenant is the same principal (as for its sandboxes); the key itself is not in it."""
    return AuthenticatedUser(AccessToken(token=f"sandlot-tenant-{tenant.id}", client_id=f"sandlot-tenant-{tenant.id}",
                                         scopes=[], subject=str(tenant.id)))


@dataclasses.dataclass
class _Transport:
    tenant_id: int
    in_flight: int = 0
    last_seen: float = dataclasses.field(default_factory=time.monotonic)


class McpConnections:
    """Counts each tenant's MCP connections (what the MCP protocol calls a transport session, by its
    ``mcp-session-id``), and refuses (429) one more than ``per_tenant``.

    It follows the SDK from the outside, by the ``mcp-session-id`` header: a session is born with the answer
    that carries a new id, ends with a DELETE that succeeds or any 404 for its id (the SDK no longer knows it),
    and is taken for ended after the SDK's idle timeout with no request in flight (the SDK reaps it then).
    """

    def __init__(self, per_tenant: int = 32, idle_timeout: float = DEFAULT_SESSION_IDLE_TIMEOUT) -> None:
        self.per_tenant = per_tenant
        self.idle_timeout = idle_timeout
        self._lives: dict[str, _Transport] = {}
        self._opening: dict[int, int] = {}  # tenant id -> opening requests in flight

    def _alive(self, transport: _Transport, now: float) -> bool:
        return transport.in_flight > 0 or now - transport.last_seen < self.idle_timeout

    def count(self, tenant_id: int) -> int:
        now = time.monotonic()
        for sid in [sid for sid, t in self._lives.items() if not self._alive(t, now)]:
            del self._lives[sid]
        return sum(1 for t in self._lives.values() if t.tenant_id == tenant_id) + self._opening.get(tenant_id, 0)

    async def __call__(self, app: ASGIApp, tenant: Any, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        session_id = headers.get(b"mcp-session-id", b"").decode("latin-1") or None
        if session_id is None:
            await self._open(app, tenant, scope, receive, send)
            return
        transport = self._lives.get(session_id)
        mine = transport is not None and transport.tenant_id == tenant.id
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        if mine:
            transport.in_flight += 1
        try:
            await app(scope, receive, watch)
        finally:
            if mine:
                transport.in_flight -= 1
                transport.last_seen = time.monotonic()
                ended = status[:1] == [404] or (scope.get("method") == "DELETE" and status[:1] == [200])
                if ended:
                    self._lives.pop(session_id, None)

    async def _open(self, app: ASGIApp, tenant: Any, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") == "POST" and self.count(tenant.id) >= self.per_tenant:
            from ._exceptions import QuotaExceeded
            from .server.errors import error_response

            refusal = QuotaExceeded(f"tenant {tenant.name!r} already has {self.per_tenant} MCP sessions open, its "
                                    "limit; close one (DELETE with its mcp-session-id) or let it idle out",
                                    retry_after=5.0)
            await error_response(refusal)(scope, receive, send)
            return

        opening = [True]  # counted in _opening until it is a session (or the request ends without one)

        def opened() -> None:
            if opening[0]:
                opening[0] = False
                self._opening[tenant.id] -= 1
                if not self._opening[tenant.id]:
                    del self._opening[tenant.id]

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                for name, value in message.get("headers") or []:
                    if name.lower() == b"mcp-session-id":
                        self._lives[value.decode("latin-1")] = _Transport(tenant.id)
                        opened()  # the same moment: never counted twice, nor zero times
            await send(message)

        self._opening[tenant.id] = self._opening.get(tenant.id, 0) + 1
        try:
            await app(scope, receive, record)
        finally:
            opened()


class _KeepServerState:
    """Keeps the server's state in the scope (the mounted Starlette app replaces ``scope["app"]`` with
    itself, and the MCP handlers still need the server's registry), and names the tenant as the scope's
    authenticated user, which binds each MCP transport session to the tenant that opened it."""

    def __init__(self, app: ASGIApp, transports: McpConnections) -> None:
        self.app = app
        self.transports = transports

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outer = scope.get("app")
        state = getattr(getattr(outer, "state", None), "sandlot", None)
        if state is not None:
            scope[_STATE] = state
        tenant = scope.get("sandlot.tenant")
        if tenant is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["user"] = tenant_principal(tenant)
        await self.transports(self.app, tenant, scope, receive, send)


def server_mount(path: str = "/mcp", *, host: str = "127.0.0.1", max_sessions: int = 32,
                 transports_per_tenant: int = 32) -> Mount:
    """The authenticated ``/mcp`` mount for ``sandlot.server.serve(mounts=[...])``: ``max_sessions`` sandbox
    sessions and ``transports_per_tenant`` MCP transport sessions per tenant."""
    app = build_mcp_app(RegistrySandboxes(), caller_of=_caller, host=host, max_sessions=max_sessions)
    return Mount(path, _KeepServerState(app, McpConnections(transports_per_tenant)), authenticated=True,
                 lifespan=lambda: app.router.lifespan_context(app))
