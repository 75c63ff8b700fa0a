"""SandboxSpec: what a sandbox is, validated once, as plain data that travels as JSON.

Every way to create a sandbox (the SDK, local or remote; the server's schema; the CLI and MCP, through the
SDK) builds one ``SandboxSpec`` with :meth:`SandboxSpec.build`, so one function validates an environment
(:func:`check_env`), one the metadata (:func:`check_metadata`), one the limits (:meth:`Limits.build`) and
one the size of a create (:func:`check_create_input`): the rules cannot drift between the places.

It imports nothing of Sandlot above it (only ``_limits`` and ``_exceptions``): whether a tier exists or
can pause, and which templates there are, is for the layers that know the backends to check.

Each capability a sandbox can be granted is a frozen field with its own validator, rendered by
``to_json``: a network policy and secrets (``_net``), host directories and volumes (``_storage.mounts``).
"""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any, Mapping, Optional, Union

from ._exceptions import InvalidRequest
from ._limits import MAX_CREATE_INPUT, Limits
from ._net.policy import NetworkPolicy
from ._net.secrets import SecretSet
from ._storage.mounts import mounts_to_json, parse_mounts

MAX_ENV_VARS = 256
MAX_ENV_NAME = 256
MAX_METADATA = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1024
MAX_TEMPLATE_NAME = 256
MAX_ISOLATION_NAME = 32
ON_IDLE = ("kill", "pause")


def _utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what}: not valid UTF-8 (lone surrogates cannot enter a process)") from None


def check_env(env: "Mapping[str, str] | None") -> dict:
    """The one validator of an environment (a sandbox's, or one command's): names and values that a
    process environment can hold. Their size is bounded with the metadata's, by check_create_input
    (a create), or by the size of a request (one command)."""
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidRequest("env must map strings to strings")
    if len(env) > MAX_ENV_VARS:
        raise InvalidRequest(f"env: at most {MAX_ENV_VARS} environment variables")
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest("env must map strings to strings")
        if not key or "=" in key or "\0" in key or len(key) > MAX_ENV_NAME:
            raise InvalidRequest(f"env name {key[:64]!r} is not a valid name (empty, longer than {MAX_ENV_NAME} "
                                 "characters, or has '=' or NUL)")
        if "\0" in value:
            raise InvalidRequest(f"env {key[:64]!r}: the value has NUL")
        _utf8(key, f"env {key[:64]!r}")
        _utf8(value, f"env {key[:64]!r}")
    return dict(env)


