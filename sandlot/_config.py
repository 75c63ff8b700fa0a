"""Configuration from the environment: every ``SANDLOT_*`` variable, listed and read in this one place.

Read when asked, never cached at import: a test (or an embedding program) that sets a variable sees it
take effect at the next sandbox. The README's "Configuration" table lists the same variables; a test
keeps the two in step and checks that no other module reads ``SANDLOT_*`` from the environment itself.
Command-line options that fall back to a variable (``sandlot serve --ceiling`` and friends) name it here too.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Variable:
    name: str
    meaning: str
    default: str


VARIABLES: tuple[Variable, ...] = (
    # -- where sandboxes come from ---------------------------------------------------------------------
    Variable("SANDLOT_API_URL", "use the Sandlot server at this URL instead of local sandboxes", "unset: local"),
    Variable("SANDLOT_API_KEY", "the API key sent to that server", "unset"),
    Variable("SANDLOT_ISOLATION", "the isolation tier of sandboxes that do not name one: process, gvisor or kubernetes",
             "process"),
    # -- the fast path -----------------------------------------------------------------------------------
    Variable("SANDLOT_POOL_MIN", "warm sandboxes kept ready per template (0 turns pooling off)", "2"),
    Variable("SANDLOT_POOL_MAX", "the most warm sandboxes kept per pool (a template and its lean variant have one each); bursts grow all pools together by at most this many", "64"),
    Variable("SANDLOT_ZYGOTE", "0 boots every sandbox by exec instead of forking a preloaded zygote", "1"),
    Variable("SANDLOT_KSM", "1 lets the kernel merge identical memory pages of sandboxes (KSM: less memory per idle "
             "session; across tenants, see its side channel) and turns ksmd on with a bounded scan rate if it is off",
             "unset: off"),
    # -- where state lives -------------------------------------------------------------------------------
    Variable("SANDLOT_DATA_DIR", "durable state: templates, images, the server's database, checkpoints",
             "/var/lib/sandlot as root, else ~/.local/share/sandlot"),
    Variable("SANDLOT_STATE_DIR", "runtime state (mountpoints, sockets); never visible inside a sandbox",
             "/run/sandlot as root, else $XDG_RUNTIME_DIR/sandlot-UID"),
    Variable("SANDLOT_DB", "the server's database: a SQLite file, or a postgresql://USER@HOST:PORT/DB URL that "
             "several servers (replicas) share", "$SANDLOT_DATA_DIR/sandlot.db"),
    # -- the gVisor tier ---------------------------------------------------------------------------------
    Variable("SANDLOT_RUNSC", "the runsc binary", "runsc on PATH, else /usr/bin/runsc"),
    Variable("SANDLOT_GVISOR_PLATFORM", "runsc's platform: ptrace, systrap or kvm (where /dev/kvm really works)",
             "ptrace"),
    # -- the kubernetes tier ------------------------------------------------------------------------------
    Variable("SANDLOT_KUBE_NAMESPACE", "the namespace of the kubernetes tier's claims and warm pools",
             "the server's own namespace in a cluster, else the kubeconfig context's, else 'sandlot'"),
    Variable("SANDLOT_KUBE_AGENT_PORT", "the port a Sandlot pod's holder listens on (the pod template's)", "8888"),
    Variable("SANDLOT_KUBE_CLAIM_TIMEOUT", "seconds a kubernetes sandbox may take from claim to a ready pod", "120"),
    # -- the network -------------------------------------------------------------------------------------
    Variable("SANDLOT_UPSTREAM_DNS", "the resolver (IP[:port]) sandboxes' allowed names are resolved with",
             "the first nameserver of /etc/resolv.conf"),
    # -- the server (options of `sandlot serve` that fall back to these) ---------------------------------
    Variable("SANDLOT_CEILINGS", "`serve --ceiling`: the most any tenant may ask for, e.g. 'memory=4G cpu=2'",
             "none"),
    Variable("SANDLOT_TOTAL_MEMORY", "`serve --total-memory`: the memory limits one tenant may hold in all",
             "this host's RAM"),
    Variable("SANDLOT_TOTAL_PIDS", "`serve --total-pids`: the process limits one tenant may hold in all",
             "pid_max/2"),
    Variable("SANDLOT_MAX_VOLUMES", "`serve --max-volumes`: the most volumes one tenant may hold", "20"),
    Variable("SANDLOT_TOTAL_VOLUME_SIZE", "`serve --total-volume-size`: the summed volume sizes one tenant may hold",
             "50G"),
    Variable("SANDLOT_MAX_PAUSED_BYTES", "`serve --max-paused-bytes`: the summed checkpoints of one tenant's "
             "paused sandboxes", "20G"),
    Variable("SANDLOT_AUDIT_RETENTION", "`serve --audit-retention`: how long audit rows are kept", "90d"),
    Variable("SANDLOT_AUDIT_MAX_ROWS", "`serve --audit-max-rows`: the most audit rows kept", "1000000"),
    # -- debugging ---------------------------------------------------------------------------------------
    Variable("SANDLOT_BOOT_LOG", "append the boot and agent errors of sandboxes to this file", "unset: dropped"),
    Variable("SANDLOT_REQUIRE_SANDBOX", "tests only: fail instead of skipping when this host cannot run sandboxes",
             "unset"),
)
NAMES = frozenset(v.name for v in VARIABLES)


def get(name: str) -> Optional[str]:
    """The variable's value, or None when unset or empty. Only listed variables may be read."""
    if name not in NAMES:
        raise KeyError(f"{name} is not a listed Sandlot variable (add it to _config.VARIABLES and the README)")
    return os.environ.get(name) or None


