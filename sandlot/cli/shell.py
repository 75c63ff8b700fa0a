"""`sandlot shell [ID]`: an interactive Python session in a sandbox.

Variables live in the sandbox's session, so they persist between cells exactly as with the SDK.
Ctrl-C while code runs interrupts it (the session keeps its state); Ctrl-C at the prompt clears the
line; Ctrl-D exits. A line starting with ``!`` runs a shell command in the same sandbox.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
from typing import Any, Optional

import click
from rich.markup import escape

from .._sync import Sandbox
from ._common import err, fail_usage, parse_limits, parse_pairs
from ._render import ImageSaver, ImagesNotSaved, LiveOutput, show_error, show_results
from ._repl_input import CellReader, TerminalReader, make_reader
from ._target import (Target, connect_sandbox, create_sandbox, interrupt, make_target, network_of, network_options,
                      secrets_of, api_options)
from ._terminal import for_stream
from .mounts import mounts_of, volume_option


class Repl:
    """Reads cells and runs them in one sandbox until EOF."""

    def __init__(self, sandbox: Sandbox, reader: CellReader, saver: ImageSaver, timeout: Optional[float]) -> None:
        self.sandbox = sandbox
        self.reader = reader
        self.saver = saver
        self.timeout = timeout
        # One worker runs each call so the main thread stays free to catch Ctrl-C (SIGINT).
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandlot-shell")

    def loop(self) -> None:
        while True:
            try:
                cell = self.reader.read_cell()
            except KeyboardInterrupt:
                err.print("KeyboardInterrupt")
                continue
            except EOFError:
                return
            if cell.lstrip().startswith("!"):
                self.command(cell.lstrip()[1:])
            else:
                self.run(cell)

    def run(self, cell: str) -> None:
        live = LiveOutput()
        execution = self._wait(self.worker.submit(self.sandbox.run_code, cell, timeout=self.timeout,
                                                  **live.callbacks()))
        try:
            show_results(execution, self.saver, live)
        except ImagesNotSaved as exc:  # the session goes on: the next cell may save elsewhere or not at all
            err.print(f"[red]error:[/] {escape(str(exc))}")
        if execution.error is not None:
            if not live.wrote_newline:
                sys.stdout.write("\n")
                sys.stdout.flush()
            show_error(execution.error)

    def command(self, cmd: str) -> None:
        if not cmd.strip():
            return
        live = LiveOutput()
        result = self._wait(self.worker.submit(self.sandbox.commands.run, cmd, timeout=self.timeout,
                                               **live.callbacks()))
        live.end()
        if result.error:
            err.print(f"[red]{escape(for_stream(sys.stderr, result.error) or '')}[/]")
        elif result.exit_code:
            err.print(f"[dim]exit code {result.exit_code}[/]")

    def _wait(self, future: "concurrent.futures.Future[Any]") -> Any:
        """Wait for a call; each Ctrl-C meanwhile interrupts the code in the sandbox."""
        while True:
            try:
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                continue
            except KeyboardInterrupt:
                if not interrupt(self.sandbox):
                    err.print("[yellow]this sandbox cannot be interrupted from here; "
                              "the call's timeout will stop it[/]")

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)


def _take_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt here even if whoever started the shell ignored SIGINT.

    A background job of a script (`cmd &` in a shell without job control: CI steps, tools that drive a
    pty) inherits SIGINT ignored, and Python then installs no handler: at the prompt Ctrl-C still worked
    (prompt_toolkit reads it as a key) but while a cell ran it did nothing at all. The ignore is meant to
    keep the launcher's Ctrl-C away from its background jobs; a shell in the foreground of a terminal is
    the one the keys on that terminal are for.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return
    try:
        in_foreground = os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except OSError:
        return  # no controlling terminal after all: nobody can type a Ctrl-C to us
    if in_foreground:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _banner(sandbox: Sandbox, target: Target, attached: bool) -> None:
    where = f"on {target.api_url}" if target.remote else "on this machine"
    how = "attached to" if attached else "new"
    err.print(f"[bold]Sandlot shell[/] — {how} sandbox [cyan]{sandbox.sandbox_id}[/] {where}\n"
              "[dim]Enter runs a complete cell, Esc+Enter forces it; Ctrl-C interrupts; Ctrl-D exits; "
              "!cmd runs a shell command[/]")


@click.command(short_help="Interactive Python in a sandbox, new or attached.")
@click.argument("sandbox_id", metavar="[ID]", required=False)
@click.option("--template", default="python", show_default=True, help="Template of a new sandbox.")
@click.option("--limit", "limits", multiple=True, metavar="NAME=VALUE", help="Limit of a new sandbox (repeatable).")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment of a new sandbox (repeatable).")
@click.option("--timeout", type=float, metavar="SECONDS", help="Wall-time limit of each cell (default 60).")
@click.option("--save-images", metavar="DIR", help="Save images (charts) the code displays into DIR.")
@click.option("--keep", is_flag=True, help="Leave a new server sandbox running on exit (it prints its ID).")
@volume_option
@network_options
@api_options("Sandlot server to use; without it a new sandbox runs on this machine (attaching to an ID "
             "needs the server that holds it).")
def shell(sandbox_id: Optional[str], template: str, limits: tuple[str, ...], env: tuple[str, ...],
          timeout: Optional[float], save_images: Optional[str], keep: bool, volumes: tuple[str, ...],
          network: Optional[str],
          allow: tuple[str, ...], deny: tuple[str, ...], secrets: tuple[str, ...], api_url: Optional[str],
          api_key: Optional[str]) -> None:
    """An interactive Python session in a new sandbox, or attached to the server's sandbox ID.

    State persists between cells; history is kept in ~/.local/state/sandlot/shell_history.
    A sandbox the shell created ends with it (unless --keep); an attached one keeps running.
    """
    target = make_target(api_url, api_key)
    reader = make_reader()
    interactive = isinstance(reader, TerminalReader)
    if interactive:
        _take_ctrl_c()
    mounts = mounts_of(volumes)
    if sandbox_id and mounts:
        fail_usage("-v applies to a new sandbox, not to an attached one")
    saver = ImageSaver(save_images)
    try:
        saver.check()  # before a sandbox is made for nothing
    except ImagesNotSaved as exc:
        fail_usage(str(exc))
    if sandbox_id:
        sandbox = connect_sandbox(target, sandbox_id, "shell ID", quiet=not interactive)
    else:
        sandbox = create_sandbox(target, template, limits=parse_limits(limits),
                                 env=parse_pairs(env, "--env") or None, quiet=not interactive,
                                 network=network_of(network, allow, deny), secrets=secrets_of(secrets),
                                 mounts=mounts)
    if interactive:
        _banner(sandbox, target, attached=bool(sandbox_id))
    repl = Repl(sandbox, reader, saver, timeout)
    try:
        repl.loop()
    finally:
        repl.close()
        if sandbox_id is None and not (keep and target.remote):
            sandbox.kill()
        elif keep and sandbox_id is None:
            err.print(f"sandbox {sandbox.sandbox_id} keeps running: `sandlot shell {sandbox.sandbox_id}` to return")
