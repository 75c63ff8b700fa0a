"""Request and response bodies (pydantic). They are the HTTP contract; the SDK's dataclasses are its Python face.

Every request string refuses lone UTF-16 surrogates (JSON can carry ``"\\ud800"``, nothing downstream can
store or run it) and every collection is bounded, so a malformed or giant request is a 4xx, never a 500.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, WithJsonSchema,
                      field_validator, model_validator)

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


# What a limit's value may be on the wire (checked, with the SDK's own messages, by Limits.build: a 400 that
# reads exactly as the SDK's error), and what the document promises for each kind of limit.
LimitValue = Union[StrictInt, StrictFloat, Annotated[Text, Field(max_length=32)]]
Number = Annotated[Optional[LimitValue], WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "null"}]})]
Size = Annotated[Optional[LimitValue], WithJsonSchema(
    {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 32}, {"type": "null"}]})]


class LimitOverrides(BaseModel):
    """The limits a sandbox asks for; each one left out (or null) keeps the server's default. Each must lie
    within the server's ceiling (GET /v1/info), or the answer is 400 naming the limit."""

    # Unknown names are documented as refused and refused by Limits.build (400, the SDK's message).
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})
    __pydantic_extra__: dict[str, LimitValue]

    cpu: Number = Field(None, description="cores (a cgroup quota), e.g. 0.5 or 2")
    memory: Size = Field(None, description='bytes, or a size like "512M" or "2G"')
    pids: Number = Field(None, description="the most processes and threads at once")
    disk: Size = Field(None, description="bytes (or a size) that home, /tmp and /dev/shm hold together")
    inodes: Number = Field(None, description="the most files they hold")
    open_files: Number = Field(None, description="open file descriptors per process")
    timeout: Number = Field(None, description="seconds: the default wall time of one call")
    idle_timeout: Number = Field(None, description="seconds without a call before the sandbox ends")
    lifetime: Number = Field(None, description="seconds the sandbox lives at most")
    output: Size = Field(None, description="bytes (or a size) kept of one call's output and results")

    @model_validator(mode="before")
    @classmethod
    def _few(cls, value):
        if isinstance(value, dict) and len(value) > 32:
            raise ValueError("too many limits")
        return value

    def overrides(self) -> dict:
        return self.model_dump(exclude_none=True)


# -- requests ----------------------------------------------------------------------------------------
MOUNTS_DOC = ('{"/data": "/srv/shared/data", "/work": "/srv/shared/proj:rw", "/cache": "vol:NAME"}: host '
              "directories (read-only unless ':rw'; only inside the operator's --host-dir-root, GET /v1/info) and "
              "your named volumes (writable unless ':ro'; POST /v1/volumes makes one)")


class CreateSandbox(_Body):
    template: Text = Field("python", max_length=64, description="Template name (GET /v1/info lists them)")
    timeout: Optional[Seconds] = Field(None, description="Lifetime in seconds from now (extend with /timeout)")
    limits: Optional[LimitOverrides] = Field(
        None, description='Overrides of the default limits, e.g. {"memory": "2G", "cpu": 2, "idle_timeout": 600}; '
                          "each at most the server's ceiling (GET /v1/info)")
    env: Optional[dict[Text, Text]] = Field(None, description="Environment of the session and commands")
    metadata: Optional[dict[Text, Text]] = Field(None, description="Your tags; filter GET /v1/sandboxes by them")
    isolation: Optional[Text] = Field(None, max_length=32,
                                      description='"process", "gvisor" or "kubernetes" where the server enables it '
                                                  "(GET /v1/info lists them); default: the first it lists")
    network: Optional[Union[Text, dict[Text, list[Text]]]] = Field(
        None, description='No network (null, the default), "public", or {"allow": [rules], "deny": [rules]}: rules '
                          'are names ("pypi.org", "*.pythonhosted.org"), IPs or CIDRs, each with an optional ":port" '
                          'or ":lo-hi". Needs a server started with --allow-network.')
    secrets: Optional[dict[Text, dict[Text, Any]]] = Field(
        None, description='{"NAME": {"value": "...", "hosts": ["api.example.com"]}}: the sandbox sees a placeholder; '
                          "the value goes only into HTTPS request headers to those hosts")
    mounts: Optional[dict[Text, Text]] = Field(None, description=MOUNTS_DOC)
    on_idle: Literal["kill", "pause"] = Field(
        "kill", description='After its idle timeout: "kill" it, or "pause" it (gVisor tier: checkpointed to disk, '
                            "its memory freed; the next call of any kind wakes it)")

    @model_validator(mode="after")
    def _spec(self):
        _spec_of(self, metadata=self.metadata, network=self.network, secrets=self.secrets, mounts=self.mounts,
                 on_idle=self.on_idle)
        return self



