"""The seam between the SDK and where sandboxes run, as httpx has between its client and the wire.

``AsyncSandbox`` (the one public class) validates a call once and hands it to a *handle*: the live
sandbox as one transport reaches it. Two transports implement the same handle interface:

- the local transport (_engine.py): an Engine in this process, its handles are ``LocalSandbox``
  (_local.py), which speak the agent protocol over a channel;
- the HTTP transport (_http.py): a Sandlot server, its handles are ``RemoteSandbox``, which speak
  REST and NDJSON streams with httpx.

A new field of a sandbox (a network policy, a mount) travels in the ``SandboxSpec`` both transports
already carry; a new operation is one method here, one in each handle, one in the facade.
"""

from __future__ import annotations

import abc
import dataclasses
from datetime import datetime
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Optional, Union

from ._exceptions import InvalidRequest
from ._limits import Limits
from ._models import (CommandResult, EntryInfo, Execution, PauseInfo, Result, SandboxInfo, SandboxMetrics,
                      VolumeInfo)
from ._output import OutputHandler
from ._spec import SandboxSpec

ResultHandler = Callable[[Result], Union[None, Awaitable[None]]]


class AsyncCommandHandle(abc.ABC):
    """A running command: ``await wait()``, ``kill()``, ``send_stdin()``, ``close_stdin()``; output so far in
    ``stdout``/``stderr``."""

    pid: Optional[int] = None  # the command's pid inside the sandbox, once it started
    # The byte of each stream its stdout/stderr text starts at: 0 but for a handle connected from an offset,
    # or one that found older bytes dropped (the sandbox keeps the newest `output`-limit bytes of a command).
    offsets: Mapping[str, int] = {"stdout": 0, "stderr": 0}

    @property
    @abc.abstractmethod
    def stdout(self) -> str: ...

    @property
    @abc.abstractmethod
    def stderr(self) -> str: ...

    @abc.abstractmethod
    async def wait(self) -> CommandResult: ...

    @abc.abstractmethod
    async def kill(self, signal: int = 9) -> None: ...

    @abc.abstractmethod
    async def send_stdin(self, data: Union[str, bytes], close: bool = False) -> None: ...

    async def close_stdin(self) -> None:
        """End the command's input (EOF): a program reading stdin to its end, like ``cat`` or ``wc``, finishes."""
        await self.send_stdin(b"", close=True)


@dataclasses.dataclass
class CommandInfo:
    """A background command that is still running (``commands.list()``); ``commands.connect(pid)`` reattaches."""

    pid: int  # inside the sandbox
    cmd: str
    cwd: Optional[str]  # as asked (None: the sandbox's default, its home or the image's working directory)
    started_at: datetime  # UTC


class CommandsHandle(abc.ABC):
    @abc.abstractmethod
    async def run(self, cmd: str, *, timeout: Optional[float], env: Optional[Mapping[str, str]], cwd: Optional[str],
                  stdin: Union[str, bytes, None], on_stdout: Optional[OutputHandler],
                  on_stderr: Optional[OutputHandler], background: bool) -> Union[CommandResult, AsyncCommandHandle]:
        """Arguments already validated by the facade."""

    @abc.abstractmethod
    async def list(self) -> "list[CommandInfo]":
        """The sandbox's background commands still running, oldest first."""

    @abc.abstractmethod
    async def connect(self, pid: int, *, offset: "Union[None, int, Mapping[str, int]]" = None,
                      on_stdout: Optional[OutputHandler], on_stderr: Optional[OutputHandler]) -> AsyncCommandHandle:
        """A handle to background command ``pid``, running or ended lately (SandboxNotFound if neither).
        ``offset=None``: its output so far in ``stdout``/``stderr``, the callbacks get what it prints from now
        on; an int (or a mapping per stream): its output from that byte on, callbacks included."""


