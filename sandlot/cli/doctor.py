"""`sandlot doctor`: what this host supports, and the posture self-test inside a real sandbox."""

from __future__ import annotations

import dataclasses
import sys

import click
from rich.markup import escape
from rich.table import Table

from .. import _doctor
from .._backends.registry import ISOLATIONS
from ._common import EXIT_FAILED, EXIT_OK, json_option, out, print_json


@click.command(short_help="Check this host, and the fences from inside a sandbox.")
@json_option
@click.option("--no-sandbox", is_flag=True, help="Only check the host; do not start a sandbox.")
@click.option("--isolation", type=click.Choice(ISOLATIONS), envvar="SANDLOT_ISOLATION", show_envvar=True,
              default="process", show_default=True, help="The tier whose fences the self-test checks.")
def doctor(as_json: bool, no_sandbox: bool, isolation: str) -> None:
    """Check what this host supports, then run the posture self-test inside a sandbox.

    Exit code 0: sandboxes run with every required fence; 1: something required is missing.
    """
    host = _doctor.host_checks()
    posture: list[_doctor.Check] = []
    probe_error = None
    if not no_sandbox and all(c.ok for c in host if c.required):
        try:
            posture = _doctor.posture_checks(_doctor.run_posture_probe(isolation), isolation=isolation)
        except Exception as exc:  # noqa: BLE001 - reported, with its reason
            probe_error = f"{type(exc).__name__}: {exc}"
    ok = all(c.ok for c in host + posture if c.required) and probe_error is None
    if as_json:
        print_json({"ok": ok, "host": [dataclasses.asdict(c) for c in host],
                    "posture": [dataclasses.asdict(c) for c in posture], "probe_error": probe_error})
    else:
        for title, checks in (("Host", host), ("Inside a sandbox", posture)):
            if not checks:
                continue
            table = Table(title=title, title_justify="left")
            table.add_column("check")
            table.add_column("status")
            table.add_column("detail", overflow="fold")
            for c in checks:
                status = "[green]ok[/]" if c.ok else ("[red]MISSING[/]" if c.required else "[yellow]no[/]")
                table.add_row(escape(c.name), status, escape(c.detail))
            out.print(table)
        if probe_error:
            out.print(f"[red]Posture self-test could not run:[/] {escape(probe_error)}")
        elif not posture and not no_sandbox:
            out.print("[red]Sandboxes cannot run here:[/] fix the MISSING items above.")
        out.print("[green]All required checks pass.[/]" if ok else "[red]Some required checks fail.[/]")
    sys.exit(EXIT_OK if ok else EXIT_FAILED)
