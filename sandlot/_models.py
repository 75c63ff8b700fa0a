"""What calls return. Shapes follow E2B's SDK, the one agent developers already know."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Optional


@dataclasses.dataclass
class Result:
    """One displayed value: the cell's last expression (``is_main_result``), a ``display()``, or a figure."""

    text: Optional[str] = None
    html: Optional[str] = None
    markdown: Optional[str] = None
    svg: Optional[str] = None
    png: Optional[str] = None  # base64, as a notebook stores it
    jpeg: Optional[str] = None
    latex: Optional[str] = None
    json: Optional[Any] = None
    javascript: Optional[str] = None
    is_main_result: bool = False
    extra: dict = dataclasses.field(default_factory=dict)

    _MIME = {"text/plain": "text", "text/html": "html", "text/markdown": "markdown", "image/svg+xml": "svg",
             "image/png": "png", "image/jpeg": "jpeg", "text/latex": "latex", "application/json": "json",
             "application/javascript": "javascript"}

    @classmethod
    def from_mime(cls, data: dict, is_main: bool) -> "Result":
        fields: dict = {"is_main_result": is_main, "extra": {}}
        for mime, value in data.items():
            if mime in cls._MIME:
                fields[cls._MIME[mime]] = value
            else:
                fields["extra"][mime] = value
        return cls(**fields)

    def formats(self) -> list[str]:
        return [name for name in self._MIME.values() if getattr(self, name) is not None]


@dataclasses.dataclass
class Logs:
    stdout: list[str] = dataclasses.field(default_factory=list)
    stderr: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ExecutionError:
    """Raised *inside* the sandbox: the user's exception, or a limit that stopped the code.

    ``limit`` names the limit when one ended the call ("timeout", "memory", "output", "pids"...).
    """

    name: str
    value: str
    traceback: str = ""
    limit: Optional[str] = None


@dataclasses.dataclass
class Usage:
    cpu_seconds: float = 0.0
    peak_memory: int = 0  # bytes, the sandbox cgroup's high-water mark during the call
    wall_seconds: float = 0.0


@dataclasses.dataclass
class Execution:
    results: list[Result] = dataclasses.field(default_factory=list)
    logs: Logs = dataclasses.field(default_factory=Logs)
    error: Optional[ExecutionError] = None
    execution_count: Optional[int] = None
    usage: Usage = dataclasses.field(default_factory=Usage)
    truncated: bool = False  # output beyond the per-call cap was dropped

    @property
    def text(self) -> Optional[str]:
        """The main result's text/plain form, like a notebook's Out[n]."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None


@dataclasses.dataclass
class CommandResult:
    exit_code: Optional[int]
    stdout: str = ""
    stderr: str = ""
    error: Optional[str] = None  # set when a limit ended the command (timeout, output) or it could not start
    usage: Usage = dataclasses.field(default_factory=Usage)
    truncated: bool = False
    limit: Optional[str] = None  # the limit that ended it, as data: "timeout", "output", "pids"


@dataclasses.dataclass
class EntryInfo:
    name: str
    path: str
    type: str  # "file", "dir", "symlink", "other"
    size: int
    mode: int
    mtime: float


@dataclasses.dataclass
class SandboxMetrics:
    """A live sandbox's footprint, from its cgroup's own counters (host-side, not reported by the sandbox).

    ``memory`` is what the sandbox's cgroup is charged now: the pages its processes copied or
    allocated, its files (tmpfs) and page tables; pages still shared with the template's zygote are
    not charged to it, which is why idle sessions are cheap.
    """

    memory: int
    memory_peak: int
    cpu_seconds: float
    processes: int
    # Its network through the host's broker (all zero without one): bytes each way, connections accepted,
    # allowed, refused, open now.
    network_bytes_out: int = 0
    network_bytes_in: int = 0
    network_connections: int = 0
    network_allowed: int = 0
    network_denied: int = 0
    network_open: int = 0


@dataclasses.dataclass
class SandboxInfo:
    """What a server knows of one of your sandboxes (``Sandbox.list()``)."""

    sandbox_id: str
    template: str
    status: str  # "running", "ended", or "lost" (the server stopped while it ran)
    metadata: dict
    limits: dict
    created_at: datetime
    expires_at: Optional[datetime] = None  # the end of its lifetime (set_timeout moves it)
    ended_at: Optional[datetime] = None
    end_reason: Optional[str] = None
    isolation: str = "process"  # the tier it runs on


@dataclasses.dataclass
class VolumeInfo:
    """A named volume (``sandlot.volumes``): ``size`` and ``inodes`` are its caps, ``allocated`` what its
    image takes on the host's disk now, ``in_use`` whether a sandbox has it mounted."""

    name: str
    size: int
    inodes: int
    allocated: int
    created_at: float
    in_use: bool

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PauseInfo:
    """What a pause or resume cost: wall seconds, and the size of the checkpoint on disk."""

    seconds: float
    checkpoint_bytes: int
