"""Sandlot: self-hosted sandboxes for code written by AI agents.

    from sandlot import Sandbox
    with Sandbox() as sb:
        sb.run_code("x = 41")
        print(sb.run_code("x + 1").text)   # 42
"""

from __future__ import annotations

from typing import Any

from ._exceptions import (AuthError, FileError, HostUnsupported, ImageError, InvalidRequest, QuotaExceeded, SandboxCrashed,
                          SandboxNotFound, SandlotError, ServerUnavailable, TimeoutError)
from ._limits import Limits
from ._models import (CommandResult, EntryInfo, Execution, ExecutionError, Logs, Result, SandboxInfo, SandboxMetrics,
                      Usage, VolumeInfo)
from ._sandbox import AsyncCommandHandle, AsyncSandbox, CommandInfo
from ._sync import CommandHandle, Sandbox, run_sync
from ._volumes import AsyncVolumes, Volumes

from ._version import __version__  # noqa: E402 - re-exported


async def async_run_code(code: str, *, template: str = "python", timeout: float | None = None,
                         limits: Any = None, env: Any = None, isolation: str | None = None,
                         api_url: str | None = None, api_key: str | None = None,
                         on_stdout: Any = None, on_stderr: Any = None, on_result: Any = None,
                         mounts: Any = None) -> Execution:
    """Stateless: a fresh sandbox runs ``code`` and is gone afterwards (on a server: in one request).
    ``timeout`` is the call's; ``mounts`` as ``Sandbox(mounts=...)``."""
    from . import _calls
    from ._sandbox import transport_for
    from ._spec import SandboxSpec

    _calls.check_code(code)
    _calls.check_timeout(timeout)
    spec = SandboxSpec.build(template, isolation=isolation, limits=limits, env=env, mounts=mounts)
    return await transport_for(api_url, api_key).run_once(
        spec, code, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr, on_result=on_result)


def configure_pool(template: str = "python", *, min_ready: int, max_ready: int | None = None) -> None:
    """Keep ``min_ready`` sandboxes of ``template`` waiting in this process (at most ``max_ready``)."""
    from ._engine import default_engine

    default_engine().pools.configure(template, min_ready=min_ready, max_ready=max_ready)


volumes = Volumes()  # named volumes: local, or your tenant's on a server (api_url / SANDLOT_API_URL)


def run_code(code: str, *, template: str = "python", timeout: float | None = None,
             limits: Any = None, env: Any = None, isolation: str | None = None,
             api_url: str | None = None, api_key: str | None = None,
             on_stdout: Any = None, on_stderr: Any = None, on_result: Any = None,
             mounts: Any = None) -> Execution:
    """Stateless: a fresh sandbox runs ``code`` and is gone afterwards (on a server: in one request).
    ``timeout`` is the call's; ``mounts`` as ``Sandbox(mounts=...)``."""
    return run_sync(async_run_code(code, template=template, timeout=timeout, limits=limits, env=env,
                                   isolation=isolation, api_url=api_url, api_key=api_key, on_stdout=on_stdout,
                                   on_stderr=on_stderr, on_result=on_result, mounts=mounts))


__all__ = [
    "__version__", "Sandbox", "AsyncSandbox", "configure_pool", "CommandHandle", "AsyncCommandHandle", "run_code", "async_run_code",
    "Limits", "Execution", "ExecutionError", "Result", "Logs", "Usage", "SandboxMetrics", "SandboxInfo", "CommandResult",
    "EntryInfo", "CommandInfo", "VolumeInfo", "volumes", "Volumes", "AsyncVolumes",
    "SandlotError", "SandboxNotFound", "TimeoutError", "SandboxCrashed", "AuthError", "QuotaExceeded",
    "InvalidRequest", "HostUnsupported", "FileError", "ImageError", "ServerUnavailable",
]
