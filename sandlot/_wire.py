"""The one table between the exception tree and the wire, used by the server and the HTTP transport.

An error travels as HTTP status + ``{"type": <exception name>, "message": ..., <fields>}``: the server
writes it with :func:`to_wire`, the HTTP transport raises it back with :func:`from_wire`, so a client
of a server catches exactly what a local sandbox would have raised, with the same fields (``limit``,
``errno``, ``path``, ``retry_after``). A class may set ``http_status`` to refine its status (a
server's 403 and 413 are AuthError and InvalidRequest to clients).
"""

from __future__ import annotations

import errno as errnos
from typing import Any, Mapping

from ._exceptions import (AuthError, FileError, HostUnsupported, ImageError, InvalidRequest, QuotaExceeded,
                          SandboxCrashed, SandboxNotFound, SandlotError, TimeoutError)

# (exception, HTTP status), most specific first; the names are what clients raise.
TABLE: tuple[tuple[type[SandlotError], int], ...] = (
    (SandboxNotFound, 404),
    (AuthError, 401),
    (QuotaExceeded, 429),
    (InvalidRequest, 400),
    (SandboxCrashed, 410),  # the sandbox is dead (a limit killed it, or its agent broke)
    (TimeoutError, 504),
    (HostUnsupported, 503),
    (FileError, 400),
    (ImageError, 500),  # pulling, unpacking or building an image failed
    (SandlotError, 500),
)
_BY_NAME = {cls.__name__: cls for cls, _ in TABLE}
# A status without a recognisable body (a proxy's answer, an old server) still maps to the right class.
_BY_STATUS = {400: InvalidRequest, 401: AuthError, 403: AuthError, 404: SandboxNotFound, 405: InvalidRequest,
              408: TimeoutError, 409: InvalidRequest, 410: SandboxCrashed, 413: InvalidRequest,
              415: InvalidRequest, 422: InvalidRequest, 429: QuotaExceeded, 503: HostUnsupported,
              504: TimeoutError}


def type_name(exc: BaseException) -> str:
    """The nearest class of the table: what the client will raise."""
    for cls in type(exc).__mro__:
        if cls in _BY_NAME.values():
            return cls.__name__
    return "SandlotError"


def status_for(exc: SandlotError) -> int:
    explicit = getattr(exc, "http_status", None)
    if isinstance(explicit, int):
        return explicit
    if isinstance(exc, FileError):
        return 404 if exc.errno == errnos.ENOENT else 400
    return next(code for cls, code in TABLE if isinstance(exc, cls))


def to_wire(exc: BaseException) -> dict[str, Any]:
    """The error body's ``error`` object."""
    detail: dict[str, Any] = {"type": type_name(exc), "message": str(exc)}
    if isinstance(exc, SandboxCrashed) and exc.limit:
        detail["limit"] = exc.limit
    if isinstance(exc, FileError):
        detail["errno"] = exc.errno
        detail["path"] = exc.filename
    if isinstance(exc, QuotaExceeded) and exc.retry_after is not None:
        detail["retry_after"] = round(exc.retry_after, 3)
    return detail


def from_wire(status: int, detail: Mapping[str, Any]) -> SandlotError:
    """The exception a local sandbox would have raised for this error."""
    message = str(detail.get("message") or f"the server answered HTTP {status}")
    cls = _BY_NAME.get(str(detail.get("type"))) or _BY_STATUS.get(status) or SandlotError
    if cls is FileError:
        errno = detail.get("errno")
        return FileError(message, errno=errno if isinstance(errno, int) else None, path=detail.get("path"))
    if cls is SandboxCrashed:
        limit = detail.get("limit")
        return SandboxCrashed(message, limit=limit if isinstance(limit, str) else None)
    if cls is QuotaExceeded:
        retry = detail.get("retry_after")
        return QuotaExceeded(message, retry_after=float(retry) if isinstance(retry, (int, float)) else None)
    return cls(message)
