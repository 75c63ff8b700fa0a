"""Where sandboxes come from: this machine, or a Sandlot server (--api-url / SANDLOT_API_URL).

The SDK gives one API for both (``Sandbox(api_url=..., api_key=...)``), so commands only ever see
a ``Sandbox``; this module is the one place that knows which kind it asked for.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, TypeVar

import click

from .._spec import SandboxSpec
from .._sync import Sandbox
from ._common import fail_usage, spinner

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Target:
    api_url: Optional[str] = None
    api_key: Optional[str] = None

    @property
    def remote(self) -> bool:
        return bool(self.api_url)

    def credentials(self) -> dict[str, Optional[str]]:
        """SDK arguments: ``api_url=""`` pins a local sandbox (the SDK would otherwise read the env again)."""
        return {"api_url": self.api_url or "", "api_key": self.api_key}

    def require_server(self, command: str) -> None:
        if not self.remote:
            fail_usage(f"`sandlot {command}` works on a Sandlot server's sandboxes: pass --api-url URL "
                       "(and --api-key) or set SANDLOT_API_URL / SANDLOT_API_KEY. Start a server with `sandlot serve`.")


def _api_options(f: F, url_help: str) -> F:
    f = click.option("--api-key", envvar="SANDLOT_API_KEY", metavar="KEY", show_envvar=True,
                     help="API key for the server.")(f)
    f = click.option("--api-url", envvar="SANDLOT_API_URL", metavar="URL", show_envvar=True, help=url_help)(f)
    return f


def target_options(f: F) -> F:
    """--api-url / --api-key, read from SANDLOT_API_URL / SANDLOT_API_KEY when not given."""
    return _api_options(f, "Sandlot server to use; without it sandboxes run on this machine.")


def api_options(url_help: str) -> Callable[[F], F]:
    """--api-url / --api-key with a command's own words for what --api-url changes."""
    return lambda f: _api_options(f, url_help)


def server_options(f: F) -> F:
    """--api-url / --api-key of a command that works only on a server's sandboxes (ls, kill, exec, cp)."""
    return _api_options(f, "Sandlot server whose sandboxes this works on (required: these commands have no "
                           "local form; start one with `sandlot serve`).")


def network_options(f: F) -> F:
    """--network / --allow / --deny / --secret of a new sandbox (none of them: no network, the default)."""
    f = click.option("--secret", "secrets", multiple=True, metavar="NAME=VALUE@HOST[,HOST]",
                     help="A secret for HTTPS requests to HOST: the sandbox's $NAME is a placeholder the host "
                          "replaces with VALUE in request headers to HOST only (repeatable; grants HOST:443).")(f)
    f = click.option("--deny", "deny", multiple=True, metavar="RULE", help="Refuse this host, IP or CIDR "
                     "(optional :port); deny wins (repeatable).")(f)
    f = click.option("--allow", "allow", multiple=True, metavar="RULE", help="Grant this host (pypi.org, "
                     "*.pythonhosted.org), IP or CIDR, optionally :port or :lo-hi (repeatable).")(f)
    f = click.option("--network", "network", type=click.Choice(["none", "public"]), default=None,
                     help="none (the default: no network) or public (the internet, never private ranges or the "
                          "host); --allow/--deny refine it.")(f)
    return f


def network_of(network: Optional[str], allow: tuple[str, ...], deny: tuple[str, ...]) -> Any:
    """The SDK's ``network=`` for these flags (validated by the spec, like every other argument)."""
    if network == "none" and (allow or deny):
        fail_usage("--network none cannot be combined with --allow/--deny")
    if network is None and not allow and not deny:
        return None
    rules = ["*"] if network == "public" else []
    return {"allow": rules + list(allow), "deny": list(deny)} if (allow or deny or rules) else None


