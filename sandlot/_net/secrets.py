"""Secrets that a sandbox can use and never read.

`Sandbox(secrets={"OPENAI_API_KEY": {"value": "sk-...", "hosts": ["api.openai.com"]}})`: the sandbox's
environment gets `OPENAI_API_KEY=SANDLOT_SECRET_<32 random hex>` (the placeholder, random per sandbox);
the host replaces the placeholder with the value in the HEADERS of HTTPS requests to the secret's hosts
(the interceptor: `sandlot._net.intercept.intercept`). Anything that cannot be substituted safely is
refused there, never forwarded.

This module is the validated description of a sandbox's secrets. Every message it produces names the
secret and the problem, never the value.
"""

from __future__ import annotations

import ipaddress
import re
import secrets as _random
from collections.abc import Mapping
from dataclasses import dataclass, field

from sandlot._exceptions import InvalidRequest

MAX_VALUE_BYTES = 64 * 1024
MAX_SECRETS = 64
MAX_HOSTS = 64
PLACEHOLDER_PREFIX = "SANDLOT_SECRET_"
PLACEHOLDER_LENGTH = len(PLACEHOLDER_PREFIX) + 32

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
# Characters that would let a value break out of its header (CR, LF) or that no header may carry (NUL and
# the other controls; TAB is legal in a field value, DEL is not).
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

HOST_FORMS = ('a secret\'s host is a DNS name ("api.openai.com") or "*." and a domain '
              '("*.example.com": its subdomains, not the domain itself); no port, IP address or "*"')


def normalize_host(name: str) -> str:
    """Lower case, no trailing dot: how names are compared everywhere (the policy does the same)."""
    return name.strip().rstrip(".").lower()


