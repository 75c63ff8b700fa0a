"""What the store hands out (tenants, keys, sandbox rows, audit entries) and how keys are made and hashed.

API keys look like ``sl_<43 url-safe chars>``; only their SHA-256 is stored (a random 256-bit token
needs no slow hash: there is nothing to brute-force). Each key also has a short public id (``key_id``)
to list and revoke it by.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Mapping, Optional

KEY_PREFIX = "sl_"
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Operator keys hang off this tenant. Its name cannot be a tenant's (they start with a letter or digit), and
# an operator key is refused wherever a tenant acts (sandboxes, /mcp): it holds nothing and runs nothing.
OPERATOR_TENANT = "@operator"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    max_live: Optional[int] = None  # None: the server's default
    max_lifetime: Optional[float] = None
    requests_per_minute: Optional[int] = None
    total_memory: Optional[int] = None
    total_pids: Optional[int] = None
    max_volumes: Optional[int] = None
    total_volume_size: Optional[int] = None
    max_paused_bytes: Optional[int] = None
    key_id: Optional[str] = None  # the key this request authenticated with
    role: str = "tenant"  # the role of that key: "tenant", or "operator" (/metrics)


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant: str
    hint: str
    created_at: float
    last_used_at: Optional[float]
    revoked_at: Optional[float]
    role: str = "tenant"


@dataclasses.dataclass(frozen=True)
class SandboxRow:
    id: str
    tenant: str
    template: str
    status: str
    metadata: dict
    limits: dict
    created_at: float
    expires_at: Optional[float]
    ended_at: Optional[float]
    end_reason: Optional[str]
    isolation: str = "process"
    on_idle: str = "kill"
    checkpoint_bytes: int = 0  # while paused


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    at: float
    tenant: str
    key_id: Optional[str]
    action: str
    sandbox_id: Optional[str]
    detail: Optional[str]


@dataclasses.dataclass(frozen=True)
class RowCounts:
    """What a tenant's rows say it holds, whichever server process made them: sandboxes running or paused,
    the memory and pids limits of the running ones, and the checkpoints of the paused ones (bytes).
    One-shot runs have no row: they are not counted here."""

    live: int
    memory: int
    pids: int
    paused_bytes: int


def tenant_of(row: Mapping[str, Any]) -> Tenant:
    return Tenant(row["id"], row["name"], row["max_live"], row["max_lifetime"], row["requests_per_minute"],
                  row["total_memory"], row["total_pids"], row["max_volumes"], row["total_volume_size"],
                  row["max_paused_bytes"])


def sandbox_of(row: Mapping[str, Any]) -> SandboxRow:
    return SandboxRow(row["id"], row["tenant"], row["template"], row["status"], json.loads(row["metadata"]),
                      json.loads(row["limits"]), row["created_at"], row["expires_at"], row["ended_at"],
                      row["end_reason"], row["isolation"], row["on_idle"], row["checkpoint_bytes"])