class UpdateNetwork(_Body):
    allow: Optional[list[Text]] = Field(None, description="the new allow rules (null keeps them)")
    deny: Optional[list[Text]] = Field(None, description="the new deny rules (null keeps them)")


class NetworkPolicy(BaseModel):
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
    limits: Optional[LimitOverrides] = None
    env: Optional[dict[Text, Text]] = None
    isolation: Optional[Text] = Field(None, max_length=32, description='"process", "gvisor" or "kubernetes" where '
                                      "the server enables it; default: the first GET /v1/info lists")
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


class Volume(BaseModel):
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


class Error(BaseModel):
    error: ErrorDetail


class Result(BaseModel):
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


class Logs(BaseModel):
    stdout: list[str] = []
    stderr: list[str] = []


class ExecutionError(BaseModel):
    name: str
    value: str
    traceback: str = ""
    limit: Optional[str] = None


class Usage(BaseModel):
    cpu_seconds: float = 0.0
    peak_memory: int = 0
    wall_seconds: float = 0.0


class Execution(BaseModel):
    results: list[Result] = []
    logs: Logs = Logs()
    error: Optional[ExecutionError] = None
    execution_count: Optional[int] = None
    usage: Usage = Usage()
    truncated: bool = False
    text: Optional[str] = Field(None, description="The main result's text/plain form")


class CommandResult(BaseModel):
    exit_code: Optional[int]
    stdout: str = ""
    stderr: str = ""
    error: Optional[str] = None
    usage: Usage = Usage()
    truncated: bool = False
    limit: Optional[str] = Field(None, description="the limit that ended the command: timeout, output or pids")


class BackgroundCommand(BaseModel):
    command_id: str
    pid: Optional[int] = None
    running: bool
    stdout: str = Field("", description="Output so far")
    stderr: str = ""
    result: Optional[CommandResult] = None


class RunningCommand(BaseModel):
    command_id: str = Field(..., description="for /commands/{command_id} (its output, stream, kill, stdin)")
    pid: int = Field(..., description="its pid inside the sandbox")
    cmd: str
    cwd: Optional[str] = Field(None, description="as asked (null: the sandbox's default directory)")
    started_at: datetime
    running: bool = Field(True, description="false: it ended (listed by ?pid=); its result is at /commands/{command_id}")


class FileEntry(BaseModel):
    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: float


class PathExists(BaseModel):
    exists: bool


class DirCreated(BaseModel):
    created: bool


class SandboxMetrics(BaseModel):
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


Amount = Union[int, float]  # as stored: a whole number stays one


class Limits(BaseModel):
    """A sandbox's limits in force: bytes for sizes, seconds for times, cores for cpu."""

    cpu: Optional[Amount] = None
    memory: Optional[Amount] = None
    pids: Optional[Amount] = None
    disk: Optional[Amount] = None
    inodes: Optional[Amount] = None
    open_files: Optional[Amount] = None
    timeout: Optional[Amount] = None
    idle_timeout: Optional[Amount] = None
    lifetime: Optional[Amount] = None
    output: Optional[Amount] = None


