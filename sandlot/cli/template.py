"""`sandlot template pull | load | build | ls | rm`: OCI images and sandbox.yaml as templates.

Templates live on this machine (under the data dir: /var/lib/sandlot as root, SANDLOT_DATA_DIR
overrides); a server uses the templates of the machine it runs on, so run these there.
Long work (pulls, builds) shows progress on stderr; `--json` prints the resulting record on stdout.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any, Iterator, Optional

import click
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from ._common import err, json_option, out, print_json
from ._terminal import neutralise


@click.group(short_help="Templates from OCI images and sandbox.yaml: pull, load, build, ls, rm.")
def template() -> None:
    """Templates: the builtin `python` (this machine's interpreter) and OCI images, pulled from a
    registry, loaded from a tarball or built from a sandbox.yaml. Use one with
    `Sandbox(template=NAME)` or `sandlot run --template NAME`, on either isolation tier."""


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A callback for the engine's progress events: bars and spinners on a terminal, lines otherwise."""
    if not enabled:
        yield None
        return
    if not err.is_terminal:
        last = {"phase": None}

        def plain(event: dict) -> None:
            phase = event.get("phase")
            if phase in ("copy", "blob") or (phase == "log" and not event["message"].startswith(("Collecting",
                                                                                                  "Saved"))):
                return
            if phase != last["phase"] or phase == "step":
                err.print(escape(event["message"]))
            last["phase"] = phase

        yield plain
        return
    bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                    console=err, transient=False)
    tasks: dict[str, Any] = {}

    def rich_event(event: dict) -> None:
        # Build logs are the output of apt and pip inside a sandbox: shown, never obeyed, on this terminal.
        phase, message = event.get("phase"), escape(neutralise(event.get("message", "")))
        if phase == "copy":
            total_bytes, total = event.get("total_bytes"), event.get("total")
            if "copy" not in tasks:
                tasks["copy"] = bars.add_task(message, total=total_bytes or total or None, detail="")
            done = event.get("bytes") if total_bytes else event.get("done")
            detail = f"{event.get('done') or 0}/{total} layers" if total else ""
            if total_bytes:
                detail += f"  {_size(event.get('bytes') or 0) or '0 B'} / {_size(total_bytes)}"
            bars.update(tasks["copy"], description=message, completed=done or 0, detail=detail)
        elif phase == "blob":
            pass  # the bar above counts them
        elif phase == "log":
            bars.console.print(f"[dim]  {message}[/]")
        elif phase == "warning":
            bars.console.print(f"[yellow]warning:[/] {message}")
        else:
            key = "step" if phase in ("step", "unpack", "inspect", "gc", "wait", "resolve") else phase
            for task_id in tasks.values():
                task = bars.tasks[task_id]
                if not task.finished and task_id != tasks.get("copy"):
                    bars.update(task_id, total=1, completed=1)
            if phase == "done":
                return
            tasks[key + str(len(tasks))] = bars.add_task(message, total=None, detail="")

    with bars:
        yield rich_event


def _size(n: Optional[int]) -> str:
    if not n:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _summary(record: dict) -> None:
    python = f"Python {record['python_version']} at {record['python']}" if record.get("python") else \
        "no Python >= 3.8 (commands and files work; run_code says so)"
    err.print(f"[green]template {escape(record['name'])}[/] {escape(record.get('digest') or '')[:19]}: "
              f"{escape(python)}")