def check_metadata(metadata: "Mapping[str, str] | None") -> dict:
    """The one validator of metadata: the owner's tags, kept by a server and filtered on."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidRequest("metadata must map strings to strings")
    if len(metadata) > MAX_METADATA:
        raise InvalidRequest(f"at most {MAX_METADATA} metadata entries")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest("metadata must map strings to strings")
        if not 0 < len(key) <= MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE or "\0" in key + value:
            raise InvalidRequest(f"metadata keys are 1-{MAX_METADATA_KEY} characters, values at most "
                                 f"{MAX_METADATA_VALUE}, without NUL")
        _utf8(key + value, f"metadata {key[:64]!r}")
    return dict(metadata)


def check_create_input(env: "Mapping[str, str] | None", metadata: "Mapping[str, Any] | None" = None) -> None:
    """Refuse a create whose environment and metadata together exceed MAX_CREATE_INPUT (in bytes of JSON,
    as they travel and are stored), before anything is sent or claimed."""
    size = len(json.dumps({"env": dict(env or {}), "metadata": dict(metadata or {})}, separators=(",", ":"),
                          default=str))
    if size > MAX_CREATE_INPUT:
        raise InvalidRequest(f"create input too large: env and metadata take {size} bytes as JSON, "
                             f"at most {MAX_CREATE_INPUT}")


def _name(value: Any, what: str, longest: int) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string")
    if not value or len(value) > longest or "\0" in value:
        raise InvalidRequest(f"{what} must be 1-{longest} characters without NUL")
    _utf8(value, what)
    return value


_FIELDS = ("template", "isolation", "limits", "env", "metadata", "timeout", "on_idle", "network", "secrets", "mounts")


@dataclasses.dataclass(frozen=True)
class SandboxSpec:
    """One sandbox, as asked for: frozen, validated once by :meth:`build`, JSON by :meth:`to_json`.

    ``limits`` holds every limit (the owner's overrides on the defaults, ``timeout`` folded into
    ``lifetime``); ``asked`` names the limits the owner set, so that the JSON carries the request and a
    server applies its own defaults and ceilings to the rest. ``isolation`` None means the host's default
    tier. ``env`` and ``metadata`` are read-only mappings.
    """

    template: str = "python"
    isolation: Optional[str] = None
    limits: Limits = Limits()
    env: Mapping[str, str] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    metadata: Mapping[str, str] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    timeout: Optional[float] = None
    on_idle: str = "kill"
    asked: frozenset = frozenset()
    network: Optional[NetworkPolicy] = None  # None: no network at all (the default)
    secrets: Optional[SecretSet] = None  # values the host substitutes on the way out; never in the sandbox
    mounts: tuple = ()  # _storage.mounts.Mount grants, sorted by target; none by default

    def __repr__(self) -> str:  # the generated one would be long; secrets already hide their values
        return (f"SandboxSpec(template={self.template!r}, isolation={self.isolation!r}, "
                f"network={self.network.to_json() if self.network else None!r}, secrets={self.secrets!r}, "
                f"mounts={mounts_to_json(self.mounts)!r})")

    @classmethod
    def build(cls, template: str = "python", *, isolation: Optional[str] = None,
              limits: Union[Limits, Mapping[str, Any], None] = None, env: Optional[Mapping[str, str]] = None,
              metadata: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None,
              on_idle: str = "kill", base: Optional[Limits] = None, network: Any = None,
              secrets: Any = None, mounts: Any = None) -> "SandboxSpec":
        """Validate everything once; InvalidRequest says what is wrong. ``base``: default limits (an image
        template's sandbox.yaml) that the owner's ``limits`` override."""
        template = _name(template, "template", MAX_TEMPLATE_NAME)
        if isolation is not None:
            isolation = _name(isolation, "isolation", MAX_ISOLATION_NAME)
        if on_idle not in ON_IDLE:
            raise InvalidRequest("on_idle is 'kill' or 'pause'")
        built = Limits.build(limits, base=base)
        if isinstance(limits, Limits):
            asked = {f.name for f in dataclasses.fields(Limits)}
        else:
            asked = {name for name, value in (limits or {}).items() if value is not None}
        if timeout is not None:
            built = Limits.build({"lifetime": timeout}, base=built)
            timeout = built.lifetime
            asked.add("lifetime")
        env = check_env(env)
        metadata = check_metadata(metadata)
        check_create_input(env, metadata)
        policy = network if isinstance(network, NetworkPolicy) else NetworkPolicy.build(network)
        secret_set = SecretSet.build(secrets)
        if secret_set is not None:
            clash = sorted(set(secret_set.placeholders()) & set(env))
            if clash:
                raise InvalidRequest(f"{clash[0]} is both a secret and an env variable: give it once")
        granted = mounts if isinstance(mounts, tuple) else parse_mounts(mounts)
        return cls(template=template, isolation=isolation, limits=built, env=types.MappingProxyType(env),
                   metadata=types.MappingProxyType(metadata), timeout=timeout, on_idle=on_idle,
                   asked=frozenset(asked), network=policy, secrets=secret_set, mounts=granted)

    def to_json(self) -> dict:
        """The spec as JSON-ready data (the remote SDK's create body): fields at their default are left
        out, limits only as asked (``timeout`` carries the lifetime when it was given)."""
        out: dict[str, Any] = {"template": self.template}
        limits = {name: getattr(self.limits, name) for name in sorted(self.asked)
                  if not (name == "lifetime" and self.timeout is not None)}
        for key, value in (("isolation", self.isolation), ("timeout", self.timeout), ("limits", limits),
                           ("env", dict(self.env)), ("metadata", dict(self.metadata))):
            if value:
                out[key] = value
        if self.on_idle != "kill":
            out["on_idle"] = self.on_idle
        if self.network is not None:
            out["network"] = self.network.to_json()
        if self.secrets is not None:  # the values travel to the server that will substitute them
            out["secrets"] = {s.name: {"value": s.value, "hosts": list(s.hosts)} for s in self.secrets.secrets}
        if self.mounts:
            out["mounts"] = mounts_to_json(self.mounts)
        return out

    @classmethod
    def from_json(cls, data: Union[str, bytes, Mapping[str, Any]], base: Optional[Limits] = None) -> "SandboxSpec":
        """The inverse of :meth:`to_json` (a mapping or JSON text), validated as :meth:`build` does."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise InvalidRequest(f"a sandbox spec must be JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise InvalidRequest("a sandbox spec must be a JSON object")
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown sandbox spec field(s) {sorted(unknown)}; known: {list(_FIELDS)}")
        return cls.build(data.get("template", "python"), isolation=data.get("isolation"),
                         limits=data.get("limits"), env=data.get("env"), metadata=data.get("metadata"),
                         timeout=data.get("timeout"), on_idle=data.get("on_idle", "kill"), base=base,
                         network=data.get("network"), secrets=data.get("secrets"), mounts=data.get("mounts"))
