"""`sandlot serve`, `sandlot keys` and `sandlot mcp`: running and administering the service.

The server package (FastAPI, uvicorn) is imported only when these commands run, so `sandlot run`
and `sandlot shell` start fast. `keys` opens the server's database directly (no HTTP): run it on the
server's machine, as the user the server runs as (or, for a PostgreSQL database, anywhere that reaches it).
"""

from __future__ import annotations

import datetime
import shutil
import sys
from typing import Any, Callable, Optional

import click
from rich.markup import escape
from rich.table import Table

from ._common import EXIT_SANDLOT, err, json_option, out, print_json, to_jsonable
from ._target import make_target, target_options

_DB_HELP = ("The server's database (tenants, keys, sandboxes, audit log): a SQLite file, or a "
            "postgresql://USER@HOST:PORT/DB URL that several servers (replicas) share.")


def db_option(f: Callable[..., Any]) -> Callable[..., Any]:
    from .._config import data_dir  # light: no server import to print help

    # The path itself, as it is found without SANDLOT_DB (which the help names too).
    return click.option("--db", "db_path", envvar="SANDLOT_DB", metavar="PATH|URL", show_envvar=True,
                        help=f"{_DB_HELP} [default: {data_dir() / 'sandlot.db'}]")(f)


def _when(epoch: Optional[float]) -> str:
    return "" if epoch is None else datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


@click.command(short_help="Run the HTTP server (REST, /mcp, /metrics, /docs).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback by default: put a TLS proxy in front to serve a network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@db_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--no-mcp", is_flag=True, help="Do not serve MCP (streamable HTTP) at /mcp.")
@click.option("--isolations", default="process", show_default=True, metavar="TIERS",
              help="The isolation tiers tenants may ask for, comma-separated: process, gvisor (needs runsc; "
                   "`sandlot doctor` checks), e.g. --isolations process,gvisor. A sandbox asks with "
                   "isolation='gvisor'; a tier not listed is refused (400).")
@click.option("--ceiling", "ceilings", multiple=True, metavar="LIMIT=VALUE", envvar="SANDLOT_CEILINGS",
              show_envvar=True,
              help="The most a tenant may ask for of one limit (cpu, memory, pids, disk, inodes, open_files, "
                   "timeout, idle_timeout, lifetime, output), e.g. --ceiling memory=8G; repeat for more "
                   "(the variable: space-separated). Over it: 400. Default: from this host (cores, half the RAM, "
                   "pid_max/8, ...; a tenant's key sees them at GET /v1/info).")
@click.option("--total-memory", metavar="SIZE", envvar="SANDLOT_TOTAL_MEMORY", show_envvar=True,
              help="Per tenant: the most the memory limits of its running sandboxes may sum to (e.g. 64G). "
                   "Over it: 429. [default: this host's RAM]")
@click.option("--total-pids", type=click.IntRange(1), metavar="N", envvar="SANDLOT_TOTAL_PIDS", show_envvar=True,
              help="Per tenant: the most the pids limits of its running sandboxes may sum to. [default: pid_max/2]")
@click.option("--audit-retention", metavar="DURATION", envvar="SANDLOT_AUDIT_RETENTION", show_envvar=True,
              help="Keep audit-log rows this long (90d, 12h, 30m, 45s); the reaper prunes older ones. [default: 90d]")
@click.option("--audit-max-rows", type=click.IntRange(1), metavar="N", envvar="SANDLOT_AUDIT_MAX_ROWS",
              show_envvar=True, help="Keep at most the newest N audit-log rows. [default: 1000000]")
@click.option("--allow-network", is_flag=True,
              help="Let tenants give their sandboxes a network (egress by their own allow/deny rules, never the "
                   "host or private ranges) and secrets. Off by default: sandboxes have no network.")
@click.option("--network-allow", "network_ceiling", multiple=True, metavar="RULE",
              help="With --allow-network: the rules tenants' allow rules must lie within, e.g. --network-allow "
                   "pypi.org --network-allow '*.pythonhosted.org' --network-allow '*:443' (repeatable; implies "
                   "--allow-network). Default: any rule.")
@click.option("--allow-private-network", is_flag=True,
              help="With --allow-network: let tenants' IP/CIDR rules open private ranges, link-local and cloud "
                   "metadata, loopback and this host's own addresses (refused otherwise).")
@click.option("--host-dir-root", "host_dir_roots", multiple=True, metavar="DIR",
              type=click.Path(file_okay=False, resolve_path=True),
              help="Let tenants grant host directories inside DIR to their sandboxes (mounts={'/data': "
                   "'DIR/sub'}; read-only unless ':rw'). Repeatable. None given: no host directory is ever "
                   "granted (named volumes still are).")
@click.option("--max-volumes", type=click.IntRange(1), metavar="N", envvar="SANDLOT_MAX_VOLUMES", show_envvar=True,
              help="Per tenant: how many named volumes it may keep. Over it: 429. [default: 20]")
@click.option("--total-volume-size", metavar="SIZE", envvar="SANDLOT_TOTAL_VOLUME_SIZE", show_envvar=True,
              help="Per tenant: the most its volumes' sizes may sum to (e.g. 50G). Over it: 429. [default: 50G]")