@template.command(short_help="Pull an OCI image from a registry and make it a template.")
@click.argument("ref")
@click.option("--name", "-n", help="Template name [default: from the reference, e.g. python-3.12-slim].")
@click.option("--insecure", is_flag=True, help="Plain HTTP / no TLS verification (a registry on loopback).")
@click.option("--tls-verify", type=click.BOOL, default=True, show_default=True, metavar="BOOL",
              help="Verify the registry's TLS certificate (--tls-verify=false is --insecure).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@json_option
def pull(ref: str, name: Optional[str], insecure: bool, tls_verify: bool, quiet: bool, as_json: bool) -> None:
    """Pull REF ([registry/]repository[:tag][@sha256:digest]) into the local image cache (layers
    shared by digest), unpack it and record it as a template.

    \b
      sandlot template pull python:3.12-slim
      sandlot template pull 127.0.0.1:5000/team/tools:1 --insecure --name tools
    """
    from .._images import pull as do_pull

    with _progress(not quiet) as progress:
        record = do_pull(ref, name, tls_verify=tls_verify and not insecure, progress=progress)
    if as_json:
        print_json(record)
    else:
        _summary(record)


@template.command(short_help="Load a docker-archive or OCI-layout tarball as a template.")
@click.argument("file", type=click.Path(exists=True, dir_okay=True))
@click.option("--name", "-n", help="Template name [default: from the image's tag or the file name].")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@json_option
def load(file: str, name: Optional[str], quiet: bool, as_json: bool) -> None:
    """Load FILE: a `docker save` tarball (docker-archive), an OCI-layout tarball, or an OCI layout directory."""
    from .._images import load as do_load

    with _progress(not quiet) as progress:
        record = do_load(file, name, progress=progress)
    if as_json:
        print_json(record)
    else:
        _summary(record)


@template.command(short_help="Build a template from a sandbox.yaml (sandboxed steps).",
                  options_metavar="-t NAME [-f sandbox.yaml] [OPTIONS]")
@click.option("--file", "-f", "path", default="sandbox.yaml", show_default=True, type=click.Path(), metavar="PATH",
              help="The sandbox.yaml to build.")
@click.option("--tag", "-t", "name", required=True, metavar="NAME", help="Name of the template to create (or replace).")
@click.option("--pull", "force_pull", is_flag=True, help="Pull the base image again even if it is here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@json_option
def build(path: str, name: str, force_pull: bool, quiet: bool, as_json: bool) -> None:
    """Build the template NAME (-t NAME) from a sandbox.yaml: base image, apt and pip packages, files, env, workdir, preload,
    default limits, pool size. Every step that runs package code runs in a sandbox; a failing step
    is named, with its last output lines, and leaves nothing behind.

    \b
      base: python:3.12-slim
      pip: [pandas]
      files: [{src: app/, dest: /app/}]
      workdir: /app
      preload: [pandas]
    """
    from .._sandboxfile import build as do_build

    with _progress(not quiet) as progress:
        record = do_build(path, name, pull=force_pull, progress=progress)
    if as_json:
        print_json(record)
    else:
        _summary(record)


@template.command("ls", short_help="List templates.")
@json_option
def ls(as_json: bool) -> None:
    """List the builtin template and every image template of this machine."""
    from .._images import list_templates

    rows = list_templates()
    if as_json:
        print_json(rows)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "SOURCE", "DIGEST", "PYTHON", "SIZE", "CREATED"):
        table.add_column(column, no_wrap=column in ("NAME", "DIGEST"), overflow="fold")
    for row in rows:
        created = row.get("created")
        if created:
            with contextlib.suppress(ValueError):
                created = datetime.datetime.fromisoformat(created).astimezone().strftime("%Y-%m-%d %H:%M")
        source = row.get("source") or ""
        if row.get("ref") and source != "builtin":
            source = f"{source} {row['ref']}"
        elif source == "builtin":
            source = "builtin (this machine's interpreter)"
        digest = (row.get("digest") or "").split(":")[-1][:12]
        python = row.get("python_version") or "none"
        table.add_row(escape(row["name"]), escape(source), escape(digest), escape(python),
                      _size(row.get("size")), escape(created or ""))
    out.print(table)


@template.command(short_help="Remove a template (and its root, when nothing else uses it).")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove it even while sandboxes of it still run (they break).")
def rm(name: str, force: bool) -> None:
    """Remove template NAME: its record, its tag in the image cache, and its root filesystem and
    blobs once no other template uses them. Refuses while sandboxes of it still run."""
    from .._images import remove

    remove(name, force=force)
    err.print(f"removed template {escape(name)}")