class Sandbox(BaseModel):
    sandbox_id: str
    template: str
    isolation: str = Field("process", description="the isolation tier it runs on: process, gvisor or kubernetes")
    status: Literal["running", "paused", "ended", "lost"] = Field(
        ..., description="paused: checkpointed to disk (the next call, or POST .../resume, wakes it); "
                         "lost: the server stopped (restart or crash) while it ran")
    metadata: dict[str, str]
    limits: Limits
    created_at: datetime
    expires_at: Optional[datetime] = None
    ended_at: Optional[datetime] = None
    end_reason: Optional[str] = None
    on_idle: Literal["kill", "pause"] = Field("kill", description="what its idle timeout does: kill or pause it")


class PauseInfo(BaseModel):
    sandbox_id: str
    status: Literal["running", "paused"]
    seconds: float = Field(..., description="how long the pause (checkpoint) or resume (restore) took")
    checkpoint_bytes: int = Field(0, description="size of the checkpoint on disk (pause)")


class Health(BaseModel):
    """Liveness only: no key is needed, so it says nothing of anyone's sandboxes (nor of the server's make-up)."""

    status: Literal["ok"] = "ok"


class Quotas(BaseModel):
    max_live: int
    max_lifetime: float
    requests_per_minute: int
    total_memory: int = Field(..., description="bytes: the most the memory limits of your live sandboxes may sum to")
    total_pids: int = Field(..., description="the most the pids limits of your live sandboxes may sum to")
    max_volumes: int = Field(..., description="named volumes you may keep")
    total_volume_size: int = Field(..., description="bytes: the most your volumes' sizes may sum to")
    max_paused_bytes: int = Field(..., description="bytes: the most your paused sandboxes' checkpoints may sum to")


class TenantUsage(BaseModel):
    live: int = Field(..., description="your live sandboxes (paused ones included), and creations in flight")
    memory: int = Field(..., description="bytes: the memory limits of your running sandboxes, summed")
    pids: int = Field(..., description="the pids limits of your running sandboxes, summed")
    paused_bytes: int = Field(0, description="bytes: the checkpoints of your paused sandboxes, summed")


class ServerInfo(BaseModel):
    version: str
    templates: list[str]
    isolations: list[str]
    defaults: Limits = Field(..., description="the limits a sandbox gets when it asks for none")
    ceilings: Limits = Field(..., description="the most you may ask for, per limit (over it: 400)")
    quotas: Quotas
    usage: TenantUsage
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


# -- errors -------------------------------------------------------------------------------------------
_ERROR_STATUSES = {
    400: "InvalidRequest (a bad argument, a limit over the server's ceiling), or FileError",
    401: "AuthError: no API key, or an unknown or revoked one",
    403: "AuthError: this key's role may not do this (a tenant's key on /metrics, an operator's on a sandbox)",
    404: "SandboxNotFound: no such sandbox (or command) of yours, or it ended; FileError for a missing path",
    410: "SandboxCrashed: the sandbox died (a limit killed it, or its agent broke)",
    413: "InvalidRequest: the body is over the server's limit (JSON bodies, or uploads)",
    422: "InvalidRequest: the body or a parameter does not match this schema",
    429: "QuotaExceeded: over a quota or the request rate (see Retry-After)",
}
ERRORS: dict = {code: {"model": Error, "description": text} for code, text in _ERROR_STATUSES.items()}


# -- NDJSON streams ---------------------------------------------------------------------------------------
class StdoutEvent(BaseModel):
    """Text the code or command printed to stdout (chunks, in order)."""

    type: Literal["stdout"]
    text: str


class StderrEvent(BaseModel):
    """Text printed to stderr."""

    type: Literal["stderr"]
    text: str


class ResultEvent(BaseModel):
    """A rich result (display(), the cell's last expression, a plot), as it is produced."""

    type: Literal["result"]
    result: Result


class ErrorEvent(BaseModel):
    """The code's own error (its traceback), or a limit that stopped it; the stream goes on to ``end``."""

    type: Literal["error"]
    error: ExecutionError


class PingEvent(BaseModel):
    """Keep-alive while nothing else happens; ignore it."""

    type: Literal["ping"]


