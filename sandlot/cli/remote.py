"""`sandlot ls`, `sandlot kill` and `sandlot fork`: the live sandboxes of a server (the caller's tenant only)."""

from __future__ import annotations

import datetime
from typing import Any, Optional

import click
from rich.markup import escape
from rich.table import Table

from ._common import err, json_option, out, parse_pairs, print_json, to_jsonable
from ._target import connect_sandbox, list_sandboxes, make_target, server_options

# Column -> the field names a sandbox listing may use for it (the first present wins).
_COLUMNS = {
    "id": ("sandbox_id", "id"),
    "template": ("template",),
    "state": ("state", "status"),
    "started": ("started_at", "created_at", "created"),
    "expires": ("expires_at",),
    "ended": ("ended_at",),
    "metadata": ("metadata",),
    "reason": ("end_reason",),
}


def _field(item: dict, names: tuple[str, ...]) -> Any:
    for name in names:
        if item.get(name) is not None:
            return item[name]
    return None


def _when(value: Any) -> str:
    """Timestamps as local time; ISO strings and epoch seconds both accepted."""
    if value is None:
        return ""
    try:
        if isinstance(value, (int, float)):
            moment = datetime.datetime.fromtimestamp(value)
        else:
            moment = datetime.datetime.fromisoformat(str(value)).astimezone()
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return str(value)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in ("started", "expires", "ended"):
        return _when(value)
    if column == "metadata" and isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


@click.command(name="ls", short_help="List your sandboxes on the server.")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE",
              help="Only sandboxes whose metadata has KEY=VALUE (repeatable).")
@click.option("--status", default="running", show_default=True, type=click.Choice(["running", "paused", "ended", "lost", "all"]),
              help="Which sandboxes: running ones, paused ones (gVisor, waiting on disk), those that ended or were "
                   "lost in a server restart, or all.")
@json_option
@server_options
def ls(metadata: tuple[str, ...], status: str, as_json: bool, api_url: Optional[str], api_key: Optional[str]) -> None:
    """List your sandboxes on the server (live ones by default), newest first."""
    target = make_target(api_url, api_key)
    found = list_sandboxes(target, parse_pairs(metadata, "--metadata") or None, status)
    items = [to_jsonable(item) for item in found]
    if as_json:
        print_json(items)
        return
    if not items:
        err.print("no live sandboxes" if status == "running" else f"no sandboxes ({status})")
        return
    items = [item if isinstance(item, dict) else {"id": item} for item in items]
    table = Table(box=None, pad_edge=False)
    columns = [c for c, names in _COLUMNS.items() if any(_field(i, names) is not None for i in items)]
    for column in columns:
        wraps = column in ("metadata", "reason")
        # Ids stay whole, so they can be copied; on a narrow terminal the other columns give way.
        width = max(len(str(_field(i, _COLUMNS["id"]))) for i in items) if column == "id" else None
        table.add_column(column.upper(), overflow="fold" if wraps else "ellipsis", no_wrap=not wraps, min_width=width)
    for item in items:
        table.add_row(*(escape(_cell(c, _field(item, _COLUMNS[c]))) for c in columns))
    out.print(table)


@click.command(short_help="End sandboxes on the server.")
@click.argument("sandbox_ids", metavar="ID...", nargs=-1, required=True)
@server_options
def kill(sandbox_ids: tuple[str, ...], api_url: Optional[str], api_key: Optional[str]) -> None:
    """End the server's sandbox ID (and everything running in it)."""
    target = make_target(api_url, api_key)
    for sandbox_id in sandbox_ids:
        connect_sandbox(target, sandbox_id, "kill", quiet=True).kill()
        err.print(f"killed {escape(sandbox_id)}")


@click.command(short_help="Copy a live session into a new sandbox (gVisor tier).")
@click.argument("sandbox_id", metavar="ID")
@json_option
@server_options
def fork(sandbox_id: str, as_json: bool, api_url: Optional[str], api_key: Optional[str]) -> None:
    """A new sandbox on the server with a copy of sandbox ID's live session (its variables, files and working
    directory), independent from then on; prints the new id. gVisor sandboxes only."""
    target = make_target(api_url, api_key)
    child = connect_sandbox(target, sandbox_id, "fork", quiet=True).fork()
    if as_json:
        print_json({"sandbox_id": child.sandbox_id, "parent": sandbox_id, "template": child.template,
                    "isolation": child.isolation, "metadata": child.metadata})
        return
    click.echo(child.sandbox_id)