def host_matches(pattern: str, name: str) -> bool:
    """Does a host pattern ("api.example.com" or "*.example.com") cover `name` (normalized)?"""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def _parse_host(secret: str, raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidRequest(f"secret {secret!r}: each host must be a non-empty string; {HOST_FORMS}")
    text = raw
    host = normalize_host(raw)
    wildcard = host.startswith("*.")
    domain = host[2:] if wildcard else host
    try:
        ipaddress.ip_address(domain.strip("[]"))
        is_ip = True
    except ValueError:
        is_ip = False
    labels = domain.split(".")
    if wildcard and len(labels) < 2 and _LABEL.fullmatch(domain):
        raise InvalidRequest(f"secret {secret!r}: host {text!r} would send the secret to a whole top-level "
                             "domain; name the domain (\"*.example.com\")")
    if (is_ip or host == "*" or ":" in domain or "/" in domain or "*" in domain or len(domain) > 253
            or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit()
            or (wildcard and len(labels) < 2)):
        raise InvalidRequest(f"secret {secret!r}: host {text!r} is not accepted; {HOST_FORMS}")
    return host


@dataclass(frozen=True)
class Secret:
    """One secret. `repr` and `str` never show the value."""

    name: str
    value: str = field(repr=False)
    hosts: tuple[str, ...]
    placeholder: str

    def __str__(self) -> str:
        return f"secret {self.name} for {', '.join(self.hosts)}"

    @property
    def value_bytes(self) -> bytes:
        return self.value.encode("utf-8")

    def allows(self, name: str) -> bool:
        name = normalize_host(name)
        return any(host_matches(pattern, name) for pattern in self.hosts)


@dataclass(frozen=True)
class SecretSet:
    """A sandbox's secrets, each with its own random placeholder."""

    secrets: tuple[Secret, ...]

    def __post_init__(self) -> None:
        by_placeholder = {s.placeholder.encode(): s for s in self.secrets}
        object.__setattr__(self, "_by_placeholder", by_placeholder)
        # One regex finds every placeholder of this set in a header, URL or body chunk.
        object.__setattr__(self, "_pattern", re.compile(b"|".join(re.escape(p) for p in by_placeholder)))
        # Header names arrive lower-cased (h11 normalizes them): they are searched without case.
        object.__setattr__(self, "_pattern_nocase", re.compile(self._pattern.pattern, re.IGNORECASE))

    @classmethod
    def build(cls, value: object) -> SecretSet | None:
        """Validate the `secrets=` argument; None or {} → None (no secrets: no CA, no interception).

        Form: {"NAME": {"value": "...", "hosts": ["api.openai.com", "*.example.com"]}, ...}. A bad entry
        raises InvalidRequest naming the secret and the rule it breaks, never quoting the value.
        """
        if value is None or isinstance(value, SecretSet):
            return value  # already built: the same placeholders (they are per sandbox, made once)
        if not isinstance(value, Mapping):
            raise InvalidRequest('secrets must be a mapping {"NAME": {"value": "...", "hosts": ["host", ...]}}')
        if not value:
            return None
        if len(value) > MAX_SECRETS:
            raise InvalidRequest(f"at most {MAX_SECRETS} secrets per sandbox ({len(value)} given)")
        built = []
        for name, spec in value.items():
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                shown = name if isinstance(name, str) and len(name) <= 80 else type(name).__name__
                raise InvalidRequest(f"secret name {shown!r} is not a valid environment variable name "
                                     "(letters, digits and _, not starting with a digit, at most 128)")
            if not isinstance(spec, Mapping):
                raise InvalidRequest(f'secret {name!r} must be a mapping {{"value": "...", "hosts": [...]}}')
            unknown = sorted(str(k) for k in spec if k not in ("value", "hosts"))
            if unknown:
                raise InvalidRequest(f"secret {name!r}: unknown field(s) {', '.join(unknown)} "
                                     "(accepted: value, hosts)")
            secret_value = spec.get("value")
            if not isinstance(secret_value, str) or not secret_value:
                raise InvalidRequest(f"secret {name!r}: value must be a non-empty string")
            if len(secret_value.encode("utf-8", "surrogatepass")) > MAX_VALUE_BYTES:
                raise InvalidRequest(f"secret {name!r}: value is longer than {MAX_VALUE_BYTES} bytes")
            if _FORBIDDEN_IN_VALUE.search(secret_value):
                raise InvalidRequest(f"secret {name!r}: value contains a control character (CR, LF, NUL...) "
                                     "that no HTTP header may carry")
            if secret_value != secret_value.strip(" \t"):
                raise InvalidRequest(f"secret {name!r}: value starts or ends with whitespace (a copy-paste "
                                     "slip? HTTP strips it from header values)")
            try:
                secret_value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"secret {name!r}: value is not valid Unicode text") from None
            if secret_value.startswith(PLACEHOLDER_PREFIX):
                raise InvalidRequest(f"secret {name!r}: value looks like a Sandlot placeholder; pass the real "
                                     "value on the host")
            hosts = spec.get("hosts")
            if isinstance(hosts, str) or not isinstance(hosts, (list, tuple)) or not hosts:
                raise InvalidRequest(f"secret {name!r}: hosts must be a non-empty list; {HOST_FORMS}")
            if len(hosts) > MAX_HOSTS:
                raise InvalidRequest(f"secret {name!r}: at most {MAX_HOSTS} hosts")
            parsed = tuple(dict.fromkeys(_parse_host(name, h) for h in hosts))
            built.append(Secret(name=name, value=secret_value, hosts=parsed,
                                placeholder=PLACEHOLDER_PREFIX + _random.token_hex(16)))
        return cls(tuple(built))

    def __repr__(self) -> str:
        return f"SecretSet({', '.join(str(s) for s in self.secrets)})"

    def __len__(self) -> int:
        return len(self.secrets)

    def placeholders(self) -> dict[str, str]:
        """The environment the sandbox gets: NAME → its placeholder (never the value)."""
        return {s.name: s.placeholder for s in self.secrets}

    def to_json(self) -> dict[str, dict[str, list[str]]]:
        """What may be shown about the secrets (info, API responses): names and hosts, no value."""
        return {s.name: {"hosts": list(s.hosts)} for s in self.secrets}

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host pattern of every secret (for the CA's name constraints)."""
        return tuple(dict.fromkeys(h for s in self.secrets for h in s.hosts))

    def for_host(self, name: str) -> tuple[Secret, ...]:
        """The secrets whose value may be sent to `name`."""
        return tuple(s for s in self.secrets if s.allows(name))

    def covers(self, name: str) -> bool:
        """Must connections to `name` be intercepted (some secret may go there)?"""
        return any(s.allows(name) for s in self.secrets)

    # -- used by the interceptor ---------------------------------------------------------------------------

    def find(self, data: bytes) -> list[Secret]:
        """The secrets whose placeholder occurs in `data` (each once, in order of first occurrence)."""
        found: dict[str, Secret] = {}
        for match in self._pattern.finditer(data):  # type: ignore[attr-defined]
            secret = self._by_placeholder[match.group()]  # type: ignore[attr-defined]
            found.setdefault(secret.name, secret)
        return list(found.values())

    def contains_placeholder(self, data: bytes, *, ignore_case: bool = False) -> bool:
        pattern = self._pattern_nocase if ignore_case else self._pattern  # type: ignore[attr-defined]
        return pattern.search(data) is not None

    def substitute(self, data: bytes, allowed: tuple[Secret, ...]) -> bytes:
        """`data` with the placeholders of `allowed` secrets replaced by their values."""
        for secret in allowed:
            data = data.replace(secret.placeholder.encode(), secret.value_bytes)
        return data

    def redact(self, data: bytes) -> bytes:
        """`data` with every secret value replaced by its placeholder (response headers echoing a value)."""
        for secret in self.secrets:
            value = secret.value_bytes
            if value in data:
                data = data.replace(value, secret.placeholder.encode())
        return data

