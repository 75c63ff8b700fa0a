"""Terminal escapes from a sandbox never reach the operator's terminal through the CLI.

The real `sandlot` CLI (this checkout's, as `python -m sandlot.cli`) runs on a real pseudo-terminal
(os.openpty) for stdout and stderr; the code in the sandbox prints OSC 52 (a clipboard write), OSC 8,
a title change, cursor moves and screen clears, DCS, C0 and C1 controls, on stdout, on stderr, in a
result's repr and in an exception message. On the terminal each must show up visibly (as ``\\x1b``...)
with newlines, tabs, UTF-8 and plain SGR colours kept; through a pipe the output stays byte-exact.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandlot import Sandbox

from .cli_server import CliServer, clean_env
from .conftest import PROBLEM, needs_sandbox

pytestmark = [needs_sandbox]

CHECKOUT = Path(__file__).resolve().parents[1]
# This checkout's package, not whichever one the venv's `sandlot` script would import.
COMMAND = [sys.executable, "-m", "sandlot.cli"]

OSC52 = "\x1b]52;c;SGVsbG8gZnJvbSB0aGUgc2FuZGJveA==\x07"  # "Hello from the sandbox" onto the clipboard
HOSTILE = (OSC52 + "\x1b]8;;https://example.invalid/\x1b\\link\x1b]8;;\x1b\\"  # OSC 8 hyperlink
           + "\x1b]0;pwned title\x07"  # window title
           + "\x1b[2J\x1b[H\x1b[5A"  # clear screen, cursor home, cursor up
           + "\x1bP+q544e\x1b\\"  # DCS (XTGETTCAP)
           + "\x9b6n"  # C1 CSI (device status report: makes the terminal *type* an answer)
           + "\x07\x08\x0e")  # bell, backspace, shift-out
FRIENDLY = "tab\there, caf\u00e9 \u2603 \U0001f600 \x1b[1;31mred\x1b[0m\n"

CODE = f"""
import sys
sys.stdout.write({HOSTILE!r} + {FRIENDLY!r})
sys.stdout.flush()
sys.stderr.write({OSC52!r} + "err\\n")
sys.stderr.flush()
class Shown:
    def __repr__(self):
        return {OSC52!r} + "repr"
print("line two")
Shown()
"""
RAISES = f"raise ValueError({OSC52!r} + 'in the error')"


def _env(**extra: str) -> dict[str, str]:
    env = clean_env(PYTHONPATH=str(CHECKOUT), TERM="xterm-256color", COLUMNS="120", LINES="40", **extra)
    env.pop("SANDLOT_ISOLATION", None)
    return env


def run_on_terminal(*args: str, timeout: float = 120, env: dict | None = None) -> tuple[int, bytes]:
    """Run the CLI with stdout and stderr on a fresh pseudo-terminal; return (exit code, what the terminal got)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(COMMAND + list(args), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                env=env or _env(), cwd=str(CHECKOUT), start_new_session=True)
    finally:
        os.close(slave)
    seen = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                seen += data
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, bytes(seen)


