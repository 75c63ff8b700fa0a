"""What every command shares: exit codes, consoles, the local/remote switch, error reporting.

Exit codes mean the same thing in every command, so scripts can branch on them:
0 success, 1 the user's code (or check) failed, 2 usage error, 3 Sandlot itself failed
(sandbox crashed, not found, auth, quota, server unreachable). `exec` passes the command's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import sys
from typing import Any, Callable, Iterator, Optional, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from .._exceptions import InvalidRequest, SandlotError

EXIT_OK = 0
EXIT_FAILED = 1  # the user's code raised, or a check failed
EXIT_USAGE = 2  # click's own code for usage errors; also InvalidRequest (a bad limit, path...)
EXIT_SANDLOT = 3  # Sandlot could not do what was asked
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

# Rich writes human output; stdout stays clean for program output and --json. Piped into grep or a
# file, tables keep whole lines instead of being cut to an imagined 80-column terminal.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1000)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


class SandlotGroup(click.Group):
    """A click group that turns Sandlot's exceptions into exit codes with one readable line, and lists
    its commands in the order they were added (the order of a session's work, not the alphabet)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvalidRequest as exc:
            # The caller asked for something malformed (a limit out of range, a bad path): usage.
            err.print(f"[red]error:[/] {escape(str(exc))}")
            ctx.exit(EXIT_USAGE)
        except SandlotError as exc:
            err.print(f"[red]error:[/] {type(exc).__name__}: {escape(str(exc))}")
            ctx.exit(EXIT_SANDLOT)
        except KeyboardInterrupt:
            # Ctrl-C: whatever this command started has been cleaned up by its own `finally`.
            err.print("interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except _transport_errors() as exc:
            # The remote SDK should map these onto SandlotError; if one slips through it is
            # still "the server could not be reached", not a traceback.
            err.print(f"[red]error:[/] cannot reach the Sandlot server: {escape(str(exc))}")
            ctx.exit(EXIT_SANDLOT)


def _transport_errors() -> tuple[type[BaseException], ...]:
    try:
        import httpx

        return (httpx.TransportError,)
    except ImportError:  # pragma: no cover - httpx is a dependency
        return ()


def print_json(value: Any) -> None:
    click.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=False))


def to_jsonable(value: Any) -> Any:
    """Dataclasses, pydantic models, enums and plain objects -> JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if hasattr(value, "model_dump"):
        return to_jsonable(value.model_dump())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "__dict__"):
        return {k: to_jsonable(v) for k, v in vars(value).items() if not k.startswith("_")}
    return str(value)


@contextlib.contextmanager
def json_failures(as_json: bool) -> Iterator[None]:
    """With --json, a failure that is not the code's (Sandlot's, the server's, a usage error found while
    running) still prints one JSON object on stdout, ``{"ok": false, "error": {"type", "message"}}``, so a
    script never reads an empty stdout; the exception then goes on to its usual message and exit code."""
    try:
        yield
    except (SandlotError, click.ClickException, *_transport_errors()) as exc:
        if as_json:
            kind = "UsageError" if isinstance(exc, click.ClickException) else type(exc).__name__
            message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
            print_json({"ok": False, "error": {"type": kind, "message": message}})
        raise


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(f)


@contextlib.contextmanager
def spinner(message: str, enabled: bool = True) -> Iterator[None]:
    """A transient spinner on stderr for slow steps (sandbox start); silent when stderr is not a terminal."""
    if enabled and err.is_terminal:
        with err.status(message):
            yield
    else:
        yield


def fail_usage(message: str) -> None:
    """A usage error: exit 2 with click's formatting."""
    raise click.UsageError(message)


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    """``("A=1", "B=2")`` -> ``{"A": "1", "B": "2"}`` for --env / --limit / --metadata."""
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail_usage(f"{what} must look like KEY=VALUE, got {pair!r}")
        found[key] = value
    return found


def parse_limits(pairs: tuple[str, ...]) -> Optional[dict[str, Any]]:
    """``--limit memory=2G --limit cpu=0.5``: sizes stay strings (the SDK parses them), numbers become numbers."""
    if not pairs:
        return None
    limits: dict[str, Any] = {}
    for key, raw in parse_pairs(pairs, "--limit").items():
        try:
            limits[key] = int(raw)
        except ValueError:
            try:
                limits[key] = float(raw)
            except ValueError:
                limits[key] = raw
    return limits


def stdin_is_terminal() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, ValueError, OSError):
        return False
