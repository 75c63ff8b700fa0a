"""AsyncSandbox: the one SDK class, over a transport. ``Sandbox`` (in _sync) is its synchronous face.

A sandbox is described once (a ``SandboxSpec``, validated here), and each call's arguments are checked
once (_calls.py) before a transport sees them: the local transport (an Engine in this process) or the
HTTP transport (a Sandlot server). Both give back a handle with the same interface (_transport.py);
everything here is written once for both.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Mapping, Optional, Union

from . import _calls
from ._config import api_url as _env_api_url
from ._exceptions import InvalidRequest, SandboxNotFound
from ._limits import Limits
from ._models import CommandResult, EntryInfo, Execution, PauseInfo, SandboxInfo, SandboxMetrics
from ._output import OutputHandler
from ._spec import SandboxSpec
from ._transport import AsyncCommandHandle, CommandInfo, ResultHandler, SandboxHandle, Transport

__all__ = ["AsyncSandbox", "AsyncCommands", "AsyncFiles", "AsyncNetwork", "AsyncCommandHandle", "CommandInfo",
           "transport_for"]


def _check_offset(offset: Any) -> None:
    def bad(value: Any) -> bool:
        return isinstance(value, bool) or not isinstance(value, int) or value < 0

    if offset is None:
        return
    if isinstance(offset, Mapping):
        if set(offset) - {"stdout", "stderr"} or any(bad(v) for v in offset.values()):
            raise InvalidRequest(f"offset must map 'stdout'/'stderr' to byte offsets >= 0, not {offset!r}")
    elif bad(offset):
        raise InvalidRequest(f"offset must be a byte offset >= 0 (or a mapping per stream), not {offset!r}")


def wants_server(api_url: Optional[str]) -> bool:
    """A server is used when ``api_url`` is given, or when it is None and SANDLOT_API_URL is set.
    ``api_url=""`` means local, whatever the environment says."""
    return bool(api_url) if api_url is not None else bool(_env_api_url())


def transport_for(api_url: Optional[str] = None, api_key: Optional[str] = None) -> Transport:
    """The HTTP transport when a server is meant (see ``wants_server``), else this process's engine."""
    if wants_server(api_url):
        from ._http import HTTPTransport  # httpx is imported only by programs that use a server

        return HTTPTransport(api_url, api_key)
    from ._engine import LocalTransport

    return LocalTransport()