class FilesHandle(abc.ABC):
    """Paths and formats arrive validated."""

    @abc.abstractmethod
    async def write(self, path: str, data: Any, *, append: bool) -> EntryInfo: ...

    @abc.abstractmethod
    def stream(self, path: str) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def list(self, path: str, *, depth: int) -> "list[EntryInfo]": ...

    @abc.abstractmethod
    async def stat(self, path: str) -> EntryInfo: ...

    @abc.abstractmethod
    async def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    async def remove(self, path: str) -> None: ...

    @abc.abstractmethod
    async def mkdir(self, path: str) -> bool: ...


class SandboxHandle(abc.ABC):
    """A live sandbox as one transport reaches it. What it reports describes the sandbox as it is
    (its limits after a server's ceilings, its tier), which may differ from what was asked."""

    sandbox_id: str
    template: str
    isolation: str
    limits: Limits
    metadata: dict
    commands: CommandsHandle
    files: FilesHandle
    dies_with_owner: bool  # a local sandbox ends with this process; a server's lives on

    @property
    @abc.abstractmethod
    def is_running(self) -> bool: ...

    @property
    @abc.abstractmethod
    def is_paused(self) -> bool: ...

    @property
    @abc.abstractmethod
    def end_reason(self) -> Optional[str]: ...

    @property
    @abc.abstractmethod
    def end_limit(self) -> Optional[str]: ...

    @abc.abstractmethod
    async def run_code(self, code: str, *, timeout: Optional[float], on_stdout: Optional[OutputHandler],
                       on_stderr: Optional[OutputHandler], on_result: Optional[ResultHandler]) -> Execution: ...

    @abc.abstractmethod
    async def pause(self) -> PauseInfo: ...

    @abc.abstractmethod
    async def resume(self) -> PauseInfo: ...

    async def fork(self) -> "SandboxHandle":
        """A new sandbox holding a copy of this live session (where the tier can)."""
        raise InvalidRequest("this transport cannot fork a sandbox")

    @abc.abstractmethod
    async def interrupt(self) -> None: ...

    @abc.abstractmethod
    async def kill(self) -> None: ...

    @abc.abstractmethod
    async def metrics(self) -> SandboxMetrics: ...

    @abc.abstractmethod
    async def set_timeout(self, seconds: float) -> None: ...

    @abc.abstractmethod
    async def keep_alive(self) -> None: ...

    @abc.abstractmethod
    async def update_network(self, allow: Optional[list], deny: Optional[list]) -> Any:
        """Replace the allow and/or deny rules (validated), live; returns the policy as JSON."""

    @abc.abstractmethod
    async def network_log(self, since: Optional[float]) -> "list[dict]": ...

    @abc.abstractmethod
    async def get_url(self, port: int) -> str:
        """A URL of the host (or server) that reaches ``port`` inside the sandbox."""


class Transport(abc.ABC):
    """Where sandboxes are made and found."""

    def check(self, spec: SandboxSpec) -> None:
        """Refuse (InvalidRequest) a spec this transport can never serve, before anything starts: called
        when an ``AsyncSandbox`` is constructed, so a bad request fails where it is written."""

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> SandboxHandle: ...

    @abc.abstractmethod
    async def connect(self, sandbox_id: str, *, isolation: Optional[str] = None) -> SandboxHandle:
        """A live sandbox again (a paused one is resumed), or SandboxNotFound."""

    @abc.abstractmethod
    async def list(self, metadata: Mapping[str, str], status: str) -> "list[SandboxInfo]": ...

    @abc.abstractmethod
    async def run_once(self, spec: SandboxSpec, code: str, *, timeout: Optional[float],
                       on_stdout: Optional[OutputHandler], on_stderr: Optional[OutputHandler],
                       on_result: Optional[ResultHandler]) -> Execution:
        """A fresh sandbox runs ``code`` and is gone afterwards."""

    # -- named volumes (of this host's SDK, or of the caller's tenant on a server) ----------------------
    @abc.abstractmethod
    async def create_volume(self, name: str, size: Any, inodes: Optional[int]) -> VolumeInfo: ...

    @abc.abstractmethod
    async def list_volumes(self) -> "list[VolumeInfo]": ...

    @abc.abstractmethod
    async def volume_info(self, name: str) -> VolumeInfo: ...

    @abc.abstractmethod
    async def delete_volume(self, name: str) -> None: ...
