"""Restarts lose nothing: a server's sandboxes outlive its process (stopped, or killed -9) until their
lifetime ends, and the next server on the same database takes them back with their state, deadlines and
quotas. A sandbox nobody takes back ends at its lifetime by itself, leaving nothing behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time

import httpx
import pytest

import sandlot
from sandlot import Sandbox
from sandlot._backends.process import UID_BASE, UID_SPAN, state_dir
from sandlot.server import Store

from .conftest import host_leftovers, needs_sandbox, processes_in_sandbox
from .serverproc import ServerProcess, terminate

pytestmark = needs_sandbox


def audit_actions(db_path, sandbox_id: str) -> list[str]:
    store = Store(db_path)
    try:
        return [entry.action for entry in store.audit_log(sandbox_id=sandbox_id)]
    finally:
        store.close()


def uid_range_taken(sandbox_id: str) -> bool:
    """Whether the lock of the host uid range the sandbox's processes run in is held (by someone: its pid 1)."""
    uids = set(processes_in_sandbox(sandbox_id).values())
    assert uids, "no process"
    fd = os.open(state_dir() / "uids" / str((min(uids) - UID_BASE) // UID_SPAN), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def no_trace_of(sandbox_id: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not processes_in_sandbox(sandbox_id) and not any(sandbox_id in c for c in host_leftovers().get("cgroups", [])):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("stop", ["kill9", "sigterm"])
def test_a_restarted_server_gives_back_every_sandbox_with_its_state(tmp_path, stop):
    first = ServerProcess(tmp_path / "sandlot.db").start()
    key = first.key("owner", max_live=3)
    remote = {"api_url": first.url, "api_key": key}
    idle = Sandbox(**remote, metadata={"role": "idle"})
    idle.run_code("x = 42\nimport os\nos.chdir('/tmp')")
    idle.files.write("/home/user/notes.txt", "kept across the restart")
    busy = Sandbox(**remote, timeout=600)
    busy.run_code("y = 0")
    background = Sandbox(**remote)
    counter = background.commands.run("i=0; while true; do i=$((i+1)); echo $i; echo $i > /tmp/count; sleep 0.05; done",
                                      background=True)

    # The busy one is running code when its server goes away: the code runs on to its end.
    def run_long() -> None:
        try:
            busy.run_code("import time\ntime.sleep(2)\ny = 7")
        except sandlot.SandlotError:
            pass  # its server went away mid-call

    caller = threading.Thread(target=run_long)
    caller.start()
    time.sleep(0.5)
    ids = [idle.sandbox_id, busy.sandbox_id, background.sandbox_id]
    if stop == "kill9":
        first.kill9()
    else:
        terminate(first.proc)  # SIGTERM, as an operator stops it (ServerProcess.stop() also ends what it left)
    caller.join(30)
    for sid in ids:  # nothing was ended with the server
        assert processes_in_sandbox(sid), f"{sid} died with its server"
        assert uid_range_taken(sid), f"{sid} outlived its server, but its host uids are free for another sandbox"

    second = ServerProcess(first.db_path, port=first.port).start()
    try:
        again = Sandbox.connect(idle.sandbox_id, **remote)
        assert again.run_code("x").text == "42"
        assert again.run_code("os.getcwd()").text == "'/tmp'"
        assert again.files.read("/home/user/notes.txt") == "kept across the restart"
        assert again.metadata == {"role": "idle"}

        busy_again = Sandbox.connect(busy.sandbox_id, **remote)
        deadline = time.monotonic() + 10
        while busy_again.run_code("y").text != "7":  # its cell finished while no server ran
            assert time.monotonic() < deadline
            time.sleep(0.2)

        counting = Sandbox.connect(background.sandbox_id, **remote)
        first_count = int(counting.files.read("/tmp/count"))
        time.sleep(0.3)
        assert int(counting.files.read("/tmp/count")) > first_count  # the command runs on
        assert counter.pid in [c.pid for c in counting.commands.list()]
        # Its handle from before the restart follows it on the new server, from the byte it had read: every
        # line once, none missing.
        deadline = time.monotonic() + 30
        while int(counter.stdout.split()[-1]) <= first_count and time.monotonic() < deadline:
            time.sleep(0.2)
        lines = [int(n) for n in counter.stdout.split()]
        assert lines[-1] > first_count and lines == list(range(1, len(lines) + 1)), lines[-20:]

        # Its quotas know all three: a fourth is refused.
        with pytest.raises(sandlot.QuotaExceeded):
            Sandbox(**remote)
        for sid in ids:
            assert "readopt" in audit_actions(first.db_path, sid)
        with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {key}"}) as c:
            listed = {i["sandbox_id"]: i["status"] for i in c.get("/v1/sandboxes").json()}
        assert listed == {sid: "running" for sid in ids}

        for sandbox in (again, busy_again, counting):
            sandbox.kill()
        for sid in ids:
            assert no_trace_of(sid), f"{sid} left processes or a cgroup"
    finally:
        second.stop()


@pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (Debian package `runsc`) is not installed")
def test_a_server_killed_9_gives_back_its_gvisor_sandboxes_too(tmp_path):
    """The gVisor tier's sandboxes are held by their keepers across the crash: live, not checkpointed."""
    first = ServerProcess(tmp_path / "sandlot.db", "--isolations", "process,gvisor").start()
    key = first.key("owner")
    remote = {"api_url": first.url, "api_key": key}
    strong = Sandbox(**remote, isolation="gvisor")
    strong.run_code("import os\nsecret = os.urandom(8).hex()")
    secret = strong.run_code("secret").text
    strong.files.write("/tmp/kept.txt", "on the gVisor tier")
    ticker = strong.commands.run("i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done", background=True)
    while not ticker.stdout:
        time.sleep(0.05)
    plain = Sandbox(**remote)
    plain.run_code("n = 1")
    first.kill9()

    second = ServerProcess(first.db_path, "--isolations", "process,gvisor", port=first.port).start()
    try:
        again = Sandbox.connect(strong.sandbox_id, **remote)
        assert again.isolation == "gvisor" and again.run_code("secret").text == secret
        assert again.files.read("/tmp/kept.txt") == "on the gVisor tier"
        assert Sandbox.connect(plain.sandbox_id, **remote).run_code("n + 1").text == "2"
        assert "readopt" in audit_actions(first.db_path, strong.sandbox_id)
        seen = int(ticker.stdout.split()[-1])
        deadline = time.monotonic() + 30  # the command ran on; its old handle follows it on the new server
        while int(ticker.stdout.split()[-1]) <= seen + 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        lines = [int(n) for n in ticker.stdout.split()]
        assert lines[-1] > seen + 3 and lines == list(range(1, len(lines) + 1)), lines[-20:]
        again_ticker = again.commands.connect(ticker.pid, offset=0)
        assert again_ticker.stdout.split()[:3] == ["1", "2", "3"]
        again.kill()
        Sandbox.connect(plain.sandbox_id, **remote).kill()
        assert no_trace_of(strong.sandbox_id, within=30)
    finally:
        second.stop()


def test_a_sandbox_nobody_takes_back_ends_at_its_lifetime(tmp_path):
    first = ServerProcess(tmp_path / "sandlot.db").start()
    key = first.key("owner")
    sb = Sandbox(api_url=first.url, api_key=key, timeout=4)
    sb.run_code("z = 1")
    sid = sb.sandbox_id
    first.kill9()
    assert processes_in_sandbox(sid)  # it outlived its server...
    deadline = time.monotonic() + 15
    while processes_in_sandbox(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_in_sandbox(sid)  # ...and ended at its lifetime on its own

    second = ServerProcess(first.db_path, port=first.port).start()
    try:
        with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {key}"}) as c:
            info = c.get(f"/v1/sandboxes/{sid}").json()
        assert info["status"] == "ended" and "lifetime" in info["end_reason"]
        assert no_trace_of(sid)  # the new server removed its cgroup
    finally:
        second.stop()



OWNER = """
import asyncio, json, sys, time
from sandlot._engine import Engine
from sandlot._spec import SandboxSpec

async def main():
    engine = Engine(durable=True)
    sb = await engine.create(SandboxSpec.build("python", isolation="process", limits={"lifetime": 120}))
    await sb.files.write("/tmp/grab.py", sys.argv[1])
    await sb.commands.run("python3 /tmp/grab.py > /tmp/grab.log 2>&1", background=True)
    await sb.run_code("secret_of_the_session = 'still here'")
    print(json.dumps(sb.backend_sandbox.describe()), flush=True)
    time.sleep(600)

asyncio.run(main())
"""

GRAB = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
pidfd = libc.syscall(434, 1, 0)  # pidfd_open(pid 1 of the sandbox: its agent)
taken, tries = [], 0
deadline = time.time() + 6
while time.time() < deadline:  # the whole time its owner is gone: the agent keeps a channel for the next one
    for target in range(64):
        tries += 1
        if libc.syscall(438, pidfd, target, 0) >= 0:  # pidfd_getfd
            taken.append(target)
    time.sleep(0.05)
print("pidfd", pidfd, "tries", tries, "taken", sorted(set(taken)), flush=True)
"""


def test_code_in_a_sandbox_cannot_take_the_channel_kept_for_its_next_owner(tmp_path):
    """While its owner is gone, pid 1 keeps a channel's far end for the next one: code in the sandbox (a
    background command that ran on) cannot take it (no ptrace rights over pid 1), nor anything else of pid 1's."""
    import asyncio
    import json
    import subprocess
    import sys

    from sandlot._engine import Engine
    from sandlot._spec import SandboxSpec

    owner = subprocess.Popen([sys.executable, "-c", OWNER, GRAB], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    record = json.loads(owner.stdout.readline())
    owner.kill()
    owner.wait()
    time.sleep(3)  # the owner stays gone while the command tries

    async def take_back() -> tuple:
        engine = Engine(durable=True)
        sandbox = await engine.adopt(record, SandboxSpec.build("python", isolation="process"), time.time() + 60)
        try:
            kept = (await sandbox.run_code("secret_of_the_session")).text
            deadline = time.monotonic() + 15
            while "tries" not in (log := (await sandbox.commands.run("cat /tmp/grab.log; true")).stdout):
                assert time.monotonic() < deadline, log
                await asyncio.sleep(0.2)
            return kept, log
        finally:
            await sandbox.kill()
            await engine.shutdown()

    kept, log = asyncio.run(take_back())
    assert kept == "'still here'"
    assert "pidfd -1" not in log and "tries 0" not in log, log  # it did hold pid 1 and try, all along
    assert "taken []" in log, log


def test_an_embedded_server_makes_its_engine_durable_only_while_it_serves(tmp_path):
    """A program that embeds the server (create_app) and also uses the SDK: while the server runs, sandboxes outlive
    the process (the next server takes them back); once it stopped, the program's own sandboxes end with it again."""
    from fastapi.testclient import TestClient

    from sandlot._engine import default_engine
    from sandlot.server import create_app
    from sandlot.server.settings import Settings

    before = default_engine().durable
    app = create_app(Settings(db_path=tmp_path / "sandlot.db"))
    assert default_engine().durable == before  # made, not serving yet
    with TestClient(app):
        assert default_engine().durable is True
    assert default_engine().durable == before