class AsyncSandbox:
    """A sandbox: a stateful Python session, shell commands and files, isolated from the host.

    ``async with AsyncSandbox() as sb`` or ``sb = await AsyncSandbox.create()``. ``timeout`` is the
    sandbox's lifetime in seconds (extend it with ``set_timeout``); ``limits`` overrides any of
    :class:`Limits`; ``env`` is visible to code and commands; ``metadata`` is yours to tag it with.

    ``network`` is None (no network, the default), "public", or ``{"allow": [rules], "deny": [rules]}``;
    ``secrets`` maps names to ``{"value": ..., "hosts": [...]}``: the sandbox sees a placeholder, and the
    host puts the value into HTTPS request headers to those hosts only.

    ``mounts`` grants host storage, nothing else of the host being visible: ``{"/data": "/srv/datasets"}``
    (a host directory, read-only), ``{"/work": "/home/me/project:rw"}`` (writable: what the sandbox makes
    there belongs to the directory's owner), ``{"/cache": "vol:pipcache"}`` (a named volume, writable
    unless ``:ro``; see ``sandlot.volumes``).

    With ``api_url=`` (or SANDLOT_API_URL) and ``api_key=`` (or SANDLOT_API_KEY) the sandbox lives on a
    Sandlot server instead, with this very API. A local sandbox ends with this process; a remote one
    lives on until it is killed or times out.
    """

    def __init__(self, template: str = "python", *, timeout: Optional[float] = None,
                 limits: Union[Limits, Mapping[str, Any], None] = None, env: Optional[Mapping[str, str]] = None,
                 metadata: Optional[Mapping[str, str]] = None, isolation: Optional[str] = None,
                 api_url: Optional[str] = None, api_key: Optional[str] = None, on_idle: str = "kill",
                 network: Any = None, secrets: Optional[Mapping[str, Any]] = None,
                 mounts: Optional[Mapping[str, str]] = None) -> None:
        # Validated once, before anything is claimed, forked or sent.
        self._spec = SandboxSpec.build(template, isolation=isolation, limits=limits, env=env, metadata=metadata,
                                      timeout=timeout, on_idle=on_idle, network=network, secrets=secrets,
                                      mounts=mounts)
        self._transport = transport_for(api_url, api_key)
        self._transport.check(self._spec)
        self._handle: Optional[SandboxHandle] = None
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.network = AsyncNetwork(self)

    @classmethod
    def _of(cls, handle: SandboxHandle, spec: SandboxSpec, transport: Transport) -> "AsyncSandbox":
        sandbox = cls.__new__(cls)
        sandbox._spec, sandbox._transport, sandbox._handle = spec, transport, handle
        sandbox.commands, sandbox.files = AsyncCommands(sandbox), AsyncFiles(sandbox)
        sandbox.network = AsyncNetwork(sandbox)
        return sandbox

    # -- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    async def create(cls, template: str = "python", **kwargs: Any) -> "AsyncSandbox":
        sandbox = cls(template, **kwargs)
        await sandbox.start()
        return sandbox

    async def start(self) -> "AsyncSandbox":
        if self._handle is None:
            self._handle = await self._transport.create(self._spec)
        return self

    async def __aenter__(self) -> "AsyncSandbox":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.kill()

    @classmethod
    async def connect(cls, sandbox_id: str, *, api_url: Optional[str] = None, api_key: Optional[str] = None,
                      isolation: Optional[str] = None) -> "AsyncSandbox":
        """Reattach to a live sandbox on a server, or (``isolation="gvisor"``, no server) resume a
        sandbox that an earlier process of this host paused (a tier that cannot take one back says so)."""
        if isolation is None or wants_server(api_url):
            from ._http import HTTPTransport

            transport: Transport = HTTPTransport(api_url, api_key)
        else:
            transport = transport_for("")
        handle = await transport.connect(sandbox_id, isolation=isolation)
        spec = SandboxSpec.build(handle.template, isolation=handle.isolation, limits=handle.limits,
                                 metadata=handle.metadata, on_idle=getattr(handle, "on_idle", "kill"))
        return cls._of(handle, spec, transport)

    @classmethod
    async def list(cls, metadata: Optional[Mapping[str, str]] = None, *, status: str = "running",
                   api_url: Optional[str] = None, api_key: Optional[str] = None) -> "list[SandboxInfo]":
        """Your sandboxes on a server, newest first, having every ``metadata`` pair given.
        ``status``: "running" (default), "ended", "lost" or "all"."""
        from ._http import HTTPTransport  # local sandboxes belong to their process: there is nothing to list

        return await HTTPTransport(api_url, api_key).list(dict(metadata or {}), status)

    def _live(self) -> SandboxHandle:
        if self._handle is None:
            raise SandboxNotFound("the sandbox has not been started (use `with Sandbox()` or `.create()`)")
        return self._handle

    async def kill(self) -> None:
        """End the sandbox and everything in it. Safe to call twice."""
        if self._handle is not None:
            await self._handle.kill()

    async def pause(self) -> PauseInfo:
        """Checkpoint the live session to disk and free its memory (gVisor tier). The next call of any kind
        (or ``resume()``) restores it with its variables, open files and working directory; so does
        ``connect(id)`` from a later process. It still ends at its lifetime, checkpoint and all."""
        return await self._live().pause()

    async def resume(self) -> PauseInfo:
        """Bring a paused sandbox back now (a no-op for a running one); any other call does it too."""
        return await self._live().resume()

    async def fork(self) -> "AsyncSandbox":
        """A new sandbox with a copy of this live session (variables, files in /home/user and /tmp, working
        directory), independent from then on, its random state reseeded (``random``, numpy's global
        generator). gVisor tier; the process tier raises InvalidRequest. Kill it as any sandbox."""
        handle = await self._live().fork()
        return type(self)._of(handle, self._spec, self._transport)  # the parent's limits, env and metadata

    async def interrupt(self) -> None:
        """Send KeyboardInterrupt to the code running now (like Ctrl-C in a notebook). Its run_code
        call then returns with that error; the session keeps its variables."""
        await self._live().interrupt()

    async def metrics(self) -> SandboxMetrics:
        """Memory, CPU and process count of the sandbox right now, from its cgroup."""
        return await self._live().metrics()

    async def set_timeout(self, seconds: float) -> None:
        """Let the sandbox live ``seconds`` from now (capped by 14 days), like E2B's set_timeout."""
        Limits.build({"lifetime": seconds})
        await self._live().set_timeout(seconds)

    async def keep_alive(self) -> None:
        """Count as activity now: the idle timeout starts over."""
        await self._live().keep_alive()

    # -- what it is ----------------------------------------------------------------------------------
    @property
    def sandbox_id(self) -> str:
        return self._live().sandbox_id

    @property
    def template(self) -> str:
        return self._handle.template if self._handle is not None else self._spec.template

    @property
    def isolation(self) -> str:
        """The tier it runs on: "process" or "gvisor"."""
        if self._handle is not None:
            return self._handle.isolation
        from ._backends.registry import default_isolation

        return default_isolation(self._spec.isolation)

    @property
    def limits(self) -> Limits:
        """Its limits: as asked before it starts, as applied (a server's ceilings included) once it runs."""
        return self._handle.limits if self._handle is not None else self._spec.limits

    @property
    def metadata(self) -> dict:
        return dict(self._handle.metadata) if self._handle is not None else dict(self._spec.metadata)

    @property
    def env(self) -> dict:
        """The environment variables this sandbox was created with (beyond the template's)."""
        return dict(self._spec.env)

    @property
    def on_idle(self) -> str:
        """What happens after the idle timeout: "kill", or "pause" (checkpoint to disk, memory freed, woken by
        the next call; gVisor tier)."""
        return self._spec.on_idle

    @property
    def is_running(self) -> bool:
        return self._handle is not None and self._handle.is_running

    @property
    def is_paused(self) -> bool:
        """Checkpointed to disk (gVisor tier) by ``pause()`` or its idle timeout; the next call wakes it."""
        return self._handle is not None and self._handle.is_paused

    @property
    def end_reason(self) -> Optional[str]:
        """Why the sandbox ended (None while it runs)."""
        return self._handle.end_reason if self._handle is not None else None

    @property
    def end_limit(self) -> Optional[str]:
        """The limit that ended the sandbox, if one did ("lifetime", "idle_timeout", "memory", "timeout"...)."""
        return self._handle.end_limit if self._handle is not None else None

    @property
    def dies_with_owner(self) -> bool:
        """True for a local sandbox (it ends with this process); a server's lives on."""
        return self._handle.dies_with_owner if self._handle is not None else True

    async def get_url(self, port: int) -> str:
        """A URL that reaches ``port`` inside the sandbox (a server the code started, on 127.0.0.1 or
        0.0.0.0 there): locally http://127.0.0.1:P/ on this host (any TCP protocol), through a server a path
        under it (``/v1/sandboxes/{id}/ports/{port}/``, same API key, HTTP)."""
        from ._net.ports import check_port

        return await self._live().get_url(check_port(port))

    # -- code --------------------------------------------------------------------------------------
    async def run_code(self, code: str, *, timeout: Optional[float] = None,
                       on_stdout: Optional[OutputHandler] = None, on_stderr: Optional[OutputHandler] = None,
                       on_result: Optional[ResultHandler] = None) -> Execution:
        """Run Python in the sandbox's session. Variables persist between calls.

        The user's exceptions and limits that stop the code come back in ``Execution.error``;
        only failures of the sandbox itself raise.
        """
        _calls.check_code(code)
        _calls.check_timeout(timeout)
        return await self._live().run_code(code, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr,
                                           on_result=on_result)


