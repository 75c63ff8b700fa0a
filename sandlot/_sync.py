"""The synchronous face of the async SDK: one event loop in a daemon thread runs every coroutine.

No second implementation: each sync method forwards to its async twin (Modal's ``synchronize_api``
idea, in a few lines). Callbacks run on the loop thread. tests/test_faces.py checks that every public
method and property of the async classes has its sync twin, with the same parameters.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from typing import Any, Iterator, Mapping, Optional, Union

from ._limits import Limits
from ._models import CommandResult, EntryInfo, Execution, PauseInfo, SandboxInfo, SandboxMetrics
from ._output import OutputHandler
from ._sandbox import AsyncCommandHandle, AsyncSandbox
from ._transport import CommandInfo, ResultHandler


def _shutdown() -> None:
    """At exit: the engine's shutdown on the loop thread (pooled sandboxes killed, cleanups of killed
    ones finished: no cgroup left behind), then its zygotes stopped."""
    from . import _engine

    engine = _engine._DEFAULT
    loop = _LoopThread._loop
    if engine is None:
        return
    if loop is not None and not loop.is_closed() and loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(engine.shutdown(), loop).result(timeout=30)
        except Exception:
            pass
    engine.close()


atexit.register(_shutdown)


class _LoopThread:
    _lock = threading.Lock()
    _loop: Optional[asyncio.AbstractEventLoop] = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="sandlot-loop", daemon=True).start()
                cls._loop = loop
            return cls._loop


def run_sync(coro) -> Any:
    loop = _LoopThread.loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError("sync Sandlot API called from its own event loop thread; use AsyncSandbox")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


class CommandHandle:
    def __init__(self, handle: AsyncCommandHandle) -> None:
        self._handle = handle

    @property
    def pid(self) -> Optional[int]:
        return self._handle.pid

    @property
    def stdout(self) -> str:
        return self._handle.stdout

    @property
    def stderr(self) -> str:
        return self._handle.stderr

    @property
    def offsets(self) -> "dict[str, int]":
        """The byte of each stream (stdout, stderr) this handle's text starts at: 0 unless it was connected
        from an offset, or the sandbox had dropped older bytes."""
        return dict(self._handle.offsets)

    def wait(self) -> CommandResult:
        return run_sync(self._handle.wait())

    def kill(self, signal: int = 9) -> None:
        run_sync(self._handle.kill(signal))

    def send_stdin(self, data: Union[str, bytes], close: bool = False) -> None:
        run_sync(self._handle.send_stdin(data, close))

    def close_stdin(self) -> None:
        """End the command's input (EOF): a program reading stdin to its end, like ``cat`` or ``wc``, finishes."""
        run_sync(self._handle.close_stdin())


class Commands:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._async = sandbox.commands

    def run(self, cmd: str, **kwargs: Any) -> Union[CommandResult, CommandHandle]:
        out = run_sync(self._async.run(cmd, **kwargs))
        return CommandHandle(out) if isinstance(out, AsyncCommandHandle) else out

    def list(self) -> "list[CommandInfo]":
        """The background commands still running in the sandbox (pid, cmd, cwd, started_at), oldest first."""
        return run_sync(self._async.list())

    def connect(self, pid: int, *, offset: Union[None, int, Mapping[str, int]] = None,
                on_stdout: Optional[OutputHandler] = None, on_stderr: Optional[OutputHandler] = None) -> CommandHandle:
        """Reattach to background command ``pid``, running or ended lately. ``offset=None``: output so far in
        ``stdout``/``stderr``, the callbacks get what it prints from now on; ``offset=N``: its output from byte N
        of each stream (``0``: all the sandbox kept), callbacks included. SandboxNotFound if no such command."""
        return CommandHandle(run_sync(self._async.connect(pid, offset=offset, on_stdout=on_stdout,
                                                          on_stderr=on_stderr)))


class Files:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._async = sandbox.files

    def write(self, path: str, data: Any, *, append: bool = False) -> EntryInfo:
        return run_sync(self._async.write(path, data, append=append))

    def read(self, path: str, *, format: str = "text") -> Union[str, bytes, Iterator[bytes]]:
        if format != "stream":
            return run_sync(self._async.read(path, format=format))
        stream = run_sync(self._async.read(path, format="stream"))
        return _iterate(stream)

    def list(self, path: str = "/home/user", *, depth: int = 1) -> list[EntryInfo]:
        return run_sync(self._async.list(path, depth=depth))

    def stat(self, path: str) -> EntryInfo:
        return run_sync(self._async.stat(path))

    def exists(self, path: str) -> bool:
        return run_sync(self._async.exists(path))

    def remove(self, path: str) -> None:
        run_sync(self._async.remove(path))

    def mkdir(self, path: str) -> bool:
        return run_sync(self._async.mkdir(path))


class Network:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._async = sandbox.network

    def update(self, allow: Optional[list] = None, deny: Optional[list] = None) -> Any:
        return run_sync(self._async.update(allow, deny))

    def log(self, since: Optional[float] = None) -> "list[dict]":
        return run_sync(self._async.log(since))


def _iterate(stream) -> Iterator[bytes]:
    while True:
        try:
            yield run_sync(stream.__anext__())
        except StopAsyncIteration:
            return


