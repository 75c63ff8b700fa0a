"""`-v/--volume` of `sandlot run` and `sandlot shell`, and `sandlot volume create | ls | info | rm`.

``-v HOSTDIR:TARGET[:ro|rw]`` grants a host directory (a relative HOSTDIR is resolved against the current
directory; read-only unless ``:rw``), ``-v vol:NAME:TARGET[:ro|rw]`` a named volume (writable unless ``:ro``):
the SDK's ``mounts={TARGET: "/abs/host/dir:mode" | "vol:NAME:mode"}``. Volumes are this machine's, or your
tenant's on a server (--api-url), like every other command's sandboxes.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Optional, TypeVar

import click
from rich.markup import escape
from rich.table import Table

from .._volumes import Volumes
from ._common import err, fail_usage, json_option, out, print_json, to_jsonable
from ._target import make_target, api_options

F = TypeVar("F", bound=Callable[..., Any])
_MODES = ("ro", "rw")


def volume_option(f: F) -> F:
    return click.option("-v", "--volume", "volumes", multiple=True, metavar="SPEC",
                        help="Grant storage to the sandbox (repeatable): HOSTDIR:TARGET[:ro|rw] a host directory "
                             "(relative to the current directory; read-only unless :rw; files the sandbox makes "
                             "are the directory owner's), or vol:NAME:TARGET[:ro|rw] a named volume (`sandlot "
                             "volume create`; writable unless :ro).")(f)


def parse_volume(spec: str) -> tuple[str, str]:
    """One -v SPEC -> (target, the SDK's source string); a usage error (exit 2) says what is wrong."""
    usage = (f"-v {spec!r}: expected HOSTDIR:TARGET[:ro|rw] or vol:NAME:TARGET[:ro|rw], "
             "e.g. -v ./repo:/project:rw or -v vol:pipcache:/cache")
    parts = spec.split(":")
    mode: Optional[str] = None
    if len(parts) >= 3 and parts[-1] in _MODES:
        mode = parts.pop()
    if len(parts) < 2 or parts[-1] in _MODES:
        fail_usage(usage)
    target = parts.pop()
    if not target.startswith("/"):
        fail_usage(f"{usage} (TARGET {target!r} must be an absolute path inside the sandbox)")
    suffix = f":{mode}" if mode else ""
    if parts[0] == "vol":
        if len(parts) != 2 or not parts[1]:
            fail_usage(usage)
        return target, f"vol:{parts[1]}{suffix}"
    host = ":".join(parts)
    if not host:
        fail_usage(usage)
    return target, os.path.abspath(os.path.expanduser(host)) + suffix


def mounts_of(specs: tuple[str, ...]) -> Optional[dict[str, str]]:
    """The SDK's ``mounts=`` for the -v flags (None for none); validated by the spec like any other argument."""
    mounts: dict[str, str] = {}
    for spec in specs:
        target, source = parse_volume(spec)
        if target in mounts:
            fail_usage(f"-v: {target!r} is given twice")
        mounts[target] = source
    return mounts or None


# -- sandlot volume ---------------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _volumes(api_url: Optional[str], api_key: Optional[str]) -> Volumes:
    return Volumes(**make_target(api_url, api_key).credentials())


def _table(found: list) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "SIZE", "USED ON DISK", "INODES", "IN USE", "CREATED"):
        table.add_column(column)
    for v in found:
        table.add_row(escape(v.name), _size(v.size), _size(v.allocated), str(v.inodes), "yes" if v.in_use else "",
                      _when(v.created_at))
    return table


@click.group(short_help="Named volumes: create, ls, info, rm.")
def volume() -> None:
    """Named, persistent volumes: mount one with `-v vol:NAME:/target` (or mounts={"/target": "vol:NAME"}).

    Each has a size and an inode cap the kernel enforces (full: ENOSPC to the code, the sandbox lives on);
    one sandbox may write it at a time, or many read it (vol:NAME:ro). This machine's volumes, or your
    tenant's on a server (--api-url / SANDLOT_API_URL)."""


@volume.command(name="create")
@click.argument("name")
@click.option("--size", default="1G", show_default=True, metavar="SIZE", help="Its capacity, e.g. 2G or 512M.")
@click.option("--inodes", type=click.IntRange(1), metavar="N",
              help="The most files it holds [default: one per 16 KiB].")
@json_option
@api_options("Sandlot server whose volumes (your tenant's) to use; without it, this machine's.")
def volume_create(name: str, size: str, inodes: Optional[int], as_json: bool, api_url: Optional[str],
                  api_key: Optional[str]) -> None:
    """Create the empty volume NAME."""
    made = _volumes(api_url, api_key).create(name, size, inodes=inodes)
    if as_json:
        print_json(made)
        return
    err.print(f"created volume [bold]{escape(made.name)}[/] ({_size(made.size)}, {made.inodes} inodes): "
              f"mount it with -v vol:{escape(made.name)}:/PATH")


@volume.command(name="ls")
@json_option
@api_options("Sandlot server whose volumes (your tenant's) to use; without it, this machine's.")
def volume_ls(as_json: bool, api_url: Optional[str], api_key: Optional[str]) -> None:
    """List the volumes."""
    found = _volumes(api_url, api_key).list()
    if as_json:
        print_json(to_jsonable(found))
        return
    if not found:
        err.print("no volumes: create one with `sandlot volume create NAME --size 2G`")
        return
    out.print(_table(found))


@volume.command(name="info")
@click.argument("name")
@json_option
@api_options("Sandlot server whose volumes (your tenant's) to use; without it, this machine's.")
def volume_info(name: str, as_json: bool, api_url: Optional[str], api_key: Optional[str]) -> None:
    """Show the volume NAME: size, space it takes on disk, inodes, whether a sandbox has it mounted."""
    found = _volumes(api_url, api_key).info(name)
    if as_json:
        print_json(found)
        return
    out.print(_table([found]))


@volume.command(name="rm")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@api_options("Sandlot server whose volumes (your tenant's) to use; without it, this machine's.")
def volume_rm(names: tuple[str, ...], api_url: Optional[str], api_key: Optional[str]) -> None:
    """Delete volumes and everything in them (refused while a sandbox has one mounted)."""
    volumes = _volumes(api_url, api_key)
    for name in names:
        volumes.delete(name)
        err.print(f"deleted volume {escape(name)}")
