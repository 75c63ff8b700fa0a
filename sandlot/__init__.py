"""Sandlot: self-hosted sandboxes for code written by AI agents.

    from sandlot import Sandbox
    with Sandbox() as sb:
        sb.run_code("x = 41")
        print(sb.run_code("x + 1").text)   # 42
"""

from __future__ import annotations

from typing import Any

from ._exceptions import (AuthError, FileError, HostUnsupported, ImageError, InvalidRequest, QuotaExceeded, SandboxCrashed,
                          SandboxNotFound, SandlotError, TimeoutError)
from ._limits import Limits
from ._pool import configure_pool
from ._models import (CommandResult, EntryInfo, Execution, ExecutionError, Logs, Result, SandboxInfo, SandboxMetrics,
                      Usage)
from ._sandbox import AsyncCommandHandle, AsyncSandbox
from ._sync import CommandHandle, Sandbox, run_sync

__version__ = "0.1.0"


async def async_run_code(code: str, *, template: str = "python", timeout: float | None = None,
                         limits: Any = None, env: Any = None, isolation: str | None = None,
                         api_url: str | None = None, api_key: str | None = None, **callbacks: Any) -> Execution:
    """Stateless: a fresh sandbox runs ``code`` and is gone afterwards (on a server: in one request)."""
    from ._sandbox import _wants_server

    if _wants_server(api_url):
        from ._remote import run_once

        return await run_once(code, template=template, timeout=timeout, limits=limits, env=env, isolation=isolation,
                              api_url=api_url, api_key=api_key, **callbacks)
    async with AsyncSandbox(template, limits=limits, env=env, isolation=isolation, api_url="") as sandbox:
        return await sandbox.run_code(code, timeout=timeout, **callbacks)


def run_code(code: str, **kwargs: Any) -> Execution:
    """Stateless: a fresh sandbox runs ``code`` and is gone afterwards."""
    return run_sync(async_run_code(code, **kwargs))


__all__ = [
    "Sandbox", "AsyncSandbox", "configure_pool", "CommandHandle", "AsyncCommandHandle", "run_code", "async_run_code",
    "Limits", "Execution", "ExecutionError", "Result", "Logs", "Usage", "SandboxMetrics", "SandboxInfo", "CommandResult",
    "EntryInfo",
    "SandlotError", "SandboxNotFound", "TimeoutError", "SandboxCrashed", "AuthError", "QuotaExceeded",
    "InvalidRequest", "HostUnsupported", "FileError", "ImageError",
]