@click.option("--max-paused-bytes", metavar="SIZE", envvar="SANDLOT_MAX_PAUSED_BYTES", show_envvar=True,
              help="Per tenant: the most the checkpoints of its paused (hibernated) sandboxes may sum to on disk "
                   "(e.g. 20G). A pause past it: 429; an idle pause past it ends the sandbox. [default: 20G]")
@click.option("--no-durable", is_flag=True,
              help="Sandboxes end with this server process. Default: they outlive a restart or a crash until their "
                   "lifetime ends, and the next server on the same database takes them back (not those with mounts "
                   "or secrets).")
@click.option("--ksm", is_flag=True, envvar="SANDLOT_KSM", show_envvar=True,
              help="Let the kernel merge identical memory pages of sandboxes (KSM; process tier): less memory per idle "
                   "session. ksmd is turned on with a bounded scan rate if it is off, and put back at exit. KSM is "
                   "host-wide: pages of different tenants merge, which opens page-deduplication timing side "
                   "channels between them; use it only where tenants trust each other that far.")
def serve(host: str, port: int, db_path: Optional[str], log_level: str, no_mcp: bool, isolations: str,
          ceilings: tuple[str, ...],
          total_memory: Optional[str], total_pids: Optional[int], audit_retention: Optional[str],
          audit_max_rows: Optional[int], allow_network: bool, network_ceiling: tuple[str, ...],
          allow_private_network: bool, host_dir_roots: tuple[str, ...], max_volumes: Optional[int],
          total_volume_size: Optional[str], max_paused_bytes: Optional[str], no_durable: bool, ksm: bool) -> None:
    """Run the Sandlot HTTP server: REST + streaming, MCP at /mcp, /metrics, OpenAPI at /docs.

    Every request needs an API key (`sandlot keys create --tenant NAME`); /metrics needs an operator
    key (`sandlot keys create --operator`); /healthz needs none and says only that the server lives.
    Per-tenant quotas (live sandboxes, lifetime, rate, totals) can be overridden per tenant with
    `sandlot.server.set_quotas`. Stops cleanly on Ctrl-C or SIGTERM; its sandboxes run on for the next server
    on the same database to take back (--no-durable: they end with it).
    """
    from .. import server
    from .._exceptions import InvalidRequest

    try:
        settings = server.operator_settings(db_path, isolations=[i.strip() for i in isolations.split(",") if i.strip()],
                                            ceilings=ceilings, total_memory=total_memory,
                                            total_pids=total_pids, audit_retention=audit_retention,
                                            audit_max_rows=audit_max_rows, allow_network=allow_network,
                                            network_ceiling=network_ceiling,
                                            allow_private_network=allow_private_network,
                                            host_dir_roots=host_dir_roots, max_volumes=max_volumes,
                                            total_volume_size=total_volume_size,
                                            max_paused_bytes=max_paused_bytes, durable=not no_durable)
    except InvalidRequest as exc:
        raise click.UsageError(str(exc)) from None
    merging = None
    if ksm:
        from .._host import ksm as kernel_ksm

        merging = kernel_ksm.ask()
    mounts = []
    if not no_mcp:
        from ..mcp_hosted import server_mount

        mounts.append(server_mount(host=host))

    def listening(bound_port: int) -> None:
        # Only now, with the database locked and the port bound, is the address worth telling (--port 0: the real one).
        where = f"http://{host}:{bound_port}"
        err.print(escape(f"Sandlot server listening on {where} (database {server.describe_database(settings.db_path)})"
                         + ("" if no_mcp else f"; MCP at {where}/mcp")))
        missing = " (runsc is not installed: gVisor sandboxes cannot start; `sandlot doctor`)" if (
            "gvisor" in settings.isolations and shutil.which("runsc") is None) else ""
        err.print(escape("isolation tiers: " + ", ".join(settings.isolations) + missing))
        if merging is not None:
            err.print(escape("memory merging (KSM): " + (
                f"on, ksmd scans {merging.pages_to_scan} pages every {merging.sleep_millisecs} ms; pages of all "
                "tenants' sandboxes merge (a timing side channel between them)" if merging.running else
                f"asked, but ksmd does not run ({merging.why or 'not root, or run=2'}): nothing merges")))
        roots = settings.host_dir_roots
        err.print(escape("host directories: " + (f"tenants may grant those inside {', '.join(roots)}" if roots else
                                                 "none granted (--host-dir-root DIR allows them)")))

    server.serve(host=host, port=port, db_path=db_path, log_level=log_level, settings=settings, mounts=mounts,
                 on_listening=listening)


@click.group(short_help="Create, list and revoke API keys.")
def keys() -> None:
    """Manage API keys (opens the server's database directly: run it on the server's machine, or, for a
    PostgreSQL database (--db postgresql://...), anywhere that reaches it)."""


@keys.command(name="create")
@click.option("--tenant", metavar="NAME", help="Tenant the key acts for (created if new).")
@click.option("--operator", is_flag=True,
              help="An operator key instead: it reads /metrics (every tenant's figures) and acts for no tenant.")
