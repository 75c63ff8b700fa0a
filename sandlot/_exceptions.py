"""One exception tree. A failed *user program* is never an exception: it is a result with an error."""

from __future__ import annotations


class SandlotError(Exception):
    """Root of every error Sandlot raises."""


class InvalidRequest(SandlotError, ValueError):
    """The caller asked for something malformed or impossible (bad limits, bad path, unknown template)."""


class SandboxNotFound(SandlotError):
    """The sandbox does not exist, or no longer does (killed, expired)."""


class TimeoutError(SandlotError):  # noqa: A001 - the name users catch, as the design says
    """A Sandlot operation (not user code) did not finish in time."""


class SandboxCrashed(SandlotError):
    """The sandbox died: a limit killed it, or it broke the protocol. ``limit`` names the limit, if one."""

    def __init__(self, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class AuthError(SandlotError):
    """Missing or wrong credentials."""


class QuotaExceeded(SandlotError):
    """A tenant quota would be exceeded. ``retry_after`` (seconds) is set when waiting helps (request rate)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerUnavailable(SandlotError):
    """The Sandlot server could not be reached, or went away in the middle of a call (a restart, a crash):
    its sandboxes may well live on, and a retry once it is back may work."""


class HostUnsupported(SandlotError):
    """This host cannot run sandboxes as asked (no user namespaces, no writable cgroups...)."""


class FileError(SandlotError, OSError):
    """A files API call failed inside the sandbox (missing file, not a directory, disk full...)."""

    def __init__(self, message: str, errno: int | None = None, path: str | None = None) -> None:
        SandlotError.__init__(self, message)
        self.errno = errno
        self.filename = path
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror


class ImageError(SandlotError):
    """Pulling, loading, unpacking or building an image failed; the message says which step and why."""