class AsyncCommands:
    """Shell commands in the sandbox (same filesystem as the session), via /bin/sh -c."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def run(self, cmd: str, *, timeout: Optional[float] = None, env: Optional[Mapping[str, str]] = None,
                  cwd: Optional[str] = None, stdin: Union[str, bytes, None] = None,
                  on_stdout: Optional[OutputHandler] = None, on_stderr: Optional[OutputHandler] = None,
                  background: bool = False) -> Union[CommandResult, AsyncCommandHandle]:
        """Run ``cmd``; return its result, or with ``background=True`` a handle to wait on or kill."""
        _calls.check_cmd(cmd)
        env = _calls.check_command_env(env)
        _calls.check_timeout(timeout)
        return await self._sandbox._live().commands.run(cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin,
                                                        on_stdout=on_stdout, on_stderr=on_stderr,
                                                        background=background)

    async def list(self) -> "list[CommandInfo]":
        """The background commands still running in the sandbox (pid, cmd, cwd, started_at), oldest first,
        whichever client started them."""
        return await self._sandbox._live().commands.list()

    async def connect(self, pid: int, *, offset: Union[None, int, Mapping[str, int]] = None,
                      on_stdout: Optional[OutputHandler] = None,
                      on_stderr: Optional[OutputHandler] = None) -> AsyncCommandHandle:
        """Reattach to background command ``pid`` (from ``list()`` or a handle's ``pid``), also from another
        client or process, and after the server restarted: ``wait()``, ``kill()``, ``send_stdin()``,
        ``close_stdin()`` work as on the handle that started it. A command that ended lately can be connected
        too (its exit code and output's tail: the sandbox remembers its last 16 commands).

        ``offset=None``: its output so far is in ``stdout``/``stderr``, the callbacks get what it prints from
        now on. ``offset=N``: its output from byte N of stdout and of stderr (or ``{"stdout": N, "stderr": M}``),
        the callbacks get all of it; ``offset=0`` replays everything kept. The sandbox keeps the newest
        ``output``-limit bytes of each command: ``handle.offsets`` says at which byte its text starts when
        older bytes were dropped. SandboxNotFound if no such command runs or ended lately."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise InvalidRequest(f"pid must be a positive integer, not {pid!r}")
        _check_offset(offset)
        return await self._sandbox._live().commands.connect(pid, offset=offset, on_stdout=on_stdout,
                                                            on_stderr=on_stderr)


class AsyncFiles:
    """Files inside the sandbox. Paths are resolved inside the sandbox's own root: a symlink or hardlink
    planted by sandbox code can never make the host read or write its files."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def write(self, path: str, data: Union[str, bytes, Any], *, append: bool = False) -> EntryInfo:
        """Write text, bytes, a binary file object, or an (async) iterable of bytes, in chunks."""
        _calls.check_path(path)
        _calls.check_upload(data)
        return await self._sandbox._live().files.write(path, data, append=append)

    async def read(self, path: str, *, format: str = "text") -> Union[str, bytes, AsyncIterator[bytes]]:
        """``format``: "text" (UTF-8), "bytes", or "stream" (an async iterator of byte chunks)."""
        _calls.check_format(format)
        _calls.check_path(path)
        return await _calls.read_as(self._sandbox._live().files.stream(path), format, path)

    async def list(self, path: str = "/home/user", *, depth: int = 1) -> "list[EntryInfo]":
        return await self._sandbox._live().files.list(_calls.check_path(path), depth=_calls.check_depth(depth))

    async def stat(self, path: str) -> EntryInfo:
        return await self._sandbox._live().files.stat(_calls.check_path(path))

    async def exists(self, path: str) -> bool:
        return await self._sandbox._live().files.exists(_calls.check_path(path))

    async def remove(self, path: str) -> None:
        await self._sandbox._live().files.remove(_calls.check_path(path))

    async def mkdir(self, path: str) -> bool:
        """Create a directory and its parents; False if it already existed."""
        return await self._sandbox._live().files.mkdir(_calls.check_path(path))


class AsyncNetwork:
    """The sandbox's network policy, live: ``update()`` its rules, read the ``log()`` of decisions."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def update(self, allow: Optional[list] = None, deny: Optional[list] = None) -> Any:
        """Replace the allow rules, the deny rules, or both (a list given replaces that list; None keeps
        it). Connections the new rules refuse are cut at once. Returns the policy now in force."""
        if allow is None and deny is None:
            from ._exceptions import InvalidRequest

            raise InvalidRequest("network.update() needs allow=, deny= or both")
        from ._net.policy import NetworkPolicy

        NetworkPolicy.build({"allow": list(allow or []), "deny": list(deny or [])})  # the rules, checked here
        return await self._sandbox._live().update_network(None if allow is None else list(allow),
                                                          None if deny is None else list(deny))

    async def log(self, since: Optional[float] = None) -> "list[dict]":
        """Every decision, oldest first: time, kind (dns/tcp), name, address, port, verdict
        (allow/deny/revoked), rule and reason."""
        return await self._sandbox._live().network_log(since)