def run_piped(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(COMMAND + list(args), stdin=subprocess.DEVNULL, capture_output=True, env=env or _env(),
                          cwd=str(CHECKOUT), timeout=timeout)


def _assert_neutralised(screen: bytes) -> None:
    # Nothing that starts a control sequence reaches the terminal, except plain SGR colours.
    assert b"\x1b]" not in screen, screen  # no OSC at all: no clipboard, hyperlink or title
    assert b"\x1bP" not in screen and b"\xc2\x9b" not in screen, screen  # no DCS, no C1 CSI
    assert b"\x1b[2J" not in screen and b"\x1b[H" not in screen and b"\x1b[5A" not in screen, screen
    assert b"\x07" not in screen and b"\x08" not in screen and b"\x0e" not in screen, screen
    # ...and they are shown, so the operator sees that the code tried.
    assert screen.count(b"\\x1b]52;c;SGVsbG8gZnJvbSB0aGUgc2FuZGJveA==\\x07") >= 2, screen
    assert b"\\x9b6n" in screen and b"\\x1b[2J" in screen, screen


@needs_sandbox
def test_run_on_a_terminal_shows_escapes_instead_of_obeying_them():
    code, screen = run_on_terminal("run", CODE)
    assert code == 0, screen
    _assert_neutralised(screen)
    assert b"\\x1b]52;c;SGVsbG8gZnJvbSB0aGUgc2FuZGJveA==\\x07repr" in screen  # the result's repr
    # Ordinary text survives: UTF-8, tabs, newlines (the terminal shows \n as \r\n), SGR colours.
    assert "tab\there, caf\u00e9 \u2603 \U0001f600 \x1b[1;31mred\x1b[0m\r\n".encode() in screen, screen
    assert b"line two\r\n" in screen and b"err\r\n" in screen


@needs_sandbox
def test_run_error_message_on_a_terminal_is_neutralised():
    code, screen = run_on_terminal("run", RAISES)
    assert code == 1, screen
    assert b"\x1b]52" not in screen and b"\x07" not in screen, screen
    assert b"\\x1b]52;c;SGVsbG8gZnJvbSB0aGUgc2FuZGJveA==\\x07in the error" in screen, screen


@needs_sandbox
def test_run_through_a_pipe_is_byte_exact():
    r = run_piped("run", CODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (HOSTILE + FRIENDLY + "line two\n" + OSC52 + "repr\n").encode()
    assert r.stderr.endswith((OSC52 + "err\n").encode()), r.stderr
    r = run_piped("run", "--json", CODE)
    assert r.returncode == 0, r.stderr
    import json
    assert json.loads(r.stdout)["stdout"] == HOSTILE + FRIENDLY + "line two\n"


# -- exec and cp, against a real server ----------------------------------------------------------------

@pytest.fixture(scope="module")
def server_sandbox(tmp_path_factory):
    """A live sandbox on a real `sandlot serve`, holding a file full of escapes; and the client's environment."""
    if PROBLEM:
        pytest.skip(PROBLEM)
    server = CliServer(tmp_path_factory.mktemp("cli-terminal-server")).start()
    try:
        key = server.key("terminal")
        with Sandbox(api_url=server.url, api_key=key) as sb:
            sb.files.write("/home/user/hostile.txt", (HOSTILE + FRIENDLY).encode())
            yield sb.sandbox_id, _env(SANDLOT_API_URL=server.url, SANDLOT_API_KEY=key)
    finally:
        server.stop()


def test_exec_on_a_terminal_is_neutralised_and_byte_exact_through_a_pipe(server_sandbox):
    sid, env = server_sandbox
    command = "cat /home/user/hostile.txt; cat /home/user/hostile.txt >&2"
    code, screen = run_on_terminal("exec", sid, command, env=env)
    assert code == 0, screen
    assert screen.count(b"\\x1b]52;c;SGVsbG8gZnJvbSB0aGUgc2FuZGJveA==\\x07") == 2 and b"\\x9b6n" in screen, screen
    assert b"\x1b]" not in screen and b"\xc2\x9b" not in screen, screen
    assert b"\x1b[2J" not in screen and b"\x07" not in screen, screen
    assert "caf\u00e9 \u2603 \U0001f600 \x1b[1;31mred\x1b[0m\r\n".encode() in screen, screen
    r = run_piped("exec", sid, command, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (HOSTILE + FRIENDLY).encode() and r.stderr == (HOSTILE + FRIENDLY).encode()


def test_cp_to_stdout_on_a_terminal_is_neutralised_and_byte_exact_into_a_file(server_sandbox, tmp_path):
    sid, env = server_sandbox
    code, screen = run_on_terminal("cp", "-q", f"{sid}:/home/user/hostile.txt", "-", env=env)
    assert code == 0, screen
    assert b"\x1b]" not in screen and b"\x07" not in screen, screen
    assert b"\\x1b]52;c;SGVsbG8gZnJvbSB0aGUgc2FuZGJveA==\\x07" in screen, screen
    r = run_piped("cp", "-q", f"{sid}:/home/user/hostile.txt", "-", env=env)
    assert r.returncode == 0 and r.stdout == (HOSTILE + FRIENDLY).encode(), r.stderr
    r = run_piped("cp", "-q", f"{sid}:/home/user/hostile.txt", str(tmp_path / "copy.txt"), env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "copy.txt").read_bytes() == (HOSTILE + FRIENDLY).encode()


def test_an_escape_split_across_chunks_is_still_shown_or_kept_whole():
    from sandlot.cli._terminal import SGR_RESET, TerminalText

    stream = TerminalText()
    shown = stream.feed("a\x1b[1;3") + stream.feed("1mred") + stream.feed("\x1b") + stream.feed("]52;c;QQ==\x07")
    assert shown == "a\x1b[1;31mred\\x1b]52;c;QQ==\\x07"
    assert stream.end() == SGR_RESET  # the colour it set stops with its output
    stream = TerminalText()
    assert stream.feed("tail\x1b") == "tail" and stream.end() == "\\x1b"  # a lone ESC at the end is shown
