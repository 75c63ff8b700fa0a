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


STARTER_OUTPUT = """
import json, sys, time
from sandlot import Sandbox
sb = Sandbox(api_url=sys.argv[1], api_key=sys.argv[2])
sb.start()
h = sb.commands.run("printf 0123456789; printf oops >&2; cat; printf END; exit 3", background=True)
while h.stdout != "0123456789" or h.stderr != "oops":
    time.sleep(0.02)
print(json.dumps({"sandbox_id": sb.sandbox_id, "pid": h.pid}))
"""


def test_a_new_client_reads_a_command_again_from_an_offset_and_after_it_ended(server):
    out = subprocess.run([sys.executable, "-c", STARTER_OUTPUT, server.url, server.api_key], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    started = json.loads(out.stdout)
    pid = started["pid"]
    sb = Sandbox.connect(started["sandbox_id"], api_url=server.url, api_key=server.api_key)
    try:
        seen = []
        everything = sb.commands.connect(pid, offset=0, on_stdout=seen.append)
        assert (everything.stdout, everything.stderr, everything.offsets) == (
            "0123456789", "oops", {"stdout": 0, "stderr": 0})
        assert "".join(seen) == "0123456789"  # from an offset the callbacks get the replay too
        middle = sb.commands.connect(pid, offset={"stdout": 7, "stderr": 1})
        assert (middle.stdout, middle.stderr, middle.offsets) == ("789", "ops", {"stdout": 7, "stderr": 1})
        middle.send_stdin("more", close=True)
        assert [(r.exit_code, r.stdout) for r in (everything.wait(), middle.wait())] == [
            (3, "0123456789moreEND"), (3, "789moreEND")]
        assert sb.commands.list() == []
        # Ended: still reachable by pid (exit code and output), from the start or an offset
        ended = sb.commands.connect(pid)
        assert (ended.wait().exit_code, ended.stdout) == (3, "0123456789moreEND")
        tail = sb.commands.connect(pid, offset=10)
        assert (tail.wait().exit_code, tail.stdout, tail.offsets["stdout"]) == (3, "moreEND", 10)
    finally:
        sb.kill()


def test_a_client_that_left_mid_stream_reads_on_from_where_it_was(server):
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        sid = client.post("/v1/sandboxes", json={}).json()["sandbox_id"]
        try:
            cmd = "for i in $(seq 1 400); do echo line-$i; sleep 0.005; done"
            started = client.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": cmd, "background": True}).json()
            stream = f"/v1/sandboxes/{sid}/commands/{started['command_id']}/stream"
            read = ""
            with client.stream("GET", stream, params={"offset": 0}) as response:  # leaves after some lines
                for raw in response.iter_lines():
                    event = json.loads(raw)
                    if event["type"] == "stdout":
                        read += event["text"]
                    if read.count("\n") >= 20:
                        break
            events = []
            with client.stream("GET", stream, params={"offset": len(read.encode())}) as response:
                events = [json.loads(raw) for raw in response.iter_lines() if raw.strip()]
            assert events[0] == {"type": "offsets", "stdout": len(read.encode()), "stderr": 0}
            rest = "".join(e["text"] for e in events if e["type"] == "stdout")
            assert read + rest == "".join(f"line-{i}\n" for i in range(1, 401))
            assert events[-1]["type"] == "end" and events[-1]["exit_code"] == 0
            bad = client.get(stream, params={"offset": -1})
            assert bad.status_code in (400, 422)
        finally:
            client.delete(f"/v1/sandboxes/{sid}")
