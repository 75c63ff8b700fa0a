"""Request and response bodies (pydantic). They are the HTTP contract; the SDK's dataclasses are its Python face.

Every request string refuses lone UTF-16 surrogates (JSON can carry ``"\\ud800"``, nothing downstream can
store or run it) and every collection is bounded, so a malformed or giant request is a 4xx, never a 500.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from .. import _calls
from .._spec import SandboxSpec, check_env
from .settings import MAX_LIFETIME

def _no_surrogates(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("strings must be valid Unicode (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_no_surrogates)]
Seconds = Annotated[float, Field(gt=0, le=MAX_LIFETIME, allow_inf_nan=False)]
LimitValue = Union[StrictInt, StrictFloat, Annotated[Text, Field(max_length=32)]]


def _spec_of(body: "CreateSandbox | RunOnce", **fields: Any) -> None:
    """Validate a create as the SDK does: by building the one SandboxSpec (its env, metadata and size rules),
    so the server's rules and the SDK's cannot drift. A failure is a 422 like the other schema checks. The
    limits and timeout are built by the registry with the same ``Limits.build`` and the server's ceilings
    (a 400, which names the limit or the ceiling)."""
    SandboxSpec.build(body.template, isolation=body.isolation, env=body.env, **fields)


def _check_env(env: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
    check_env(env)  # the SDK's own validator (an InvalidRequest is a ValueError: pydantic answers 422)
    return env


# The SDK's own per-call checks: one limit for code and commands, wherever a call comes from.
def _check_code(code: str) -> str:
    return _calls.check_code(code)


def _check_cmd(cmd: str) -> str:
    return _calls.check_cmd(cmd)


def _check_command_env(env: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
    _calls.check_command_env(env)
    return env


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests ----------------------------------------------------------------------------------------
MOUNTS_DOC = ('{"/data": "/srv/shared/data", "/work": "/srv/shared/proj:rw", "/cache": "vol:NAME"}: host '
              "directories (read-only unless ':rw'; only inside the operator's --host-dir-root, GET /v1/info) and "
              "your named volumes (writable unless ':ro'; POST /v1/volumes makes one)")


class CreateSandbox(_Body):
    template: Text = Field("python", max_length=64, description="Template name (GET /v1/info lists them)")
    timeout: Optional[Seconds] = Field(None, description="Lifetime in seconds from now (extend with /timeout)")
    limits: Optional[dict[Text, LimitValue]] = Field(
        None, description='Overrides of the default limits, e.g. {"memory": "2G", "cpu": 2, "idle_timeout": 600}; '
                          "each at most the server's ceiling (GET /v1/info)")
    env: Optional[dict[Text, Text]] = Field(None, description="Environment of the session and commands")
    metadata: Optional[dict[Text, Text]] = Field(None, description="Your tags; filter GET /v1/sandboxes by them")
    isolation: Text = Field("process", max_length=32,
                            description='"process", or "gvisor" where the server enables it (GET /v1/info lists them)')
    network: Optional[Union[Text, dict[Text, list[Text]]]] = Field(
        None, description='No network (null, the default), "public", or {"allow": [rules], "deny": [rules]}: rules '
                          'are names ("pypi.org", "*.pythonhosted.org"), IPs or CIDRs, each with an optional ":port" '
                          'or ":lo-hi". Needs a server started with --allow-network.')
    secrets: Optional[dict[Text, dict[Text, Any]]] = Field(
        None, description='{"NAME": {"value": "...", "hosts": ["api.example.com"]}}: the sandbox sees a placeholder; '
                          "the value goes only into HTTPS request headers to those hosts")
    mounts: Optional[dict[Text, Text]] = Field(None, description=MOUNTS_DOC)

    @model_validator(mode="after")
    def _spec(self):
        _spec_of(self, metadata=self.metadata, network=self.network, secrets=self.secrets, mounts=self.mounts)
        return self

    @field_validator("limits")
    @classmethod
    def _few_limits(cls, value):
        if value is not None and len(value) > 32:
            raise ValueError("too many limits")
        return value


class UpdateNetwork(_Body):
    allow: Optional[list[Text]] = Field(None, description="the new allow rules (null keeps them)")
    deny: Optional[list[Text]] = Field(None, description="the new deny rules (null keeps them)")


class NetworkOut(BaseModel):
    sandbox_id: str
    network: Any = Field(None, description="the policy in force (the secrets' hosts are granted on top)")


class NetworkDecision(BaseModel):
    time: float
    kind: str
    name: Optional[str] = None
    address: Optional[str] = None
    port: Optional[int] = None
    verdict: str
    rule: Optional[str] = None
    reason: str = ""


class RunCode(_Body):
    code: Text = Field(..., description="Python source, run in the sandbox's session (at most 192 KiB of UTF-8)")
    timeout: Optional[Seconds] = Field(None, description="Wall time of this call (default: the sandbox's limit)")
    stream: bool = Field(False, description="Answer with NDJSON events while the code runs")

    _code = field_validator("code")(_check_code)


class RunCommand(_Body):
    cmd: Text = Field(..., min_length=1, description="Run by /bin/sh -c (at most 128 KiB)")
    timeout: Optional[Seconds] = None
    env: Optional[dict[Text, Text]] = None
    cwd: Optional[Text] = Field(None, max_length=4096)
    stdin: Optional[Text] = Field(None, max_length=8 * 1024**2, description="Fed to the command, then closed")
    stdin_base64: bool = Field(False, description="stdin is base64 (for bytes that are not UTF-8)")
    background: bool = Field(False, description="Return at once with a command id (see /commands/{command_id})")
    stream: bool = False

    _env = field_validator("env")(_check_command_env)
    _cmd = field_validator("cmd")(_check_cmd)


class RunOnce(_Body):
    code: Text = Field(..., description="Python source (at most 192 KiB of UTF-8)")
    template: Text = Field("python", max_length=64)
    timeout: Optional[Seconds] = None
    limits: Optional[dict[Text, LimitValue]] = None
    env: Optional[dict[Text, Text]] = None
    isolation: Text = Field("process", max_length=32, description='"process", or "gvisor" where the server enables it')
    mounts: Optional[dict[Text, Text]] = Field(None, description=MOUNTS_DOC)
    stream: bool = False

    _code = field_validator("code")(_check_code)

    @model_validator(mode="after")
    def _spec(self):
        _spec_of(self, mounts=self.mounts)
        return self


class CreateVolume(_Body):
    name: Text = Field(..., min_length=1, max_length=63, description="1-63 of a-z, 0-9, '.', '_', '-'")
    size: Union[StrictInt, Annotated[Text, Field(max_length=32)]] = Field(
        "1G", description='bytes, or a size like "2G": the kernel enforces it (a full volume is ENOSPC)')
    inodes: Optional[StrictInt] = Field(None, description="the most files it can hold (default: one per 16 KiB)")


class VolumeOut(BaseModel):
    name: str
    size: int = Field(..., description="bytes: its capacity")
    inodes: int = Field(..., description="the most files it can hold")
    allocated: int = Field(..., description="bytes its image takes on the host's disk now")
    created_at: float
    in_use: bool = Field(..., description="whether a sandbox has it mounted (delete is refused then)")


class SetTimeout(_Body):
    timeout: Seconds = Field(..., description="The sandbox lives this many seconds from now")


class MakeDir(_Body):
    path: Text = Field(..., min_length=1, max_length=4096)


class CommandInput(_Body):
    data: Text = Field("", max_length=8 * 1024**2)
    base64: bool = False
    close: bool = False


class CommandSignal(_Body):
    signal: int = Field(9, ge=1, le=64)


# -- responses ---------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    type: str = Field(..., description="The SDK's exception name: SandboxNotFound, InvalidRequest, QuotaExceeded...")
    message: str
    limit: Optional[str] = None
    errno: Optional[int] = None
    path: Optional[str] = None
    retry_after: Optional[float] = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ResultOut(BaseModel):
    text: Optional[str] = None
    html: Optional[str] = None
    markdown: Optional[str] = None
    svg: Optional[str] = None
    png: Optional[str] = None
    jpeg: Optional[str] = None
    latex: Optional[str] = None
    json_: Optional[Any] = Field(None, alias="json", serialization_alias="json")
    javascript: Optional[str] = None
    is_main_result: bool = False
    extra: dict = {}

    model_config = ConfigDict(populate_by_name=True)


class LogsOut(BaseModel):
    stdout: list[str] = []
    stderr: list[str] = []


class ExecutionErrorOut(BaseModel):
    name: str
    value: str
    traceback: str = ""
    limit: Optional[str] = None


class UsageOut(BaseModel):
    cpu_seconds: float = 0.0
    peak_memory: int = 0
    wall_seconds: float = 0.0


class ExecutionOut(BaseModel):
    results: list[ResultOut] = []
    logs: LogsOut = LogsOut()
    error: Optional[ExecutionErrorOut] = None
    execution_count: Optional[int] = None
    usage: UsageOut = UsageOut()
    truncated: bool = False
    text: Optional[str] = Field(None, description="The main result's text/plain form")


class CommandResultOut(BaseModel):
    exit_code: Optional[int]
    stdout: str = ""
    stderr: str = ""
    error: Optional[str] = None
    usage: UsageOut = UsageOut()
    truncated: bool = False
    limit: Optional[str] = Field(None, description="the limit that ended the command: timeout, output or pids")


class BackgroundCommandOut(BaseModel):
    command_id: str
    pid: Optional[int] = None
    running: bool
    stdout: str = Field("", description="Output so far")
    stderr: str = ""
    result: Optional[CommandResultOut] = None


class RunningCommandOut(BaseModel):
    command_id: str = Field(..., description="for /commands/{command_id} (its output, stream, kill, stdin)")
    pid: int = Field(..., description="its pid inside the sandbox")
    cmd: str
    cwd: Optional[str] = Field(None, description="as asked (null: the sandbox's default directory)")
    started_at: datetime


class EntryOut(BaseModel):
    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: float


class ExistsOut(BaseModel):
    exists: bool


class MakeDirOut(BaseModel):
    created: bool


class MetricsOut(BaseModel):
    memory: int
    memory_peak: int
    cpu_seconds: float
    processes: int
    network_bytes_out: int = 0
    network_bytes_in: int = 0
    network_connections: int = 0
    network_allowed: int = 0
    network_denied: int = 0
    network_open: int = 0


class SandboxOut(BaseModel):
    sandbox_id: str
    template: str
    isolation: str = Field("process", description="the isolation tier it runs on: process or gvisor")
    status: Literal["running", "paused", "ended", "lost"] = Field(
        ..., description="paused: checkpointed to disk (POST .../resume); "
                         "lost: the server stopped (restart or crash) while it ran")
    metadata: dict[str, str]
    limits: dict[str, Any]
    created_at: datetime
    expires_at: Optional[datetime] = None
    ended_at: Optional[datetime] = None
    end_reason: Optional[str] = None


class PauseOut(BaseModel):
    sandbox_id: str
    status: Literal["running", "paused"]
    seconds: float = Field(..., description="how long the pause (checkpoint) or resume (restore) took")
    checkpoint_bytes: int = Field(0, description="size of the checkpoint on disk (pause)")


class HealthOut(BaseModel):
    """Liveness only: no key is needed, so it says nothing of anyone's sandboxes (nor of the server's make-up)."""

    status: Literal["ok"] = "ok"


class QuotasOut(BaseModel):
    max_live: int
    max_lifetime: float
    requests_per_minute: int
    total_memory: int = Field(..., description="bytes: the most the memory limits of your live sandboxes may sum to")
    total_pids: int = Field(..., description="the most the pids limits of your live sandboxes may sum to")
    max_volumes: int = Field(..., description="named volumes you may keep")
    total_volume_size: int = Field(..., description="bytes: the most your volumes' sizes may sum to")


class UsageNowOut(BaseModel):
    live: int = Field(..., description="your live sandboxes (paused ones included), and creations in flight")
    memory: int = Field(..., description="bytes: the memory limits of your running sandboxes, summed")
    pids: int = Field(..., description="the pids limits of your running sandboxes, summed")


class InfoOut(BaseModel):
    version: str
    templates: list[str]
    isolations: list[str]
    defaults: dict[str, float] = Field(..., description="the limits a sandbox gets when it asks for none")
    ceilings: dict[str, float] = Field(..., description="the most you may ask for, per limit (over it: 400)")
    quotas: QuotasOut
    usage: UsageNowOut
    network: dict[str, Any] = Field(default_factory=dict, description='{"allowed": whether sandboxes may have a '
                                    'network here, "within": the rules yours must lie within ([]: any)}')
    mounts: dict[str, Any] = Field(default_factory=dict, description='{"host_dirs": whether host directories '
                                   'may be granted here, "host_dir_roots": the directories they must lie within, '
                                   '"volumes": how many you have, "volume_size": their sizes summed (bytes)}')


def when(ts: Optional[float]) -> Optional[datetime]:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


def execution_out(execution) -> dict:
    body = dataclasses.asdict(execution)
    body["text"] = execution.text
    return body


NDJSON = "application/x-ndjson"
STREAM_DOC = (
    "With `stream: true` the answer is NDJSON, one event per line, while the code runs: "
    '`{"type": "stdout"|"stderr", "text": ...}`, `{"type": "result", "result": {...}}`, '
    '`{"type": "error", "error": {...}}` (the code\'s own error), `{"type": "ping"}` (keep-alive), then '
    '`{"type": "end", ...}` with the rest of the outcome, or `{"type": "exception", "error": {...}}` if the '
    "sandbox itself failed.")
