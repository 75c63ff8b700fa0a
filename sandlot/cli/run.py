"""`sandlot run` (Python code in a sandbox) and `sandlot exec` (a shell command in a server's sandbox)."""

from __future__ import annotations

import sys
from typing import Optional

import click
from rich.markup import escape

from ._common import (EXIT_FAILED, EXIT_OK, err, fail_usage, json_option, json_failures, parse_limits,
                      parse_pairs, print_json, stdin_is_terminal)
from .. import run_code
from .._models import Execution
from ._render import ImageSaver, ImagesNotSaved, LiveOutput, execution_dict, show_error, show_results
from ._terminal import for_stream
from .mounts import mounts_of, volume_option
from ._target import (connect_sandbox, create_sandbox, make_target, network_of, network_options, secrets_of,
                      server_options, target_options)

EXIT_LIMIT = 124  # `exec`: a limit (timeout, output cap) ended the command, as timeout(1) reports it


def _read_code(code: Optional[str], file: Optional[str]) -> str:
    if code is not None and file is not None:
        fail_usage("give the code as an argument or with --file, not both")
    if file is not None:
        if file == "-":
            return sys.stdin.read()
        try:
            with open(file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            fail_usage(f"cannot read {file}: {exc.strerror}")
    if code == "-" or (code is None and not stdin_is_terminal()):
        return sys.stdin.read()
    if code is None:
        fail_usage("give code to run: `sandlot run 'print(1)'`, `--file script.py`, or pipe it on stdin")
    return code  # type: ignore[return-value]


@click.command(short_help="Run Python code in a sandbox (argument, file or stdin).")
@click.argument("code", required=False)
@click.option("-f", "--file", "file", metavar="PATH", help="Run the code in this file ('-' for stdin).")
@click.option("--template", default="python", show_default=True, help="Sandbox template.")
@click.option("--timeout", type=float, metavar="SECONDS", help="Wall-time limit of the call (default 60).")
@click.option("--limit", "limits", multiple=True, metavar="NAME=VALUE",
              help="Override a limit, e.g. --limit memory=2G --limit cpu=2 (repeatable).")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment variable (repeatable).")
@click.option("--save-images", metavar="DIR", help="Save images (charts) the code displays into DIR.")
@click.option("--sandbox", "sandbox_id", metavar="ID", help="Run in this live sandbox on the server (kept afterwards).")
@volume_option
@network_options
@json_option
@target_options
def run(code: Optional[str], file: Optional[str], template: str, timeout: Optional[float], limits: tuple[str, ...],
        env: tuple[str, ...], save_images: Optional[str], sandbox_id: Optional[str], volumes: tuple[str, ...],
        network: Optional[str],
        allow: tuple[str, ...], deny: tuple[str, ...], secrets: tuple[str, ...], as_json: bool,
        api_url: Optional[str], api_key: Optional[str]) -> None:
    """Run Python CODE in a fresh sandbox (or in --sandbox ID) and print what it prints.

    CODE is an argument, a file (--file), or stdin. Output streams while the code runs; the value
    of the last expression is printed at the end, like a notebook's Out[n].

    Exit code: 0 the code ran, 1 it raised (or hit a limit), 2 usage error, 3 Sandlot failed;
    sys.exit(N) in the code exits N, as `python -c` does. With --json, stdout is one JSON object,
    also when Sandlot fails or the request is refused ("ok": false, "error": {"type", "message"}).
    """
    with json_failures(as_json):
        _run(code, file, template, timeout, limits, env, save_images, sandbox_id, volumes, network, allow, deny,
             secrets, as_json, api_url, api_key)


def _run(code: Optional[str], file: Optional[str], template: str, timeout: Optional[float], limits: tuple[str, ...],
         env: tuple[str, ...], save_images: Optional[str], sandbox_id: Optional[str], volumes: tuple[str, ...],
         network: Optional[str], allow: tuple[str, ...], deny: tuple[str, ...], secrets: tuple[str, ...],
         as_json: bool, api_url: Optional[str], api_key: Optional[str]) -> None:
    source = _read_code(code, file)
    target = make_target(api_url, api_key)
    grants = {"network": network_of(network, allow, deny), "secrets": secrets_of(secrets),
              "mounts": mounts_of(volumes)}
    if sandbox_id and (grants["network"] is not None or grants["secrets"] or grants["mounts"]):
        fail_usage("--network/--allow/--deny/--secret/-v apply to a new sandbox, not to --sandbox ID")
    live = LiveOutput(enabled=not as_json)
    saver = ImageSaver(save_images)
    try:
        saver.check()  # before the code runs: a directory that cannot be written is the caller's mistake
    except ImagesNotSaved as exc:
        fail_usage(str(exc))
    sandbox_used: Optional[str] = sandbox_id
    if sandbox_id:
        execution = connect_sandbox(target, sandbox_id, "run --sandbox", quiet=as_json).run_code(
            source, timeout=timeout, **live.callbacks())
    elif target.remote and not any(value for value in grants.values()):
        # One request to the server's one-shot endpoint: nothing is left behind if this process dies.
        execution = run_code(source, template=template, timeout=timeout, limits=parse_limits(limits),
                             env=parse_pairs(env, "--env") or None, **target.credentials(), **live.callbacks())
    else:
        sandbox = create_sandbox(target, template, limits=parse_limits(limits), env=parse_pairs(env, "--env") or None,
                                 quiet=as_json, **grants)
        sandbox_used = sandbox.sandbox_id
        try:
            execution = sandbox.run_code(source, timeout=timeout, **live.callbacks())
        finally:
            sandbox.kill()
    try:
        if as_json:
            images = [p for r in execution.results for p in saver.save(r)]
            print_json(execution_dict(execution, sandbox_used, images))
        else:
            show_results(execution, saver, live)
    except ImagesNotSaved as exc:
        fail_usage(str(exc))
    if not as_json:
        show_error(execution.error, exits=_is_exit(execution))
    sys.exit(exit_code_of(execution))


def _is_exit(execution: Execution) -> bool:
    error = execution.error
    return error is not None and error.name == "SystemExit" and not error.limit and not error.traceback.strip()


def exit_code_of(execution: Execution) -> int:
    """0 if the code ran, 1 if it raised; sys.exit(N) exits N as `python -c` does (a code that is not an
    integer exits 1, its text printed on stderr by show_error)."""
    if execution.error is None:
        return EXIT_OK
    if _is_exit(execution):
        try:
            return int(execution.error.value) & 0xFF  # as the kernel truncates exit(256)
        except ValueError:
            return EXIT_FAILED
    return EXIT_FAILED


@click.command(name="exec", short_help="Run a shell command in a server's sandbox.", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id", metavar="ID")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=float, metavar="SECONDS", help="Wall-time limit of the command (default 60).")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment variable (repeatable).")
@click.option("--cwd", metavar="DIR", help="Working directory inside the sandbox.")
@click.option("-i", "--stdin", "forward_stdin", is_flag=True, help="Send this program's stdin to the command.")
@json_option
@server_options
def exec_(sandbox_id: str, command: tuple[str, ...], timeout: Optional[float], env: tuple[str, ...],
          cwd: Optional[str], forward_stdin: bool, as_json: bool, api_url: Optional[str],
          api_key: Optional[str]) -> None:
    """Run a shell COMMAND in the live sandbox ID on the server.

    The words of COMMAND are joined with spaces and run by /bin/sh -c, as ssh does:
    `sandlot exec ID 'ls /tmp | wc -l'`. Use `--` before a command that has options.

    Exit code: the command's own (128+N if signal N killed it; 124 if a limit ended it).
    """
    target = make_target(api_url, api_key)
    sandbox = connect_sandbox(target, sandbox_id, "exec", quiet=as_json)
    live = LiveOutput(enabled=not as_json)
    stdin = sys.stdin.buffer.read() if forward_stdin else None
    result = sandbox.commands.run(" ".join(command), timeout=timeout, env=parse_pairs(env, "--env") or None,
                                  cwd=cwd, stdin=stdin, **live.callbacks())
    live.end()
    code = result.exit_code
    # A limit (the timeout, the output cap) kills the command with SIGKILL: that is 124, as timeout(1) reports
    # it, not the 137 of a kill from elsewhere.
    exit_code = EXIT_LIMIT if code is None or result.limit else (128 - code if code < 0 else code)
    if as_json:
        print_json({"sandbox_id": sandbox_id, "exit_code": result.exit_code, "stdout": result.stdout,
                    "stderr": result.stderr, "error": result.error, "limit": result.limit,
                    "truncated": result.truncated})
    elif result.error:
        err.print(f"[red]{escape(for_stream(sys.stderr, result.error) or '')}[/]")
    sys.exit(exit_code)
