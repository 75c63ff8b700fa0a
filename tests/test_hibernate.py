"""Hibernate and wake (gVisor tier): an idle session is checkpointed to disk and its memory freed; the next
call of any kind wakes it with its variables; a paused sandbox still ends at its lifetime, its checkpoint
removed; through a server the same, also after the server restarted, and a tenant's paused sandboxes are
held to a quota of disk.

Skips (saying why) where runsc is not installed; `.ci/run` installs Debian's runsc. Each gVisor boot costs
seconds here (ptrace platform), so these tests are few and each proves several things.
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from sandlot import QuotaExceeded, Sandbox, SandboxNotFound

from .conftest import PROBLEM, processes_in_sandbox

pytestmark = [
    pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM)),
    pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (Debian package `runsc`) is not installed"),
]


def _until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.1)


def _asleep(sb) -> bool:
    """Paused, and its checkpoint finished: nothing of it runs any more (runsc, the sentry, the gofer)."""
    return sb.is_paused and not processes_in_sandbox(sb.sandbox_id)


def _home(sandbox_id: str):
    from sandlot._backends.gvisor import data_dir

    return data_dir() / "sandboxes" / sandbox_id


def test_an_idle_session_hibernates_and_any_call_wakes_it():
    sb = Sandbox(isolation="gvisor", on_idle="pause", limits={"idle_timeout": 1})
    try:
        sb.run_code("import os\nos.chdir('/tmp')\nx = 41")
        sb.files.write("/home/user/note.txt", "kept")
        _until(lambda: _asleep(sb), what="idle pause")  # its memory freed: no process of it is left
        assert (_home(sb.sandbox_id) / "image").is_dir()
        assert sb.files.read("/home/user/note.txt") == "kept"  # woken by a file read
        assert not sb.is_paused and processes_in_sandbox(sb.sandbox_id)

        _until(lambda: _asleep(sb), what="second idle pause")
        assert sb.commands.run("cat /home/user/note.txt; pwd").stdout == "kept/home/user\n"  # by a command

        _until(lambda: _asleep(sb), what="third idle pause")
        ex = sb.run_code("x += 1\n(x, os.getcwd())")  # by code: the session's variables and cwd intact
        assert ex.text == "(42, '/tmp')", ex.error

        _until(lambda: _asleep(sb), what="fourth idle pause")
        # Two calls at once wake it once; both are served.
        answers: dict = {}
        threads = [threading.Thread(target=lambda: answers.update(code=sb.run_code("x").text)),
                   threading.Thread(target=lambda: answers.update(exists=sb.files.exists("/home/user/note.txt")))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert answers == {"code": "42", "exists": True}
    finally:
        sb.kill()
    _until(lambda: not _home(sb.sandbox_id).exists(), 20, "removal of the sandbox's directory")


def test_a_paused_sandbox_ends_at_its_lifetime_with_its_checkpoint():
    """Its lifetime keeps counting while it sleeps and after it wakes (a wake does not start it over); at
    its end the checkpoint is removed and connect() says it is gone."""
    lifetime = 30.0  # room for two checkpoints and a restore on a loaded host (each takes seconds)
    sb = Sandbox(isolation="gvisor", timeout=lifetime)
    created = time.monotonic()
    sb.run_code("x = 1")
    sb.pause()
    time.sleep(3)
    assert sb.run_code("x").text == "1"  # a call wakes it...
    sb.pause()  # ...and it sleeps again, as its lifetime (started at create) runs out
    home = _home(sb.sandbox_id)
    assert (home / "image").is_dir()
    _until(lambda: sb.end_reason is not None, lifetime + 5, "end at the lifetime")
    # Ended by the deadline set at create, not one started over at the wake (>= created + 3 + lifetime).
    assert time.monotonic() - created < lifetime + 3
    assert sb.end_limit == "lifetime" and "while paused" in sb.end_reason
    _until(lambda: not home.exists(), 20, "removal of the checkpoint")
    with pytest.raises(SandboxNotFound):
        Sandbox.connect(sb.sandbox_id, isolation="gvisor")


def _row(server, key: str, sandbox_id: str) -> dict:
    r = httpx.get(f"{server.url}/v1/sandboxes/{sandbox_id}", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_through_a_server_an_idle_sandbox_sleeps_and_a_call_wakes_it_also_after_a_restart(tmp_path):
    from .serverproc import ServerProcess

    first = ServerProcess(tmp_path / "sandlot.db", "--isolations", "process,gvisor").start()
    key, small = first.key("owner"), first.key("small", max_paused_bytes="1M")
    remote = {"api_url": first.url, "api_key": key}
    sb = Sandbox(**remote, isolation="gvisor", on_idle="pause", limits={"idle_timeout": 1})
    second = third = None
    try:
        assert sb.on_idle == "pause"
        sb.run_code("x = 41")
        _until(lambda: _row(first, key, sb.sandbox_id)["status"] == "paused", what="idle pause on the server")
        assert _row(first, key, sb.sandbox_id)["on_idle"] == "pause"
        assert sb.is_running  # as far as the client knows: asleep, not ended
        assert sb.run_code("x += 1\nx").text == "42"  # the call wakes it
        assert _row(first, key, sb.sandbox_id)["status"] == "running"

        _until(lambda: _row(first, key, sb.sandbox_id)["status"] == "paused", what="second idle pause")
        first.kill9()  # a paused sandbox is on disk, not in the server's process tree
        second = ServerProcess(first.db_path, "--isolations", "process,gvisor", port=first.port).start()
        assert sb.run_code("x += 1\nx").text == "43"  # a call to the new server wakes it
        # The new server keeps its on_idle: it sleeps again when idle.
        _until(lambda: _row(second, key, sb.sandbox_id)["status"] == "paused", what="idle pause after the restart")
        assert sb.files.exists("/home/user")

        # A tenant whose paused sandboxes may take 1 MiB of disk: its pause is refused (429) and it runs on;
        # when idle, its checkpoint cannot be kept either, and it ends saying why.
        tight = Sandbox(api_url=first.url, api_key=small, isolation="gvisor", on_idle="pause",
                        limits={"idle_timeout": 2})
        with pytest.raises(QuotaExceeded, match="paused bytes"):
            tight.pause()
        assert tight.run_code("1 + 1").text == "2"
        _until(lambda: _row(second, small, tight.sandbox_id)["status"] == "ended", 60, "the idle end of `tight`")
        assert "paused bytes" in _row(second, small, tight.sandbox_id)["end_reason"]
        _until(lambda: not _home(tight.sandbox_id).exists(), 20, "removal of its checkpoint")

        # Its lifetime runs out while it sleeps and no server runs: the next server ends it, says why in its
        # record and the audit log, and removes its checkpoint.
        sb.set_timeout(8)
        expires = time.time() + 8
        _until(lambda: _row(second, key, sb.sandbox_id)["status"] == "paused", what="idle pause before the expiry")
        second.kill9()
        time.sleep(max(0.0, expires - time.time()) + 0.5)
        third = ServerProcess(first.db_path, "--isolations", "process,gvisor", port=first.port).start()
        _until(lambda: _row(third, key, sb.sandbox_id)["status"] == "ended", 20, "the end of the expired sandbox")
        assert "lifetime ended while paused" in _row(third, key, sb.sandbox_id)["end_reason"]
        _until(lambda: not _home(sb.sandbox_id).exists(), 20, "removal of its checkpoint")
        from sandlot.server.store import Store

        store = Store(first.db_path)
        try:
            ends = [e for e in store.audit_log("owner", sandbox_id=sb.sandbox_id) if e.action == "end"]
        finally:
            store.close()
        assert ends and "lifetime ended while paused" in ends[0].detail
    finally:
        sb.kill()
        (third or second or first).stop()
    _until(lambda: not _home(sb.sandbox_id).exists(), 20, "removal of the sandbox's directory")