def is_set(name: str) -> bool:
    return get(name) is not None


def isolation() -> Optional[str]:
    return get("SANDLOT_ISOLATION")


def api_url() -> Optional[str]:
    return get("SANDLOT_API_URL")


def api_key() -> Optional[str]:
    return get("SANDLOT_API_KEY")


def _count(name: str, default: int) -> int:
    raw = get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        from ._exceptions import InvalidRequest

        raise InvalidRequest(f"{name} must be a whole number, got {raw!r}") from None


def pool_min() -> int:
    return _count("SANDLOT_POOL_MIN", 2)


def pool_max() -> int:
    return _count("SANDLOT_POOL_MAX", 64)


def use_zygote() -> bool:
    return get("SANDLOT_ZYGOTE") != "0"


def ksm() -> bool:
    """SANDLOT_KSM: sandboxes' memory may be merged by the kernel (opt-in: a host-wide setting, see _host/ksm.py)."""
    raw = get("SANDLOT_KSM")
    if raw is None or raw in ("0", "off", "no", "false"):
        return False
    if raw in ("1", "on", "yes", "true"):
        return True
    from ._exceptions import InvalidRequest

    raise InvalidRequest(f"SANDLOT_KSM must be 1 or 0, got {raw!r}")


def ask_ksm() -> None:
    """`sandlot serve --ksm`: as SANDLOT_KSM=1 for every sandbox this process starts from now on."""
    os.environ["SANDLOT_KSM"] = "1"


def boot_log() -> Optional[str]:
    return get("SANDLOT_BOOT_LOG")


def runsc() -> Optional[str]:
    return get("SANDLOT_RUNSC")


def gvisor_platform() -> str:
    return get("SANDLOT_GVISOR_PLATFORM") or "ptrace"


def upstream_dns() -> Optional[str]:
    return get("SANDLOT_UPSTREAM_DNS")


def data_dir() -> Path:
    """Durable state: $SANDLOT_DATA_DIR, else /var/lib/sandlot as root, else ~/.local/share/sandlot."""
    explicit = get("SANDLOT_DATA_DIR")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/lib/sandlot")
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "sandlot"


def state_dir() -> Path:
    """Runtime state (not created here): $SANDLOT_STATE_DIR, /run/sandlot as root, else per user."""
    explicit = get("SANDLOT_STATE_DIR")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/run/sandlot")
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / ("sandlot-%d" % os.getuid())


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_db_url(db: "str | os.PathLike[str] | None") -> bool:
    """Whether a database is named by a URL (``postgresql://...``) rather than by a SQLite file's path."""
    return isinstance(db, str) and _URL.match(db) is not None


def db_location(db: "str | os.PathLike[str]") -> "Path | str":
    """A database as given (``--db``, ``SANDLOT_DB``): a URL stays a string (a Path would fold its ``//``),
    anything else is a SQLite file's path."""
    return db if is_db_url(db) else Path(db)


def db_path() -> "Path | str":
    """The server's database: $SANDLOT_DB (a path, or a postgresql:// URL), else sandlot.db in the data directory."""
    explicit = get("SANDLOT_DB")
    return db_location(explicit) if explicit else data_dir() / "sandlot.db"


def kube_namespace(context_namespace: Optional[str] = None) -> str:
    """The kubernetes tier's namespace: $SANDLOT_KUBE_NAMESPACE, else ours inside a cluster (the service
    account's), else the kubeconfig context's, else "sandlot" (what `sandlot kube manifests` makes)."""
    name = get("SANDLOT_KUBE_NAMESPACE")
    if name:
        return name
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "sandlot"
    except OSError:
        return context_namespace or "sandlot"


def kube_agent_port() -> int:
    return _count("SANDLOT_KUBE_AGENT_PORT", 8888)


def kube_claim_timeout() -> float:
    return float(_count("SANDLOT_KUBE_CLAIM_TIMEOUT", 120))
