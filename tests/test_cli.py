"""The `sandlot` command line through its real entry point (the installed script), on real sandboxes:
locally, and against a real `sandlot serve` on loopback for the commands that work on a server."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time

import pytest

from sandlot import Sandbox

from .cli_server import COMMAND, CliServer
from .cli_server import clean_env as cli_env
from .conftest import PROBLEM, needs_sandbox


def sandlot(*args: str, input: str | None = None, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(COMMAND + list(args), input=input, capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout)


# -- run -------------------------------------------------------------------------------------------

@needs_sandbox
def test_run_argument_streams_output_and_prints_the_value():
    r = sandlot("run", "import sys; print('hi'); print('oops', file=sys.stderr); 6 * 7")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hi\n42\n"
    assert "oops" in r.stderr


@needs_sandbox
def test_run_file_and_stdin(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("total = sum(range(10))\nprint('total', total)\n")
    r = sandlot("run", "--file", str(script))
    assert (r.returncode, r.stdout) == (0, "total 45\n"), r.stderr
    r = sandlot("run", input="print(2 ** 10)\n")
    assert (r.returncode, r.stdout) == (0, "1024\n"), r.stderr
    r = sandlot("run", "-", input="print('dash')\n")
    assert (r.returncode, r.stdout) == (0, "dash\n"), r.stderr


@needs_sandbox
def test_run_exit_codes():
    r = sandlot("run", "def f():\n    1 / 0\nf()")
    assert r.returncode == 1
    assert "ZeroDivisionError: division by zero" in r.stderr and 'File "<cell-1>", line 2, in f' in r.stderr
    r = sandlot("run", "raise SystemExit(5)")  # as `python -c` exits
    assert (r.returncode, r.stderr) == (5, "")
    # Usage errors: exit 2, with a message that says what to do.
    r = sandlot("run", "1", "--file", "x.py")
    assert r.returncode == 2 and "not both" in r.stderr
    r = sandlot("run", "--file", "/nonexistent/job.py")
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = sandlot("run", "--limit", "memory=1", "1")  # an absurd limit is the caller's mistake
    assert r.returncode == 2 and "memory" in r.stderr
    r = sandlot("run", "--env", "NOEQUALS", "1")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr


@needs_sandbox
def test_run_json_env_limits_and_timeout():
    r = sandlot("run", "--json", "--env", "GREETING=hello", "--limit", "memory=256M",
                "import os; print(os.environ['GREETING']); {'a': 1}")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["ok"] is True and data["error"] is None
    assert data["stdout"] == "hello\n" and data["text"] == "{'a': 1}"
    assert data["sandbox_id"].startswith("sb-") and data["usage"]["wall_seconds"] > 0
    r = sandlot("run", "--json", "--timeout", "1", "import time; time.sleep(30)")
    assert r.returncode == 1
    error = json.loads(r.stdout)["error"]
    assert error["name"] == "TimeoutError" and error["limit"] == "timeout"


@needs_sandbox
def test_run_saves_images(tmp_path):
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()\nprint('drawn')"
    r = sandlot("run", "--save-images", str(tmp_path / "out"), code, timeout=90)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "drawn\n"
    png = (tmp_path / "out" / "image-1.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    r = sandlot("run", "--json", code, timeout=90)
    result = json.loads(r.stdout)["results"][0]
    assert base64.b64decode(result["png"]).startswith(b"\x89PNG")


@needs_sandbox
def test_run_output_arrives_while_the_code_runs():
    proc = subprocess.Popen(COMMAND + ["run", "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        first = proc.stdout.readline()
        seen_at = time.monotonic()
        rest, _ = proc.communicate(timeout=30)
        ended_at = time.monotonic()
    finally:
        proc.kill()
    assert first == "first\n" and rest == "second\n"
    assert ended_at - seen_at > 2  # the first line came before the sleep ended, not with the rest


# -- doctor ----------------------------------------------------------------------------------------

@needs_sandbox
def test_doctor_tables():
    """The human form (test_posture checks `doctor --json`): both tables, and a verdict that matches the exit code."""
    r = sandlot("doctor", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Host" in r.stdout and "Inside a sandbox" in r.stdout and "seccomp filter" in r.stdout
    assert r.stdout.rstrip().endswith("All required checks pass.")


def test_version_and_help():
    r = sandlot("--version")
    assert r.returncode == 0 and "version" in r.stdout
    r = sandlot("--help")
    for command in ("run", "exec", "shell", "ls", "kill", "cp", "serve", "keys", "mcp", "doctor"):
        assert f"  {command} " in r.stdout


# -- shell -----------------------------------------------------------------------------------------

@needs_sandbox
def test_shell_from_a_pipe_keeps_state():
    cells = "x = 41\nfor i in range(2):\n    x += i\n\ndef double(v):\n    return 2 * v\n\nprint('x is', x)\n" \
            "1 / 0\n!echo from-the-shell\ndouble(x)\n"
    r = sandlot("shell", input=cells)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["x is 42", "from-the-shell", "84"]
    assert "ZeroDivisionError" in r.stderr  # an error does not end the session


def spawn_shell_on_a_terminal(tmp_path, sigint=signal.SIG_DFL):
    """`sandlot shell` on a pty of its own. ``sigint``: the disposition of SIGINT it inherits (whatever the
    test runner's is otherwise: a runner started as a script's background job ignores it)."""
    import pexpect
    env = cli_env(TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", XDG_STATE_HOME=str(tmp_path))
    return pexpect.spawn(COMMAND[0], COMMAND[1:] + ["shell"], env=env, encoding="utf-8", timeout=30,
                         dimensions=(40, 200), preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def interrupt_a_running_cell(child) -> None:
    """Ctrl-C once the cell runs (it says so), not while it is on its way: a loaded host may take longer
    than any fixed pause to start it, and a Ctrl-C before that has no running code to interrupt."""
    child.send("import time; print('cell', 'started', flush=True); time.sleep(60)\r")
    child.expect_exact("cell started")
    time.sleep(0.3)
    started = time.monotonic()
    child.sendintr()  # Ctrl-C interrupts the code, not the shell
    child.expect_exact("KeyboardInterrupt")
    assert time.monotonic() - started < 10
    child.expect_exact(">>>")


@needs_sandbox
def test_shell_on_a_terminal(tmp_path):
    """Drive the prompt_toolkit shell through a real pty: multi-line cells, Ctrl-C, history, Ctrl-D."""
    pexpect = pytest.importorskip("pexpect")
    child = spawn_shell_on_a_terminal(tmp_path)
    try:
        child.expect_exact(">>>", timeout=120)  # the first sandbox of a cold host waits for the zygote's preload
        child.send("value = 21\r")
        child.expect_exact(">>>")
        child.send("if value:\r")  # incomplete: Enter opens an indented line
        child.send("print('block', value * 2)\r")
        child.send("\r")  # a blank line ends the block
        child.expect_exact("block 42")
        child.expect_exact(">>>")
        interrupt_a_running_cell(child)
        child.send("value + 1\r")
        child.expect_exact("22")  # the session kept its variables
        child.expect_exact(">>>")
        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    history = (tmp_path / "sandlot" / "shell_history").read_text()
    assert "value = 21" in history and "print('block', value * 2)" in history


@needs_sandbox
def test_shell_ctrl_c_interrupts_even_when_started_with_sigint_ignored(tmp_path):
    """A background job of a script (`cmd &` in a shell without job control, as CI steps and tools run
    commands) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler. The shell
    on a terminal of its own must still stop a cell on Ctrl-C (it used to do nothing); the session goes on."""
    pexpect = pytest.importorskip("pexpect")
    child = spawn_shell_on_a_terminal(tmp_path, sigint=signal.SIG_IGN)
    try:
        child.expect_exact(">>>", timeout=120)
        child.send("value = 21\r")
        child.expect_exact(">>>")
        interrupt_a_running_cell(child)
        child.send("value + 1\r")
        child.expect_exact("22")
        child.expect_exact(">>>")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# -- commands that need a server -------------------------------------------------------------------

@pytest.mark.parametrize("args", [["ls"], ["kill", "sb-x"], ["exec", "sb-x", "ls"], ["cp", "f", "sb-x:/tmp/f"],
                                  ["shell", "sb-x"], ["run", "--sandbox", "sb-x", "1"]])
def test_server_commands_without_a_server_are_usage_errors(args):
    r = sandlot(*args)
    assert r.returncode == 2
    assert "--api-url" in r.stderr and "SANDLOT_API_URL" in r.stderr


def test_cp_needs_exactly_one_sandbox_path():
    r = sandlot("cp", "a", "b", env=cli_env(SANDLOT_API_URL="http://127.0.0.1:9"))
    assert r.returncode == 2 and "ID:/path" in r.stderr


# -- against a server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if PROBLEM:
        pytest.skip(PROBLEM)
    srv = CliServer(tmp_path_factory.mktemp("cli-server")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def acme(server):
    """The environment of a client of tenant "acme" (SANDLOT_API_URL / SANDLOT_API_KEY)."""
    return cli_env(SANDLOT_API_URL=server.url, SANDLOT_API_KEY=server.key("acme"))


def test_keys_create_ls_revoke(server):
    db = ["--db", str(server.db)]
    key = server.key("keys-test")
    assert key.startswith("sl_")
    rows = json.loads(sandlot("keys", "ls", "--tenant", "keys-test", "--json", *db).stdout)
    assert len(rows) == 1 and rows[0]["tenant"] == "keys-test" and rows[0]["revoked_at"] is None
    assert key not in json.dumps(rows)  # only a hint of the key is ever shown again
    env = cli_env(SANDLOT_API_URL=server.url, SANDLOT_API_KEY=key)
    assert sandlot("ls", env=env).returncode == 0
    r = sandlot("keys", "revoke", rows[0]["key_id"], *db)
    assert r.returncode == 0 and "revoked" in r.stderr
    r = sandlot("ls", env=env)
    assert r.returncode == 3 and "AuthError" in r.stderr
    assert sandlot("keys", "revoke", rows[0]["key_id"], *db).returncode == 3  # nothing left to revoke
    table = sandlot("keys", "ls", *db).stdout
    assert "keys-test" in table and rows[0]["key_id"] in table


def test_remote_run(acme):
    r = sandlot("run", "import os; print(os.environ['WHO']); 40 + 2", "--env", "WHO=server", env=acme)
    assert (r.returncode, r.stdout) == (0, "server\n42\n"), r.stderr
    r = sandlot("run", "--json", "1 / 0", env=acme)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["name"] == "ZeroDivisionError"
    r = sandlot("run", "1", env=dict(acme, SANDLOT_API_KEY="sl_wrong"))
    assert r.returncode == 3 and "AuthError" in r.stderr
    r = sandlot("run", "1", env=dict(acme, SANDLOT_API_URL="http://127.0.0.1:9"))  # nothing listens there
    assert r.returncode == 3 and "error" in r.stderr


def test_remote_session_exec_cp_shell_ls_kill(server, acme, tmp_path):
    with Sandbox(metadata={"job": "cli-test"}, api_url=server.url, api_key=acme["SANDLOT_API_KEY"]) as sb:
        sid = sb.sandbox_id
        # ls: the table and the JSON both show it, with its metadata
        assert sid in sandlot("ls", env=acme).stdout
        listed = json.loads(sandlot("ls", "--json", "--metadata", "job=cli-test", env=acme).stdout)
        assert [i["sandbox_id"] for i in listed] == [sid] and listed[0]["metadata"] == {"job": "cli-test"}
        # exec: the command's output and exit code; stdin on request
        r = sandlot("exec", sid, "echo out; echo err >&2; exit 7", env=acme)
        assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
        r = sandlot("exec", "-i", sid, "--", "wc", "-c", input="12345", env=acme)
        assert (r.returncode, r.stdout.strip()) == (0, "5")
        # cp: both directions, streamed, bytes intact; into a directory keeps the name
        payload = tmp_path / "payload.bin"
        payload.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
        r = sandlot("cp", str(payload), f"{sid}:/home/user/", env=acme)
        assert r.returncode == 0, r.stderr
        assert sb.files.stat("/home/user/payload.bin").size == 1024 * 1024
        r = sandlot("cp", "--json", f"{sid}:/home/user/payload.bin", str(tmp_path / "back.bin"), env=acme)
        assert json.loads(r.stdout)["bytes"] == 1024 * 1024
        assert (tmp_path / "back.bin").read_bytes() == payload.read_bytes()
        r = subprocess.run(COMMAND + ["cp", f"{sid}:/home/user/payload.bin", "-"], capture_output=True, env=acme)
        assert r.stdout == payload.read_bytes()
        r = sandlot("cp", f"{sid}:/home/user/missing", str(tmp_path), env=acme)
        assert r.returncode == 3 and "missing" in r.stderr
        # shell ID: attaches to the live session; the sandbox outlives the shell
        r = sandlot("shell", sid, input="shared = 'from the shell'\n", env=acme)
        assert r.returncode == 0, r.stderr
        assert sb.run_code("shared").text == "'from the shell'"
        r = sandlot("run", "--sandbox", sid, "print(shared.upper())", env=acme)
        assert r.stdout == "FROM THE SHELL\n"
        # another tenant cannot tell it exists
        other = cli_env(SANDLOT_API_URL=server.url, SANDLOT_API_KEY=server.key("other"))
        r = sandlot("exec", sid, "true", env=other)
        assert r.returncode == 3 and "SandboxNotFound" in r.stderr
        # kill: ends it; using it afterwards is a Sandlot error that says why
        r = sandlot("kill", sid, env=acme)
        assert r.returncode == 0
        r = sandlot("exec", sid, "true", env=acme)
        assert r.returncode == 3 and "killed" in r.stderr
        ended = json.loads(sandlot("ls", "--json", "--status", "ended", env=acme).stdout)
        assert sid in [i["sandbox_id"] for i in ended]


# -- serve's options -------------------------------------------------------------------------------

def test_serve_refuses_an_unknown_isolation_tier(tmp_path):
    r = sandlot("serve", "--port", "0", "--db", str(tmp_path / "s.db"), "--isolations", "process,kvm")
    assert r.returncode == 2
    assert "unknown tier 'kvm'" in r.stderr and "process, gvisor" in r.stderr


@needs_sandbox
def test_serve_offers_the_isolation_tiers_it_is_given(tmp_path):
    import httpx

    from .conftest import RUNSC_MISSING

    srv = CliServer(tmp_path).start("--isolations", "process,gvisor")
    try:
        assert "isolation tiers: process, gvisor" in srv.log()
        headers = {"Authorization": f"Bearer {srv.key('tiers')}"}
        with httpx.Client(base_url=srv.url, headers=headers, timeout=120) as client:
            assert client.get("/v1/info").json()["isolations"] == ["process", "gvisor"]
            if RUNSC_MISSING:
                pytest.skip(f"the server offers gvisor; a sandbox of it needs runsc: {RUNSC_MISSING}")
            created = client.post("/v1/sandboxes", json={"isolation": "gvisor"})
            assert created.status_code == 201 and created.json()["isolation"] == "gvisor", created.text
            sid = created.json()["sandbox_id"]
            try:
                ran = client.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "uname -r"}).json()
                assert ran["stdout"].strip() != os.uname().release, ran  # gVisor's kernel, not the host's
            finally:
                client.delete(f"/v1/sandboxes/{sid}")
    finally:
        srv.stop()
