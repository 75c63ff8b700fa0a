"""The `sandlot` command line. For now: `sandlot doctor`."""

from __future__ import annotations

import dataclasses
import json
import sys

import click
from rich.console import Console
from rich.table import Table

from . import _doctor


@click.group()
@click.version_option(package_name="sandlot")
def main() -> None:
    """Sandlot: self-hosted sandboxes for code written by AI agents."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--no-sandbox", is_flag=True, help="Only check the host; do not start a sandbox.")
def doctor(as_json: bool, no_sandbox: bool) -> None:
    """Check what this host supports, then run the posture self-test inside a sandbox.

    Exit code 0: sandboxes run with every required fence; 1: something required is missing.
    """
    host = _doctor.host_checks()
    posture: list[_doctor.Check] = []
    probe_error = None
    if not no_sandbox and all(c.ok for c in host if c.required):
        try:
            posture = _doctor.posture_checks(_doctor.run_posture_probe())
        except Exception as exc:  # noqa: BLE001 - reported, with its reason
            probe_error = f"{type(exc).__name__}: {exc}"
    ok = all(c.ok for c in host + posture if c.required) and probe_error is None
    if as_json:
        click.echo(json.dumps({"ok": ok, "host": [dataclasses.asdict(c) for c in host],
                               "posture": [dataclasses.asdict(c) for c in posture], "probe_error": probe_error},
                              indent=2))
    else:
        console = Console()
        for title, checks in (("Host", host), ("Inside a sandbox", posture)):
            if not checks:
                continue
            table = Table(title=title, title_justify="left")
            table.add_column("check")
            table.add_column("status")
            table.add_column("detail", overflow="fold")
            for c in checks:
                status = "[green]ok[/]" if c.ok else ("[red]MISSING[/]" if c.required else "[yellow]no[/]")
                table.add_row(c.name, status, c.detail)
            console.print(table)
        if probe_error:
            console.print(f"[red]Posture self-test could not run:[/] {probe_error}")
        elif not posture and not no_sandbox:
            console.print("[red]Sandboxes cannot run here:[/] fix the MISSING items above.")
        console.print("[green]All required checks pass.[/]" if ok else "[red]Some required checks fail.[/]")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