def secrets_of(pairs: tuple[str, ...]) -> Optional[dict[str, Any]]:
    """``NAME=VALUE@host1,host2`` -> the SDK's ``secrets=`` (the value may hold '='; the last '@' splits)."""
    found: dict[str, Any] = {}
    for pair in pairs:
        name, sep, rest = pair.partition("=")
        value, at, hosts = rest.rpartition("@")
        if not sep or not name or not at or not value or not hosts:
            fail_usage(f"--secret must look like NAME=VALUE@HOST[,HOST], got {name or pair[:20]!r}...")
        found[name] = {"value": value, "hosts": [h for h in hosts.split(",") if h]}
    return found or None


def make_target(api_url: Optional[str], api_key: Optional[str]) -> Target:
    return Target(api_url or None, api_key or None)


def _tune_for_one_sandbox(template: str) -> None:
    """A CLI process creates one sandbox and exits: neither a zygote nor a warm pool can pay off.

    A zygote preloads the whole data-science stack (about 3 s) to make *later* forks instant, and
    a pool boots spare sandboxes nobody will claim; a direct exec starts in about 0.3 s and imports
    only what the code uses. Explicit settings in the environment still win.
    """
    from .. import _config
    from .._engine import default_engine

    engine = default_engine()
    if not _config.is_set("SANDLOT_ZYGOTE"):
        engine.set_zygote(False)
    if not _config.is_set("SANDLOT_POOL_MIN"):
        engine.pools.configure(template, min_ready=0)


def create_sandbox(target: Target, template: str = "python", *, limits: Any = None, env: Any = None,
                   metadata: Any = None, timeout: Optional[float] = None, quiet: bool = False,
                   network: Any = None, secrets: Any = None, mounts: Any = None) -> Sandbox:
    """A new sandbox, local or on the server; a spinner shows while it starts. --limit / --env / --metadata
    (and the network flags) are validated once, into a SandboxSpec, before anything starts (a bad one is
    a usage error). ``mounts``: the -v flags, as the SDK's mounts=."""
    spec = SandboxSpec.build(template, limits=limits, env=env, metadata=metadata, timeout=timeout,
                             network=network, secrets=secrets, mounts=mounts)
    if not target.remote:
        _tune_for_one_sandbox(template)
    where = f" on {target.api_url}" if target.remote else ""
    with spinner(f"Starting a {template} sandbox{where}…", enabled=not quiet):
        return Sandbox(**spec.to_json(), **target.credentials())  # the spec's JSON names the SDK's arguments


def connect_sandbox(target: Target, sandbox_id: str, command: str, *, quiet: bool = False) -> Sandbox:
    """Attach to a live sandbox on the server (only servers keep sandboxes between commands)."""
    target.require_server(command)
    with spinner(f"Connecting to {sandbox_id}…", enabled=not quiet):
        return Sandbox.connect(sandbox_id, **target.credentials())


def list_sandboxes(target: Target, metadata: Optional[dict[str, str]] = None, status: str = "running") -> list[Any]:
    target.require_server("ls")
    return list(Sandbox.list(metadata or None, status=status, **target.credentials()))


def interrupt(sandbox: Sandbox) -> bool:
    """Interrupt the code running in ``sandbox`` (a KeyboardInterrupt in the session). False if not possible.

    The SDK has no public ``interrupt()`` yet (it interrupts only at a call's timeout), so for a
    local sandbox this sends the engine's own interrupt frame on the sandbox's channel, which is
    exactly what the timeout path sends. Prefer the public method as soon as the SDK grows one.
    """
    method = getattr(sandbox, "interrupt", None)
    if callable(method):
        method()
        return True
    proc = getattr(getattr(sandbox, "_async", None), "_proc", None)
    channel = getattr(proc, "channel", None)
    if channel is None or not getattr(channel, "is_open", False):
        return False
    from .._sync import run_sync

    # The agent interrupts whatever cell is current; the request id is not looked at.
    run_sync(channel.send({"t": "interrupt", "id": 0}))
    return True
