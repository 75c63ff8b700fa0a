"""The command line as a new user meets it in the first hour (issue #10): exit codes a script can trust, --json
that always answers, help that tells the truth, and `sandlot serve` announcing only an address that answers.
The real `sandlot` entry point in subprocesses, real sandboxes, a real server."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import httpx
import pytest

from .cli_server import COMMAND, CliServer
from .cli_server import clean_env as cli_env
from .conftest import PROBLEM, needs_sandbox
from .serverproc import free_port, terminate


def sandlot(*args: str, input: str | None = None, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(COMMAND + list(args), input=input, capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout)


# -- run: exit codes and --json --------------------------------------------------------------------

@needs_sandbox
@pytest.mark.parametrize("code, exit_code, stderr", [
    ("import sys; print('before'); sys.exit(0)", 0, ""),
    ("import sys; sys.exit()", 0, ""),
    ("import sys; sys.exit(3)", 3, ""),
    ("raise SystemExit(5)", 5, ""),
    ("import sys; sys.exit('bye')", 1, "bye\n"),  # Python prints a value that is not an integer, and exits 1
])
def test_run_sys_exit_exits_as_python_does(code, exit_code, stderr):
    r = sandlot("run", code)
    assert (r.returncode, r.stderr) == (exit_code, stderr), r.stderr
    python = subprocess.run(["python3", "-c", code], capture_output=True, text=True)
    assert (python.returncode, python.stderr) == (exit_code, stderr)


@needs_sandbox
def test_run_json_sys_exit_keeps_the_code():
    r = sandlot("run", "--json", "import sys; sys.exit(4)")
    data = json.loads(r.stdout)
    assert r.returncode == 4 and data["ok"] is False and data["error"]["name"] == "SystemExit"
    assert data["error"]["value"] == "4"


def test_run_json_prints_an_object_when_sandlot_fails():
    # Nothing listens there: Sandlot fails (3), and a script still reads one JSON object.
    r = sandlot("run", "--json", "print(1)", env=cli_env(SANDLOT_API_URL=f"http://127.0.0.1:{free_port()}",
                                                         SANDLOT_API_KEY="sl_nothing"))
    assert r.returncode == 3, r.stderr
    data = json.loads(r.stdout)
    assert data["ok"] is False and data["error"]["type"] and data["error"]["message"]
    assert "error" in r.stderr  # people still get their line


@needs_sandbox
def test_run_json_prints_an_object_for_usage_errors_found_while_running():
    r = sandlot("run", "--json", "--limit", "memory=1", "1")
    assert r.returncode == 2
    data = json.loads(r.stdout)
    assert data == {"ok": False, "error": {"type": "InvalidRequest", "message": data["error"]["message"]}}
    assert "memory" in data["error"]["message"]
    r = sandlot("run", "--json", "--file", "/nonexistent/job.py")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["type"] == "UsageError"


@needs_sandbox
def test_run_save_images_into_an_unwritable_place_is_a_usage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    plot = "import sys; print('ran', file=sys.stderr)"
    r = sandlot("run", "--save-images", str(blocker / "charts"), plot)
    assert r.returncode == 2, r.stderr
    assert "--save-images" in r.stderr and "not a directory" in r.stderr
    assert "Traceback" not in r.stderr and "ran" not in r.stderr  # refused before the code runs
    r = sandlot("run", "--json", "--save-images", str(blocker), plot)
    assert r.returncode == 2 and json.loads(r.stdout)["ok"] is False
    r = sandlot("shell", "--save-images", str(blocker / "charts"), input="print('ran')\n")
    assert r.returncode == 2 and "not a directory" in r.stderr and "Traceback" not in r.stderr


# -- help ----------------------------------------------------------------------------------------

def test_help_tells_the_truth():
    keys_help = sandlot("keys", "ls", "--help", env=cli_env(SANDLOT_DATA_DIR="/srv/sandlot-data")).stdout
    assert "/srv/sandlot-data/sandlot.db" in "".join(keys_help.split())  # the real default, not "the server's"
    build = sandlot("template", "build", "--help").stdout
    assert build.startswith("Usage: sandlot template build -t NAME")
    for command in (["ls"], ["kill"], ["exec"], ["cp"]):
        text = " ".join(sandlot(*command, "--help").stdout.split())
        assert "run on this machine" not in text and "required" in text, command
    assert "run on this machine" in " ".join(sandlot("run", "--help").stdout.split())
    assert "paused" in sandlot("ls", "--help").stdout


# -- against a server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if PROBLEM:
        pytest.skip(PROBLEM)
    srv = CliServer(tmp_path_factory.mktemp("cli-first-hour")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def acme(server):
    return cli_env(SANDLOT_API_URL=server.url, SANDLOT_API_KEY=server.key("acme"))


def test_exec_exit_code_is_124_when_a_limit_ends_the_command(server, acme):
    from sandlot import Sandbox

    with Sandbox(api_url=server.url, api_key=acme["SANDLOT_API_KEY"]) as sb:
        sid = sb.sandbox_id
        r = sandlot("exec", "--timeout", "1", sid, "sleep 30", env=acme)
        assert r.returncode == 124, r.stderr
        r = sandlot("exec", "--json", "--timeout", "1", sid, "sleep 30", env=acme)
        assert r.returncode == 124 and json.loads(r.stdout)["limit"] == "timeout"
        r = sandlot("exec", sid, "kill -9 $$", env=acme)  # a signal that is not a limit: 128+N
        assert r.returncode == 137, r.stderr


def test_ls_status_paused_is_accepted(acme):
    r = sandlot("ls", "--status", "paused", env=acme)
    assert r.returncode == 0, r.stderr
    assert json.loads(sandlot("ls", "--status", "paused", "--json", env=acme).stdout) == []


def test_keys_create_json_has_the_id_and_ls_shows_revoked(server):
    db = ["--db", str(server.db)]
    made = json.loads(sandlot("keys", "create", "--tenant", "first-hour", "--json", *db).stdout)
    assert made["key_id"].startswith("k_") and made["key"].startswith("sl_")
    other = json.loads(sandlot("keys", "create", "--tenant", "first-hour", "--json", *db).stdout)
    assert sandlot("keys", "revoke", made["key_id"], *db).returncode == 0  # the id revokes that key, no other
    rows = {k["key_id"]: k for k in json.loads(sandlot("keys", "ls", "--tenant", "first-hour", "--json", *db).stdout)}
    assert (rows[made["key_id"]]["status"], rows[other["key_id"]]["status"]) == ("revoked", "active")
    table = sandlot("keys", "ls", "--tenant", "first-hour", *db).stdout
    line = {ln.split()[0]: ln.split() for ln in table.splitlines()[1:]}
    assert line[made["key_id"]][1] == "revoked" and line[other["key_id"]][1] == "active"
    operator = json.loads(sandlot("keys", "create", "--operator", "--json", *db).stdout)
    assert operator["key_id"].startswith("k_") and operator["role"] == "operator"


def _serve(db, port) -> subprocess.Popen:
    return subprocess.Popen(COMMAND + ["serve", "--port", str(port), "--db", str(db), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env())


def _first_line_or_exit(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The line that mentions the address, or '' if the server exits without one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            return ""
        if "http://" in line:
            return line
    raise AssertionError("sandlot serve said nothing in time")


def test_serve_announces_its_address_only_once_it_answers(tmp_path):
    if PROBLEM:
        pytest.skip(PROBLEM)
    port = free_port()
    proc = _serve(tmp_path / "a.db", port)
    try:
        line = _first_line_or_exit(proc)
        assert f"listening on http://127.0.0.1:{port}" in line
        # The moment it says so, it answers: the database is locked and the port bound.
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        # A second server on the same database, and one on a taken port, never claim to listen.
        second = _serve(tmp_path / "a.db", free_port())
        assert "listening" not in _first_line_or_exit(second) and second.wait(60) != 0
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            third = _serve(tmp_path / "b.db", taken.getsockname()[1])
            assert "listening" not in _first_line_or_exit(third) and third.wait(60) != 0
    finally:
        terminate(proc)


def test_remote_run_exits_with_sys_exit_code_and_json_on_failure(acme):
    r = sandlot("run", "import sys; sys.exit(3)", env=acme)
    assert (r.returncode, r.stderr) == (3, ""), r.stderr
    r = sandlot("run", "--json", "1", env=dict(acme, SANDLOT_API_KEY="sl_wrong"))
    assert r.returncode == 3 and json.loads(r.stdout)["error"]["type"] == "AuthError"
