"""`sandlot cp`: copy files between this machine and a server's sandbox, streamed, with progress.

A remote path is written ``ID:/path`` (as scp does). ``-`` is stdin (as source) or stdout (as
destination). Paths inside the sandbox are resolved by the sandbox's agent, never on the host.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import sys
import tempfile
from typing import BinaryIO, Iterator, Optional

import click
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from .._sync import Sandbox
from ._common import err, fail_usage, json_option, print_json
from ._target import connect_sandbox, make_target, server_options
from ._terminal import TerminalBytes, is_terminal

_REMOTE = re.compile(r"^(?P<id>[A-Za-z0-9][A-Za-z0-9._-]*):(?P<path>.*)$")


def split_remote(spec: str) -> tuple[Optional[str], str]:
    """``"sb-1:/home/user/x"`` -> ``("sb-1", "/home/user/x")``; a local path -> ``(None, path)``.

    A local path that contains a colon can be written ``./a:b``.
    """
    match = _REMOTE.match(spec)
    if match is None or os.path.exists(spec):
        return None, spec
    return match["id"], match["path"] or "/home/user/"


@contextlib.contextmanager
def _progress(label: str, total: Optional[int], enabled: bool) -> Iterator[Progress]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err, transient=True,
                        disable=not (enabled and err.is_terminal))
    with progress:
        progress.add_task(label, total=total)
        yield progress


class _CountingReader:
    """A file wrapper that reports each chunk the SDK reads (from its own thread) to the progress bar."""

    def __init__(self, raw: BinaryIO, progress: Progress) -> None:
        self.raw, self.progress, self.sent = raw, progress, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.sent += len(chunk)
        self.progress.update(self.progress.task_ids[0], advance=len(chunk))
        return chunk


def _remote_target_path(sandbox: Sandbox, path: str, name: str) -> str:
    """Copying into a directory keeps the source's name, as cp does."""
    if path.endswith("/"):
        return posixpath.join(path, name)
    if sandbox.files.exists(path) and sandbox.files.stat(path).type == "dir":
        return posixpath.join(path, name)
    return path


def upload(sandbox: Sandbox, local: str, remote: str, show: bool) -> tuple[str, int]:
    if local == "-":
        source: BinaryIO = sys.stdin.buffer
        total, name = None, "stdin"
    else:
        if os.path.isdir(local):
            fail_usage(f"{local} is a directory; copy files one at a time, or tar them: "
                       f"tar c DIR | sandlot exec -i ID 'tar x'")
        try:
            source = open(local, "rb")
        except OSError as exc:
            fail_usage(f"cannot read {local}: {exc.strerror}")
        total, name = os.fstat(source.fileno()).st_size, os.path.basename(local)
    remote = _remote_target_path(sandbox, remote, name)
    with source, _progress(f"{name} → {sandbox.sandbox_id}", total, show) as progress:
        reader = _CountingReader(source, progress)
        sandbox.files.write(remote, reader)
    return remote, reader.sent


def download(sandbox: Sandbox, remote: str, local: str, show: bool) -> tuple[str, int]:
    info = sandbox.files.stat(remote)
    if info.type == "dir":
        fail_usage(f"{remote} is a directory in the sandbox; copy files one at a time, or tar them: "
                   f"sandlot exec {sandbox.sandbox_id} 'tar c -C {remote} .' > out.tar")
    received = 0
    if local == "-":
        # A terminal shows the file's escape sequences instead of obeying them; a pipe gets its bytes.
        terminal = TerminalBytes() if is_terminal(sys.stdout) else None
        with _progress(info.name, info.size or None, show) as progress:
            for chunk in sandbox.files.read(remote, format="stream"):
                if terminal is None:
                    sys.stdout.buffer.write(chunk)
                else:
                    sys.stdout.write(terminal.feed(chunk))
                received += len(chunk)
                progress.update(progress.task_ids[0], advance=len(chunk))
        if terminal is not None:
            sys.stdout.write(terminal.end())
            sys.stdout.flush()
        sys.stdout.buffer.flush()
        return "-", received
    if os.path.isdir(local):
        local = os.path.join(local, posixpath.basename(remote.rstrip("/")))
    # Write beside the destination and rename at the end: a failed copy never leaves half a file.
    fd, partial = tempfile.mkstemp(prefix=".sandlot-cp-", dir=os.path.dirname(os.path.abspath(local)))
    try:
        with os.fdopen(fd, "wb") as sink, _progress(f"{sandbox.sandbox_id} → {info.name}", info.size or None,
                                                     show) as progress:
            for chunk in sandbox.files.read(remote, format="stream"):
                sink.write(chunk)
                received += len(chunk)
                progress.update(progress.task_ids[0], advance=len(chunk))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)  # as a plain `cp` would create it
        os.replace(partial, local)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return local, received


@click.command(short_help="Copy a file to or from a server's sandbox (ID:/path).")
@click.argument("source", metavar="SRC")
@click.argument("destination", metavar="DST")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@json_option
@server_options
def cp(source: str, destination: str, quiet: bool, as_json: bool, api_url: Optional[str],
       api_key: Optional[str]) -> None:
    """Copy a file between this machine and a server's sandbox: `cp data.csv ID:/home/user/`,
    `cp ID:/home/user/out.png .` (`-` is stdin or stdout)."""
    src_id, src_path = split_remote(source)
    dst_id, dst_path = split_remote(destination)
    if (src_id is None) == (dst_id is None):
        fail_usage("exactly one of SRC and DST must be a sandbox path, written ID:/path")
    target = make_target(api_url, api_key)
    sandbox = connect_sandbox(target, (src_id or dst_id), "cp", quiet=True)  # type: ignore[arg-type]
    show = not (quiet or as_json)
    if dst_id is not None:
        where, size = upload(sandbox, src_path, dst_path, show)
        where = f"{dst_id}:{where}"
    else:
        where, size = download(sandbox, src_path, dst_path, show)
    if as_json:
        print_json({"source": source, "destination": where, "bytes": size})
    elif not quiet:
        err.print(f"copied {size} bytes to {escape(where)}")