@db_option
@json_option
def keys_create(tenant: Optional[str], operator: bool, db_path: Optional[str], as_json: bool) -> None:
    """Create an API key for a tenant (--tenant NAME), or an operator key (--operator).
    The key is printed once; only its hash is stored."""
    from .. import server

    if operator == bool(tenant):
        raise click.UsageError("give either --tenant NAME or --operator")
    if operator:
        key = server.create_operator_key(db_path)
        if as_json:
            print_json({"key_id": _key_id_of(key, None, db_path), "role": "operator", "key": key})
            return
        err.print("Operator key (shown only this once; send it as 'Authorization: Bearer ...' to /metrics):")
        click.echo(key)
        return
    key = server.create_key(tenant, db_path)
    key_id = _key_id_of(key, tenant, db_path)
    if as_json:
        print_json({"key_id": key_id, "tenant": tenant, "role": "tenant", "key": key})
        return
    err.print(f"API key {escape(key_id or '')} for tenant [bold]{escape(tenant)}[/] (shown only this once; use it as "
              "SANDLOT_API_KEY; `sandlot keys revoke` takes the id):")
    click.echo(key)


def _key_id_of(key: str, tenant: Optional[str], db_path: Optional[str]) -> Optional[str]:
    """The id of the key just made (what `keys revoke` takes), found by its hint among the owner's keys:
    the newest one with that hint (the store keeps no more of the key than its hash and hint)."""
    from .. import server

    hint = key[:9] + "…"
    found = [k for k in server.list_keys(tenant, db_path) if k.hint == hint and k.revoked_at is None]
    return max(found, key=lambda k: k.created_at).key_id if found else None


@keys.command(name="ls")
@click.option("--tenant", metavar="NAME", help="Only this tenant's keys.")
@db_option
@json_option
def keys_ls(tenant: Optional[str], db_path: Optional[str], as_json: bool) -> None:
    """List API keys: ids, tenants, hints, when created, last used, revoked (never the keys)."""
    from .. import server

    rows = server.list_keys(tenant, db_path)
    if as_json:
        print_json([dict(to_jsonable(k), status=_status(k)) for k in rows])
        return
    if not rows:
        err.print("no API keys: create one with `sandlot keys create --tenant NAME`")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("KEY ID", "STATUS", "ROLE", "TENANT", "HINT", "CREATED", "LAST USED", "REVOKED"):
        table.add_column(column)
    for k in rows:
        status = "[red]revoked[/]" if _status(k) == "revoked" else "[green]active[/]"
        table.add_row(escape(k.key_id), status, k.role, "" if k.role == "operator" else escape(k.tenant),
                      escape(k.hint), _when(k.created_at), _when(k.last_used_at), _when(k.revoked_at))
    out.print(table)


def _status(key: Any) -> str:
    return "active" if key.revoked_at is None else "revoked"


@keys.command(name="revoke")
@click.argument("key_id", metavar="KEY_ID")
@db_option
def keys_revoke(key_id: str, db_path: Optional[str]) -> None:
    """Revoke an API key (by its id, or the key itself); requests with it fail from now on."""
    from .. import server

    if not server.revoke_key(key_id, db_path):
        err.print(f"[red]error:[/] no active API key {escape(repr(key_id))}")
        sys.exit(EXIT_SANDLOT)
    err.print(f"revoked {escape(key_id)}")


@click.command(short_help="Serve MCP over stdio, for agents (Claude Desktop, IDEs).")
@click.option("--template", default="python", show_default=True, help="Template of the sandboxes it creates.")
@click.option("--allow-network", is_flag=True,
              help="Let create_session(network=...) give sandboxes a network (off: the agent cannot grant itself one).")
@click.option("--host-dir-root", "host_dir_roots", multiple=True, metavar="DIR",
              help="Let create_session(mounts=...) grant host directories inside DIR (repeatable; with --api-url, "
                   "a directory of the server's, which must allow it too). None given: the agent can mount no host "
                   "directory (named volumes still).")
@target_options
def mcp(template: str, allow_network: bool, host_dir_roots: tuple[str, ...], api_url: Optional[str],
        api_key: Optional[str]) -> None:
    """Serve MCP over stdio, for an agent (Claude Desktop, an IDE...).

    Tools: run_code, create_session, list_sessions, close_session, run_command, write_file, read_file,
    list_files.
    Sandboxes run on this machine, or on a server with --api-url. The README has the client config.
    """
    from .. import mcp_server

    target = make_target(api_url, api_key)
    if not target.remote:  # a root must itself be grantable (not /, /etc, Sandlot's state...): say so now
        from .._storage.hostdir import check_allowed

        host_dir_roots = tuple(check_allowed(root, None) for root in host_dir_roots)  # resolved
    elif any(not root.startswith("/") for root in host_dir_roots):
        raise click.UsageError("--host-dir-root with --api-url: an absolute path on the server")
    mcp_server.run_stdio(mcp_server.LocalSandboxes(template, allow_network=allow_network,
                                                   host_dir_roots=host_dir_roots, **target.credentials()))
