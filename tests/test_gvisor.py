"""The strong tier: the same API under gVisor's runsc, plus pause and resume.

Skips (saying why) where runsc is not installed; `.ci/run` installs Debian's runsc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import sandlot
from sandlot import Sandbox, SandboxNotFound

from .conftest import PROBLEM, processes_in_sandbox

pytestmark = [
    pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM)),
    pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (Debian package `runsc`) is not installed"),
]


@pytest.fixture(scope="module")
def gsb():
    sandlot.configure_pool("python", min_ready=2)
    with Sandbox(isolation="gvisor") as sb:
        yield sb


def test_same_api_under_gvisor(gsb):
    gsb.run_code("import pandas as pd; df = pd.DataFrame({'a': [1, 2, 3]})")
    assert gsb.run_code("df.a.sum()").text == "6"
    assert gsb.run_code("1/0").error.name == "ZeroDivisionError"
    r = gsb.commands.run("echo hi; exit 3")
    assert (r.exit_code, r.stdout) == (3, "hi\n")
    gsb.files.write("data.csv", b"a,b\n1,2\n")
    assert gsb.files.read("/home/user/data.csv") == "a,b\n1,2\n"
    ex = gsb.run_code("import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.show()")
    assert ex.results and ex.results[0].png


def test_timeout_interrupts_under_gvisor(gsb):
    gsb.run_code("kept = 7")
    ex = gsb.run_code("while True: pass", timeout=1)
    assert ex.error.limit == "timeout"
    assert gsb.run_code("kept").text == "7"


def test_posture_under_gvisor(gsb):
    facts = json.loads("".join(gsb.run_code(
        "import os, json\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
        "print(json.dumps({'uid': os.getuid(), 'seccomp': status.get('Seccomp', '').strip(),\n"
        "  'cap': status['CapEff'].strip(), 'pids': [p for p in os.listdir('/proc') if p.isdigit()],\n"
        "  'net': sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]),\n"
        "  'kernel': open('/proc/version').read()}))").logs.stdout))
    assert facts["uid"] == 1000 and int(facts["cap"], 16) == 0
    assert facts["seccomp"] == "2"
    assert facts["net"] == ["lo"]
    assert len(facts["pids"]) < 20
    assert "gVisor" in facts["kernel"] or os.uname().release not in facts["kernel"]  # a different kernel


def test_no_egress_and_no_host_secrets_under_gvisor(gsb):
    ex = gsb.run_code("import socket\ns = socket.socket(); s.settimeout(2)\ntry:\n    s.connect(('10.0.0.1', 80))\n"
                      "except OSError as e:\n    print(type(e).__name__)")
    assert ex.error is None and "".join(ex.logs.stdout).strip() in ("OSError", "TimeoutError", "ConnectionRefusedError")
    ex = gsb.run_code("import os; [os.path.exists(p) for p in ('/etc/shadow', '/root/.ssh', '/var/lib/sandlot')]")
    assert ex.text == "[False, False, False]"


def test_memory_limit_under_gvisor():
    with Sandbox(isolation="gvisor", limits={"memory": "512M"}) as sb:
        ex = sb.run_code("blob = bytearray(900 * 1024 * 1024)")
        assert ex.error is not None  # killed (limit named) or MemoryError: never a host effect
        assert ex.error.limit == "memory" or ex.error.name == "MemoryError"


def test_pause_and_resume_keep_state():
    with Sandbox(isolation="gvisor") as sb:
        sb.run_code("import os\nos.chdir('/tmp')\nf = open('/home/user/log.txt', 'w')\nf.write('one ')\nf.flush()\n"
                    "counter = 41")
        info = sb.pause()
        assert info.checkpoint_bytes > 0 and info.seconds > 0
        assert not processes_in_sandbox(sb.sandbox_id)  # its memory is freed
        sb.resume()
        ex = sb.run_code("counter += 1\nf.write('two')\nf.close()\n(counter, os.getcwd(), open('/home/user/log.txt').read())")
        assert ex.text == "(42, '/tmp', 'one two')", ex.error


def _owner_process(tmp_path, body: str) -> str:
    """Run ``body`` (which makes ``sb``) as a separate owner process; return the sandbox id it printed."""
    script = tmp_path / "owner.py"
    script.write_text(f"import os, signal, sandlot\n{body}")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    sandbox_id = out.stdout.strip()
    assert sandbox_id.startswith("sb-"), out.stderr
    return sandbox_id


def test_paused_sandbox_survives_a_restart_of_its_owner(tmp_path):
    sandbox_id = _owner_process(tmp_path, "sb = sandlot.Sandbox(isolation='gvisor')\n"
                                          "sb.run_code('secret = \"kept across owners\"')\n"
                                          "sb.pause()\n"
                                          "print(sb.sandbox_id, flush=True)\n")
    sb = Sandbox.connect(sandbox_id, isolation="gvisor")
    try:
        assert sb.run_code("secret").text == "'kept across owners'"
    finally:
        sb.kill()


def test_killed_paused_sandbox_leaves_nothing():
    from sandlot._backends.gvisor import data_dir

    from .conftest import host_leftovers

    sb = Sandbox(isolation="gvisor")
    sb.run_code("x = 1")
    sb.pause()
    sid = sb.sandbox_id
    assert (data_dir() / "sandboxes" / sid).exists()
    sb.kill()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ((data_dir() / "sandboxes" / sid).exists()
                                           or any(sid in p for p in host_leftovers().get("cgroups", []))):
        time.sleep(0.1)
    assert not (data_dir() / "sandboxes" / sid).exists()
    assert not any(sid in p for p in host_leftovers().get("cgroups", []))
    assert not processes_in_sandbox(sid)
    listed = subprocess.run(["runsc", "--root", str(data_dir() / "runsc"), "list"], capture_output=True, text=True)
    assert sid not in listed.stdout
    with pytest.raises(SandboxNotFound):
        Sandbox.connect(sid, isolation="gvisor")


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def test_an_owner_killed_outright_leaves_nothing_after_the_sweep(tmp_path):
    """kill -9 of the owning process: its sandbox (no lease) ends with it, its host tmpfs is unmounted and its
    directory removed by its keeper (or the next sweep, had the keeper died too), while live sandboxes stay."""
    from sandlot._backends.gvisor import data_dir, sweep_stale

    sid = _owner_process(tmp_path, "sb = sandlot.Sandbox(isolation='gvisor', limits={'disk': '32M'})\n"  # not pooled
                                   "sb.files.write('note.txt', 'left behind')\n"
                                   "print(sb.sandbox_id, flush=True)\n"
                                   "os.kill(os.getpid(), signal.SIGKILL)\n")
    home = data_dir() / "sandboxes" / sid
    with Sandbox(isolation="gvisor") as live:  # a live sandbox of this process, which must stay
        deadline = time.monotonic() + 20
        while (processes_in_sandbox(sid) or _mounted(str(home / "rw"))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not processes_in_sandbox(sid)  # the sandbox died with its owner
        assert not _mounted(str(home / "rw"))  # and its tmpfs (what it wrote) went with it
        # Its keeper removes the directory once runsc ended (the sweep does it for a keeper that died too).
        while home.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        sweep_stale(min_age=0)
        assert not _mounted(str(home / "rw")) and not home.exists()
        assert live.run_code("1 + 1").text == "2"
        assert (data_dir() / "sandboxes" / live.sandbox_id).is_dir()


def test_pause_and_resume_through_the_server_survive_its_restart(tmp_path):
    """The remote SDK pauses a gVisor sandbox on a server; the server is killed -9 and started again;
    connect(id) resumes the sandbox with its variables. Running code while paused wakes it."""
    from .serverproc import ServerProcess

    first = ServerProcess(tmp_path / "sandlot.db", "--isolations", "process,gvisor").start()
    key = first.key("owner")
    remote = {"api_url": first.url, "api_key": key}
    sb = Sandbox(**remote, isolation="gvisor")
    sb.run_code("import os\nos.chdir('/tmp')\ncounter = 41")
    info = sb.pause()
    assert info.checkpoint_bytes > 0 and info.seconds > 0
    assert [s.sandbox_id for s in Sandbox.list(status="paused", **remote)] == [sb.sandbox_id]
    assert sb.run_code("counter").text == "41"  # the call woke it
    sb.pause()
    assert sb.resume().seconds > 0
    assert sb.run_code("counter += 1\n(counter, os.getcwd())").text == "(42, '/tmp')"
    sb.pause()
    first.kill9()  # a paused sandbox is on disk, not in the server's process tree

    second = ServerProcess(first.db_path, "--isolations", "process,gvisor", port=first.port).start()
    try:
        again = Sandbox.connect(sb.sandbox_id, **remote)  # connecting to a paused sandbox resumes it
        try:
            assert again.run_code("counter += 1\ncounter").text == "43"
            assert [s.sandbox_id for s in Sandbox.list(**remote)] == [sb.sandbox_id]
        finally:
            again.kill()
        assert Sandbox.list(status="ended", **remote)[0].sandbox_id == sb.sandbox_id
    finally:
        second.stop()


def test_get_url_of_a_sandbox_made_without_a_network_says_how_to_get_one():
    """runsc's network is fixed at boot: get_url of a sandbox made without one is refused with the way out, not
    answered with a URL that only ever gives 502."""
    with Sandbox(isolation="gvisor") as sb:
        with pytest.raises(sandlot.InvalidRequest, match="network="):
            sb.get_url(8000)
