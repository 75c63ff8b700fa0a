"""A background command outlives the client that started it: a new client of the server lists it and
reattaches (output so far, stdin, EOF, its result), as E2B's ``commands.connect(pid)`` does."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from sandlot import Sandbox

from .conftest import needs_sandbox
from .serverproc import ServerProcess

pytestmark = needs_sandbox

STARTER = """
import json, sys, time
from sandlot import Sandbox
sb = Sandbox(api_url=sys.argv[1], api_key=sys.argv[2])
sb.start()
h = sb.commands.run("echo started; cat; echo after-eof", background=True, cwd="/tmp")
while "started" not in h.stdout:
    time.sleep(0.02)
print(json.dumps({"sandbox_id": sb.sandbox_id, "pid": h.pid}))
"""  # and it exits: its connection goes away, the server's sandbox and command live on


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("reattach") / "sandlot.db").start()
    proc.api_key = proc.key("alice")
    yield proc
    proc.stop()


def test_a_new_client_reattaches_to_a_command_another_client_started(server):
    out = subprocess.run([sys.executable, "-c", STARTER, server.url, server.api_key], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    started = json.loads(out.stdout)
    sb = Sandbox.connect(started["sandbox_id"], api_url=server.url, api_key=server.api_key)
    try:
        [info] = sb.commands.list()
        assert (info.pid, info.cmd, info.cwd) == (started["pid"], "echo started; cat; echo after-eof", "/tmp")
        seen = []
        h = sb.commands.connect(info.pid, on_stdout=seen.append)
        assert h.stdout == "started\n"  # what it printed while no client watched
        h.send_stdin("hello\n")
        deadline = time.monotonic() + 10
        while "hello" not in h.stdout and time.monotonic() < deadline:
            time.sleep(0.02)
        h.close_stdin()
        r = h.wait()
        assert (r.exit_code, r.stdout) == (0, "started\nhello\nafter-eof\n")
        assert "".join(seen) == "hello\nafter-eof\n"  # callbacks: from the reattach on, nothing twice
        assert sb.commands.list() == []
    finally:
        sb.kill()


def test_the_rest_api_lists_running_commands(server):
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        sid = client.post("/v1/sandboxes", json={}).json()["sandbox_id"]
        try:
            started = client.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "sleep 60", "background": True}).json()
            listed = client.get(f"/v1/sandboxes/{sid}/commands").json()
            assert [(c["command_id"], c["pid"], c["cmd"], c["cwd"]) for c in listed] == [
                (started["command_id"], started["pid"], "sleep 60", None)]
            client.post(f"/v1/sandboxes/{sid}/commands/{started['command_id']}/kill", json={})
            assert client.get(f"/v1/sandboxes/{sid}/commands/{started['command_id']}", params={"wait": 10}).json()[
                "result"]["exit_code"] == -9
            assert client.get(f"/v1/sandboxes/{sid}/commands").json() == []
            assert client.get("/v1/sandboxes/sb-nope/commands").status_code == 404
        finally:
            client.delete(f"/v1/sandboxes/{sid}")
