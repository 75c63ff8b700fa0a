"""The backend interface: small and Popen-like, in the spirit of jupyter_client's provisioners.

A backend starts a sandbox running the agent and hands back a ``SandboxProcess``: a channel that
speaks the wire protocol, plus process control. Everything above (sessions, commands, files,
limits reporting) is written once against this interface, so a gVisor backend only has to start
the same agent differently.
"""

from __future__ import annotations

import abc
import os
from typing import Optional

from .._host.channel import Channel
from .._limits import Limits
from .._templates import Template


class SandboxProcess(abc.ABC):
    id: str
    limits: Limits
    channel: Channel
    killed_reason: Optional[str]

    @property
    @abc.abstractmethod
    def pid(self) -> int: ...

    @property
    @abc.abstractmethod
    def returncode(self) -> Optional[int]: ...

    @abc.abstractmethod
    async def wait(self) -> int: ...

    @abc.abstractmethod
    async def kill(self, reason: str = "killed") -> None: ...


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    async def start(self, template: Template, limits: Limits, env: dict[str, str], *,
                    awaited: bool = False) -> SandboxProcess:
        """A new sandbox running the agent. ``awaited``: a caller is waiting for this one (not a warm
        pool filling up), so it should be ready as soon as possible rather than fully warmed."""


ISOLATIONS = ("process", "gvisor")


def default_isolation(isolation: Optional[str] = None) -> str:
    """The tier a sandbox asked for, else ``$SANDLOT_ISOLATION`` (a host that wants gVisor for
    everything sets it once), else the process tier."""
    return isolation or os.environ.get("SANDLOT_ISOLATION") or "process"


def get_backend(isolation: str) -> Backend:
    from .._exceptions import InvalidRequest

    if isolation == "process":
        from .process import ProcessBackend

        return ProcessBackend()
    if isolation == "gvisor":
        from .gvisor import GVisorBackend

        return GVisorBackend()
    raise InvalidRequest(f"unknown isolation {isolation!r}; available: {list(ISOLATIONS)}")
