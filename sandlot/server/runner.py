"""Running the server: ``serve(...)`` for `sandlot serve`, and ``python -m sandlot.server`` (see main)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Optional, Sequence

import uvicorn

from .._exceptions import InvalidRequest
from .app import Mount, create_app
from .settings import Quotas, Settings, operator_settings
from .store import DatabaseInUse, DatabaseUnavailable, default_db_path, describe, lock_database


class _Server(uvicorn.Server):
    """uvicorn's server, telling ``on_listening(port)`` once the app has started (database locked, sandboxes
    of a previous run reaped) and the socket is bound: not before, so an address printed is one that answers."""

    def __init__(self, config: uvicorn.Config, on_listening: Optional[Callable[[int], None]]) -> None:
        super().__init__(config)
        self.on_listening = on_listening

    async def startup(self, sockets: Optional[list] = None) -> None:
        await super().startup(sockets)
        if self.on_listening is None or self.should_exit or not self.started:
            return
        ports = [sock.getsockname()[1] for server in self.servers for sock in (server.sockets or ())]
        self.on_listening(ports[0] if ports else self.config.port)


def serve(host: str = "127.0.0.1", port: int = 8000, db_path: "str | os.PathLike[str] | None" = None, *,
          log_level: str = "info", settings: Optional[Settings] = None, mounts: Sequence[Mount] = (),
          on_listening: Optional[Callable[[int], None]] = None) -> None:
    """Serve until SIGINT/SIGTERM; then the durable sandboxes run on for the next server (settings.durable), the
    others are ended (and reported lost to their owners).

    Binds 127.0.0.1 unless told otherwise: put a TLS-terminating proxy in front to serve a network.
    Raises DatabaseInUse if another server holds ``db_path`` (a SQLite file; a PostgreSQL URL may be shared),
    DatabaseUnavailable if it cannot be opened. ``on_listening(port)`` is called once the
    server is ready and bound (the port actually bound, for ``port=0``).
    """
    settings = (settings or Settings()).with_db(db_path)
    lock = lock_database(settings.db_path)  # fail here, with a clear message, rather than inside uvicorn
    if lock is not None:
        os.close(lock)
    # This process serves tenants: its engine grants host directories only within the operator's roots, even
    # to a caller that forgot to pass them (the registry passes them with each create).
    from .._engine import default_engine

    default_engine().host_dir_roots = tuple(settings.host_dir_roots)
    default_engine().durable = settings.durable
    app = create_app(settings, mounts=mounts)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=10, server_header=False)
    server = _Server(config, on_listening)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: Ctrl-C is the ordinary way to stop
        server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE (it has logged why), as uvicorn.run exits


def main(argv: Optional[Sequence[str]] = None) -> int:
    defaults = Quotas()
    parser = argparse.ArgumentParser(prog="python -m sandlot.server", description="Run the Sandlot HTTP server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", default=None, help="SQLite database file, or a postgresql://USER@HOST:PORT/DB URL "
                                                    f"that replicas share (default: {describe(default_db_path())})")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--max-live", type=int, default=defaults.max_live, help="default per-tenant live sandboxes")
    parser.add_argument("--max-lifetime", type=float, default=defaults.max_lifetime, help="seconds (<= 14 days)")
    parser.add_argument("--rate", type=int, default=defaults.requests_per_minute, help="requests/minute per tenant")
    parser.add_argument("--isolations", default="process", help="tiers clients may ask for, e.g. process,gvisor")
    parser.add_argument("--ceiling", action="append", default=[], metavar="LIMIT=VALUE",
                        help="the most a tenant may ask for, e.g. memory=8G (repeat; default: from this host)")
    parser.add_argument("--total-memory", metavar="SIZE", help="default per-tenant sum of memory limits (e.g. 64G)")
    parser.add_argument("--total-pids", type=int, metavar="N", help="default per-tenant sum of pids limits")
    parser.add_argument("--audit-retention", metavar="DURATION", help="keep audit rows this long (e.g. 90d, 12h)")
    parser.add_argument("--audit-max-rows", type=int, metavar="N", help="keep at most the newest N audit rows")
    parser.add_argument("--allow-network", action="store_true",
                        help="let tenants give sandboxes a network (egress by their rules) and secrets")
    parser.add_argument("--network-allow", action="append", default=[], metavar="RULE",
                        help="the rules tenants' allow rules must lie within (repeat; implies --allow-network)")
    parser.add_argument("--allow-private-network", action="store_true",
                        help="with --allow-network: let tenants' IP rules open private ranges, link-local and "
                             "cloud metadata, loopback and this host's own addresses (refused otherwise)")
    parser.add_argument("--host-dir-root", action="append", default=[], metavar="DIR",
                        help="let tenants grant host directories inside DIR (repeat; none: no host directories)")
    parser.add_argument("--max-volumes", type=int, metavar="N",
                        help=f"default per-tenant number of named volumes (default {defaults.max_volumes})")
    parser.add_argument("--total-volume-size", metavar="SIZE",
                        help="default per-tenant sum of volume sizes (e.g. 50G, the default)")
    parser.add_argument("--no-durable", action="store_true",
                        help="sandboxes end with this server process (default: they outlive a restart or crash "
                             "until their lifetime ends, and the next server takes them back)")
    parser.add_argument("--max-paused-bytes", metavar="SIZE",
                        help="default per-tenant sum of paused sandboxes' checkpoints (e.g. 20G, the default)")
    parser.add_argument("--ksm", action="store_true",
                        help="let the kernel merge identical memory pages of sandboxes (KSM; host-wide: pages of "
                             "different tenants merge, a timing side channel between them); turns ksmd on with a "
                             "bounded scan rate if it is off, and back at exit (as SANDLOT_KSM=1)")
    args = parser.parse_args(argv)
    if args.ksm:
        from .._host import ksm

        ksm.ask()
    try:
        settings = operator_settings(
            args.db, ceilings=args.ceiling, total_memory=args.total_memory, total_pids=args.total_pids,
            audit_retention=args.audit_retention, audit_max_rows=args.audit_max_rows, max_live=args.max_live,
            max_lifetime=args.max_lifetime, requests_per_minute=args.rate,
            isolations=[i.strip() for i in args.isolations.split(",") if i.strip()], allow_network=args.allow_network,
            network_ceiling=args.network_allow,
            allow_private_network=args.allow_private_network, host_dir_roots=args.host_dir_root,
            max_volumes=args.max_volumes, total_volume_size=args.total_volume_size,
            max_paused_bytes=args.max_paused_bytes, durable=not args.no_durable)
    except InvalidRequest as exc:
        parser.error(str(exc))
    try:
        serve(args.host, args.port, log_level=args.log_level, settings=settings)
    except (DatabaseInUse, DatabaseUnavailable) as exc:
        print(f"sandlot server: {exc}", file=sys.stderr)
        return 2
    return 0