class Sandbox:
    """The synchronous SDK. Same arguments and methods as :class:`AsyncSandbox`.

    ``with Sandbox() as sb:`` starts the sandbox and kills it on exit. With ``api_url=`` (or
    SANDLOT_API_URL) the sandbox lives on a Sandlot server; ``Sandbox.connect(id)`` reattaches to it.
    """

    def __init__(self, template: str = "python", *, timeout: Optional[float] = None,
                 limits: Union[Limits, Mapping[str, Any], None] = None, env: Optional[Mapping[str, str]] = None,
                 metadata: Optional[Mapping[str, str]] = None, isolation: Optional[str] = None,
                 api_url: Optional[str] = None, api_key: Optional[str] = None, on_idle: str = "kill",
                 network: Any = None, secrets: Optional[Mapping[str, Any]] = None,
                 mounts: Optional[Mapping[str, str]] = None) -> None:
        self._attach(AsyncSandbox(template, timeout=timeout, limits=limits, env=env, metadata=metadata,
                                  isolation=isolation, api_url=api_url, api_key=api_key, on_idle=on_idle,
                                  network=network, secrets=secrets, mounts=mounts))
        run_sync(self._async.start())

    def _attach(self, sandbox: AsyncSandbox) -> None:
        self._async = sandbox
        self.commands = Commands(sandbox)
        self.files = Files(sandbox)
        self.network = Network(sandbox)

    @classmethod
    def create(cls, template: str = "python", **kwargs: Any) -> "Sandbox":
        return cls(template, **kwargs)

    def start(self) -> "Sandbox":
        """Already done by the constructor (kept so both faces have the same methods)."""
        run_sync(self._async.start())
        return self

    @classmethod
    def connect(cls, sandbox_id: str, *, api_url: Optional[str] = None, api_key: Optional[str] = None,
                isolation: Optional[str] = None) -> "Sandbox":
        """Reattach to a live sandbox on a server, or resume a paused local gVisor sandbox."""
        sandbox = cls.__new__(cls)
        sandbox._attach(run_sync(AsyncSandbox.connect(sandbox_id, api_url=api_url, api_key=api_key,
                                                      isolation=isolation)))
        return sandbox

    def pause(self) -> PauseInfo:
        return run_sync(self._async.pause())

    def resume(self) -> PauseInfo:
        return run_sync(self._async.resume())

    def fork(self) -> "Sandbox":
        """A new sandbox with a copy of this live session (variables, files, working directory), independent
        from then on, its random state reseeded. gVisor tier; the process tier raises InvalidRequest."""
        sandbox = type(self).__new__(type(self))
        sandbox._attach(run_sync(self._async.fork()))
        return sandbox

    def interrupt(self) -> None:
        run_sync(self._async.interrupt())

    @staticmethod
    def list(metadata: Optional[Mapping[str, str]] = None, *, status: str = "running",
             api_url: Optional[str] = None, api_key: Optional[str] = None) -> "list[SandboxInfo]":
        """Your sandboxes on a server, newest first, having every ``metadata`` pair given."""
        return run_sync(AsyncSandbox.list(metadata, status=status, api_url=api_url, api_key=api_key))

    @property
    def sandbox_id(self) -> str:
        return self._async.sandbox_id

    @property
    def limits(self) -> Limits:
        return self._async.limits

    @property
    def metadata(self) -> dict:
        return self._async.metadata

    @property
    def isolation(self) -> str:
        """The tier it runs on: "process" or "gvisor"."""
        return self._async.isolation

    @property
    def template(self) -> str:
        return self._async.template

    @property
    def env(self) -> dict:
        return self._async.env

    @property
    def on_idle(self) -> str:
        return self._async.on_idle

    @property
    def is_running(self) -> bool:
        return self._async.is_running

    @property
    def is_paused(self) -> bool:
        return self._async.is_paused

    @property
    def end_reason(self) -> Optional[str]:
        return self._async.end_reason

    @property
    def end_limit(self) -> Optional[str]:
        return self._async.end_limit

    @property
    def dies_with_owner(self) -> bool:
        return self._async.dies_with_owner

    def run_code(self, code: str, *, timeout: Optional[float] = None, on_stdout: Optional[OutputHandler] = None,
                 on_stderr: Optional[OutputHandler] = None, on_result: Optional[ResultHandler] = None) -> Execution:
        """Run Python in the sandbox's session. Variables persist between calls.

        The user's exceptions and limits that stop the code come back in ``Execution.error``;
        only failures of the sandbox itself raise.
        """
        return run_sync(self._async.run_code(code, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr,
                                             on_result=on_result))

    def metrics(self) -> SandboxMetrics:
        return run_sync(self._async.metrics())

    def set_timeout(self, seconds: float) -> None:
        run_sync(self._async.set_timeout(seconds))

    def keep_alive(self) -> None:
        run_sync(self._async.keep_alive())

    def get_url(self, port: int) -> str:
        return run_sync(self._async.get_url(port))

    def kill(self) -> None:
        run_sync(self._async.kill())

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()

    def __del__(self) -> None:  # a forgotten local sandbox must not outlive its owner (a remote one may)
        try:
            # kill() is idempotent and also cleans up a sandbox whose agent died (is_running is then False).
            if self._async.dies_with_owner and _LoopThread._loop is not None and not _LoopThread._loop.is_closed():
                asyncio.run_coroutine_threadsafe(self._async.kill(), _LoopThread._loop)
        except Exception:
            pass