class SandboxEnded(BaseModel):
    reason: Optional[str] = None
    limit: Optional[str] = None


class CodeEndEvent(Execution):
    """The last line: the same fields as the answer without ``stream``."""

    type: Literal["end"]
    sandbox_ended: Optional[SandboxEnded] = Field(None, description="set when the call ended the sandbox (a limit)")


class CommandEndEvent(CommandResult):
    """The last line: the same fields as the answer without ``stream``."""

    type: Literal["end"]


class ExceptionEvent(BaseModel):
    """The last line when the sandbox itself failed (instead of ``end``): the error body's ``error``."""

    type: Literal["exception"]
    error: ErrorDetail


CodeEvent = Annotated[Union[StdoutEvent, StderrEvent, ResultEvent, ErrorEvent, PingEvent, CodeEndEvent,
                            ExceptionEvent], Field(discriminator="type")]
CommandEvent = Annotated[Union[StdoutEvent, StderrEvent, PingEvent, CommandEndEvent, ExceptionEvent],
                         Field(discriminator="type")]


def _inline(schema: Any, defs: dict) -> Any:
    """``schema`` with every local ``$ref`` replaced by its definition: a self-contained schema."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref[len("#/$defs/"):]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k not in ("$defs", "discriminator")}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def event_schema(events: Any) -> dict:
    """The schema of one NDJSON line: one of the event kinds, told apart by ``type``. Inlined, because a
    route cannot add schemas to the document's components (FastAPI collects only its models)."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(events).json_schema(mode="serialization")
    return _inline(schema, schema.get("$defs", {}))


def with_event_components(document: dict) -> dict:
    """The OpenAPI ``document`` with the NDJSON event schemas (inlined by the routes: FastAPI collects only
    route models) named as components and referred to, and their nested models (Result, Usage...) referred
    to the components of the same name. For ``app.openapi``: a client generator then gets one class per event."""
    components = document.setdefault("components", {}).setdefault("schemas", {})

    def refer(node: Any, top: bool) -> Any:
        if isinstance(node, dict):
            title = node.get("title")
            if not top and isinstance(title, str) and node.get("type") == "object" and title in components:
                return {"$ref": f"#/components/schemas/{title}"}
            return {k: refer(v, False) for k, v in node.items()}
        if isinstance(node, list):
            return [refer(v, False) for v in node]
        return node

    for item in document.get("paths", {}).values():
        for operation in item.values():
            media = (operation.get("responses", {}).get("200", {}).get("content", {}).get(NDJSON)
                     if isinstance(operation, dict) else None)
            if not media or "oneOf" not in media.get("schema", {}):
                continue
            refs = []
            for event in media["schema"]["oneOf"]:
                if "$ref" in event:  # named already (the document went through here once): idempotent
                    refs.append(event)
                    continue
                name = event["title"]
                components.setdefault(name, refer(event, True))
                refs.append({"$ref": f"#/components/schemas/{name}"})
            mapping = {components[r["$ref"].rsplit("/", 1)[-1]]["properties"]["type"]["const"]: r["$ref"] for r in refs}
            media["schema"] = {"oneOf": refs, "discriminator": {"propertyName": "type", "mapping": mapping}}
    return document


NDJSON = "application/x-ndjson"
STREAM_DOC = (
    "Without `stream`, the JSON answer. With `stream: true`, NDJSON (application/x-ndjson): one event per "
    'line while the work runs: `{"type": "stdout"|"stderr", "text": ...}`, `{"type": "result", "result": {...}}` '
    '(code), `{"type": "error", "error": {...}}` (the code\'s own error), `{"type": "ping"}` (keep-alive), then '
    '`{"type": "end", ...}` with the same fields as the JSON answer, or `{"type": "exception", "error": {...}}` '
    "if the sandbox itself failed.")


def stream_responses(events: Any, description: str = STREAM_DOC) -> dict:
    """A streaming route's 200: its JSON answer (the route's response model) and its NDJSON events."""
    return {200: {"description": description, "content": {NDJSON: {"schema": event_schema(events)}}}}
