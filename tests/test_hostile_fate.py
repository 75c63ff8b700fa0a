"""Fate isolation: a failing create fails alone, and a sandbox ends with its owner, never with a zygote.

Issue #8, holes 1 and 2. A bystander sandbox keeps a variable while another request fails (too big an
input, a zygote killed under it, a create cancelled half-way); it must keep answering with that
variable, and whatever the failing request took (a warm sandbox, a uid slot, processes) must be gone.
The host side only kills processes this test process started (its own zygote), by pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

import sandlot
from sandlot import InvalidRequest, Sandbox
from sandlot._limits import MAX_CREATE_INPUT

from .conftest import needs_sandbox, processes_in_sandbox, sandbox_processes

pytestmark = [needs_sandbox]

OVERSIZE = {"X": "a" * 300_000}  # a few hundred KB: bigger than one protocol frame


def _wait_gone(sandbox_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while processes_in_sandbox(sandbox_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    return processes_in_sandbox(sandbox_id)


def _zombies(pids) -> list:
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] == "Z":
                    found.append((pid, "parent", int(fields[1])))
        except OSError:
            pass
    return found


# -- hole 1: a failing create fails alone --------------------------------------------------------------
@pytest.mark.parametrize("limits", [None, {"disk": "64M"}], ids=["pooled", "forked"])
def test_oversize_create_fails_alone(tier, limits):
    """Too big an environment is refused (InvalidRequest) before anything reaches a zygote or a warm
    sandbox; a bystander keeps its variables and new sandboxes still start."""
    with Sandbox() as bystander:
        assert bystander.run_code("secret = 42").error is None
        with pytest.raises(InvalidRequest, match="create input"):
            Sandbox(env=OVERSIZE, limits=limits)
        assert bystander.run_code("secret").text == "42"
        with Sandbox(limits=limits) as after:
            assert after.run_code("1 + 1").text == "2"
        assert bystander.run_code("secret").text == "42"


@pytest.mark.tiers("process")
@pytest.mark.parametrize("limits", [None, {"disk": "64M"}], ids=["pooled", "forked"])
def test_create_input_just_under_the_limit_works(tier, limits):
    """A big but allowed environment (more than one read of the zygote's socket) reaches the sandbox."""
    value = "b" * (MAX_CREATE_INPUT - 1024)
    with Sandbox() as bystander:
        bystander.run_code("secret = 42")
        with Sandbox(env={"BIG": value}, limits=limits) as sb:
            assert sb.run_code("import os; len(os.environ['BIG'])").text == str(len(value))
        assert bystander.run_code("secret").text == "42"


def _zygote():
    """The process tier's zygote of the default template, in this process's engine."""
    from sandlot._engine import default_engine

    zygote = default_engine().backend("process").zygote("python")
    assert zygote is not None
    return zygote


def _zygote_pid() -> int:
    zygote = _zygote()
    assert zygote.alive()
    return zygote.pid


@pytest.mark.tiers("process")
def test_zygote_killed_bystanders_live_on(tier):
    """kill -9 of the zygote (ours: this process started it) leaves its live forks running."""
    with Sandbox() as pooled, Sandbox(limits={"disk": "64M"}) as forked:
        for sb in (pooled, forked):
            assert sb.run_code("secret = 42").error is None
        keeper = _zygote()._keeper.pid  # reaps the pid 1s of that zygote's forks
        os.kill(_zygote_pid(), signal.SIGKILL)
        time.sleep(0.5)
        for sb in (pooled, forked):
            assert sb.run_code("secret").text == "42"
            assert sb.commands.run("echo alive").stdout == "alive\n"
        with Sandbox(limits={"disk": "64M"}) as new:  # the zygote is restarted on demand
            assert new.run_code("import pandas; 1 + 1").text == "2"
        new_zygote = _zygote_pid()
        assert pooled.run_code("secret").text == "42"
        ids = [pooled.sandbox_id, forked.sandbox_id]
        pids = {pid for sid in ids for pid in processes_in_sandbox(sid)}
    for sid in ids:
        assert _wait_gone(sid) == {}
    deadline = time.monotonic() + 5  # reaped by the old zygote's keeper, promptly
    while _zombies(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _zombies(pids) == [], "orphaned sandboxes were not reaped"
    with Sandbox(limits={"disk": "64M"}) as sb:  # the restarted zygote is still the one in use
        assert sb.run_code("2 + 2").text == "4"
    assert _zygote_pid() == new_zygote
    # The old keeper stays only while it has sandboxes to reap (warm ones forked before the kill, say),
    # and is reaped once it exits.
    deadline = time.monotonic() + 5
    while not _keeper_settled(keeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _keeper_settled(keeper)


def _keeper_settled(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return True  # exited and reaped
    return state != "Z" and bool(children)


@pytest.mark.tiers("process")
def test_zygote_restarts_do_not_leak_slots(tier):
    """Each sandbox forked from a zygote takes a nested uid slot; restarts of the zygote give them back."""
    with Sandbox(limits={"disk": "64M"}):
        pass
    time.sleep(0.5)  # releases happen when each sandbox's cleanup finishes
    zygote = _zygote()
    free = len(zygote._free_slots)
    for _ in range(2):
        with Sandbox(limits={"disk": "64M"}) as sb:
            os.kill(_zygote_pid(), signal.SIGKILL)
            assert sb.run_code("1").text == "1"
        with Sandbox(limits={"disk": "64M"}):
            pass
    time.sleep(0.5)  # releases happen when each sandbox's cleanup finishes
    assert len(zygote._free_slots) == free


@pytest.mark.tiers("process")
@pytest.mark.parametrize("config", ["not a plan", {"env": ["not", "a", "mapping"]}])
def test_zygote_answers_a_bad_request_and_carries_on(tier, config):
    """A request whose content the zygote cannot use gets an error answer; the zygote stays (same
    process) and so do the sandboxes forked from it."""
    import socket

    with Sandbox(limits={"disk": "64M"}) as bystander:
        bystander.run_code("secret = 42")
        zygote = _zygote()
        pid = zygote.pid
        near, far = socket.socketpair()
        try:
            with pytest.raises(sandlot.SandboxCrashed, match="could not fork"):
                zygote.fork(config, far)
        finally:
            near.close()
            far.close()
        assert zygote.pid == pid and zygote.alive()
        assert bystander.run_code("secret").text == "42"
        with Sandbox(limits={"disk": "64M"}) as after:
            assert after.run_code("1 + 1").text == "2"
        assert zygote.pid == pid


OWNER = """
import os, signal, sys, threading, time, sandlot
from sandlot._engine import default_engine
idle = sandlot.Sandbox()
busy = sandlot.Sandbox(limits={"disk": "64M"})
threading.Thread(target=busy.run_code, args=("while True: pass",), daemon=True).start()
if sys.argv[1] == "zygote-gone":  # its zygote died (and was not replaced) before the owner did
    zygote = default_engine().backend("process").zygote("python")
    os.kill(zygote.pid, signal.SIGKILL)
    while zygote.alive():
        time.sleep(0.01)
time.sleep(1)
print(idle.sandbox_id, busy.sandbox_id, flush=True)
time.sleep(120)
"""


@pytest.mark.tiers("process")
@pytest.mark.parametrize("case", ["zygote-alive", "zygote-gone"])
def test_sandboxes_end_with_their_owner(tier, case, tmp_path):
    """Owner SIGKILLed: its sandboxes end, idle or busy running code, whether their zygote lives or not."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    repo = os.path.dirname(os.path.dirname(sandlot.__file__))  # this checkout's sandlot, not an installed one
    owner = subprocess.Popen([sys.executable, str(script), case], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=repo))
    try:
        ids = owner.stdout.readline().split()
        assert len(ids) == 2 and all(processes_in_sandbox(i) for i in ids), ids
        before = _cpu_ticks(processes_in_sandbox(ids[1]))
        time.sleep(0.5)
        assert _cpu_ticks(processes_in_sandbox(ids[1])) > before  # the busy loop really runs
    finally:
        owner.kill()
        owner.wait()
    for sid in ids:
        assert _wait_gone(sid) == {}, f"{sid} outlived its owner ({case})"



SIGNALLED_OWNER = """
import signal, sys
import sandlot
# The owner shrugs off the Ctrl-C with a handler (not SIG_IGN, which its children would inherit across exec).
signal.signal(signal.SIGINT, lambda *_: None)
signal.signal(signal.SIGQUIT, lambda *_: None)
direct = sandlot.Sandbox(limits={"disk": "64M"})  # forked or booted for us, never pooled
pooled = sandlot.Sandbox()
for sb in (direct, pooled):
    sb.run_code("kept = 7")
print("ready", flush=True)
sys.stdin.readline()
print(" ".join(str(sb.run_code("kept * 6").text) for sb in (direct, pooled)), flush=True)
"""


@pytest.mark.tiers("process")
@pytest.mark.parametrize("zygote", ["1", "0"], ids=["zygote", "exec"])
def test_a_ctrl_c_at_the_owners_terminal_is_not_for_its_sandboxes(tier, zygote, tmp_path):
    """A terminal's Ctrl-C (SIGINT, SIGQUIT) goes to the owner's whole process group: a sandbox's host
    processes (a direct boot's parent, a zygote's keeper) are not in it."""
    _owner_shrugs_off_a_ctrl_c(zygote, tmp_path)


@pytest.mark.tiers("gvisor")
def test_a_ctrl_c_at_the_owners_terminal_is_not_for_its_gvisor_sandboxes(tier, tmp_path):
    """The same for runsc and the shell that waits for it (the gVisor tier has no zygote)."""
    _owner_shrugs_off_a_ctrl_c("1", tmp_path)


def _owner_shrugs_off_a_ctrl_c(zygote: str, tmp_path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(SIGNALLED_OWNER)
    repo = os.path.dirname(os.path.dirname(sandlot.__file__))
    owner = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, start_new_session=True,  # its own group: we signal only that
                             env=dict(os.environ, PYTHONPATH=repo, SANDLOT_ZYGOTE=zygote))
    try:
        assert owner.stdout.readline().strip() == "ready"
        assert os.getpgid(owner.pid) == owner.pid != os.getpgid(0)  # never our own group
        for sig in (signal.SIGINT, signal.SIGQUIT):
            os.killpg(owner.pid, sig)
        time.sleep(1)
        owner.stdin.write("go\n")
        owner.stdin.flush()
        assert owner.stdout.readline().split() == ["42", "42"]
    finally:
        owner.kill()
        owner.wait()


IGNORING_OWNER = """
import json, signal
import sandlot
# As a script's background job (`cmd &` without job control) or nohup leaves them: ignored, which every
# process the owner starts inherits across fork and exec (a handler would not survive the exec).
IGNORED = [signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM]
for sig in IGNORED:
    signal.signal(sig, signal.SIG_IGN)
direct = sandlot.Sandbox(limits={"disk": "64M"})  # forked or booted for us, never pooled
pooled = sandlot.Sandbox()
seen = {}
for name, sb in (("direct", direct), ("pooled", pooled)):
    ignored = sb.run_code("import signal\\n[int(s) for s in %r if signal.getsignal(s) == signal.SIG_IGN]"
                          % [int(s) for s in IGNORED]).text
    command = sb.commands.run("grep SigIgn /proc/self/status").stdout.split()[-1]
    seen[name] = {"session": ignored, "command": command}
print(json.dumps(seen), flush=True)
"""


@pytest.mark.tiers("process")
@pytest.mark.parametrize("zygote", ["1", "0"], ids=["zygote", "exec"])
def test_signals_the_owner_ignores_are_not_ignored_in_its_sandboxes(tier, zygote, tmp_path):
    """A sandbox does not depend on how its owner was started: signals the owner ignores (SIGHUP under
    nohup, SIGINT and SIGQUIT in a script's background job) start at their defaults in the session and
    in commands (they used to stay ignored there: a command's `kill -HUP` of its own child did nothing)."""
    script = tmp_path / "owner.py"
    script.write_text(IGNORING_OWNER)
    repo = os.path.dirname(os.path.dirname(sandlot.__file__))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=repo, SANDLOT_ZYGOTE=zygote))
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    for name in ("direct", "pooled"):
        assert seen[name] == {"session": "[]", "command": "0000000000000000"}, (name, seen)


def _cpu_ticks(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total


# -- the server path ------------------------------------------------------------------------------------
@pytest.mark.tiers("process")
def test_oversize_create_through_the_server_fails_alone(tier, tmp_path):
    from .serverproc import ServerProcess

    server = ServerProcess(tmp_path / "sandlot.db").start()
    try:
        remote = {"api_url": server.url, "api_key": server.key("alice")}
        with Sandbox(**remote) as bystander:
            bystander.run_code("secret = 42")
            mallory = dict(remote, api_key=server.key("mallory"))
            env = {f"V{i}": "c" * 30_000 for i in range(10)}  # each variable within the schema's own bounds
            answers = [httpx.post(server.url + "/v1/sandboxes", json={"env": env, "limits": limits},
                                  headers={"Authorization": f"Bearer {mallory['api_key']}"}, timeout=60)
                       for limits in (None, {"disk": "64M"})]  # a client that does not check
            assert bystander.run_code("secret").text == "42"
            for r in answers:
                assert r.status_code == 422 and "create input" in r.text, r.text[:300]
            for limits in (None, {"disk": "64M"}):
                with pytest.raises(InvalidRequest, match="create input"):  # the remote SDK checks first
                    Sandbox(env=env, limits=limits, **mallory)
            with Sandbox(limits={"disk": "64M"}, **mallory) as after:
                assert after.run_code("1 + 1").text == "2"
            assert bystander.run_code("secret").text == "42"
    finally:
        server.stop()


# -- hole 2: a sandbox taken from the pool is handed to its owner or killed ------------------------------
async def _warm_pool(limits=None):
    from sandlot._engine import default_engine
    from sandlot._limits import Limits
    from sandlot._templates import get_template

    sandlot.configure_pool("python", min_ready=2)
    engine = default_engine()
    backend = engine.backend(os.environ["SANDLOT_ISOLATION"])
    pool = engine.pools.pool_for(backend, get_template("python"), Limits.build(limits))
    assert pool is not None
    pool.refill()
    deadline = time.monotonic() + 120
    while len(pool.ready) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert len(pool.ready) >= 2
    return pool


def _taken(before: list, pool) -> list:
    return [p for p in before if p not in pool.ready]


def _sandbox_of(pid: int):
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return None
    marks = [part for part in text.split("/") if part.startswith("sb-")]
    return marks[0].split()[0] if marks else None


def _orphans(owned=()) -> dict:
    """Sandbox processes on the host that this test process started (its descendants: other helpers'
    sandboxes do not count) and that belong to no warm pool and no owner. Waits for the dying."""
    from sandlot._engine import default_engine

    from .serverproc import descendants

    deadline = time.monotonic() + 10
    while True:
        known = {p.id for p in default_engine().pools.ready()} | {sb.sandbox_id for sb in owned}
        mine = descendants(os.getpid())
        found = {}
        for pid in set(sandbox_processes()) & mine:
            sid = _sandbox_of(pid)
            if sid is not None and sid not in known:
                found[pid] = sid
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.usefixtures("tier")
async def test_oversize_env_claims_no_warm_sandbox():
    """Refused before the pool is touched: no warm sandbox is claimed for a request that cannot succeed."""
    pool = await _warm_pool()
    before = list(pool.ready)
    with pytest.raises(InvalidRequest):
        await sandlot.AsyncSandbox.create(env=OVERSIZE)
    for proc in _taken(before, pool):  # none, or each killed
        assert proc.killed_reason is not None
        assert await asyncio.to_thread(_wait_gone, proc.id) == {}
    assert await asyncio.to_thread(_orphans) == {}


@pytest.mark.usefixtures("tier")
async def test_create_cancelled_while_configuring_leaks_nothing():
    """A client that gives up while its warm sandbox is being configured: that sandbox is killed."""
    pool = await _warm_pool()
    before = list(pool.ready)
    task = asyncio.ensure_future(sandlot.AsyncSandbox.create(env={"OWNER": "gone"}, limits={"memory": "300M"}))
    await asyncio.sleep(0)  # the create has claimed its warm sandbox and is applying its limits
    taken = _taken(before, pool)
    assert len(taken) == 1, "the create did not take a warm sandbox"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proc = taken[0]
    assert proc not in pool.ready
    assert proc.killed_reason is not None, "the claimed sandbox was left running, owned by nobody"
    assert await asyncio.to_thread(_wait_gone, proc.id) == {}
    assert await asyncio.to_thread(_orphans) == {}
    async with sandlot.AsyncSandbox() as sb:  # the pool still serves
        assert (await sb.run_code("1 + 1")).text == "2"


@pytest.mark.usefixtures("tier")
@pytest.mark.parametrize("memory", ["2G", "16M"])
async def test_claimed_sandbox_is_owned_or_killed(memory):
    """Other memory than the pool's: the warm sandbox taken for it either serves its owner or is
    killed (when it cannot take the limits, a fresh sandbox boots with them), never left running."""
    pool = await _warm_pool()
    before = list(pool.ready)
    try:
        sb = await sandlot.AsyncSandbox.create(limits={"memory": memory})
    except sandlot.SandlotError:
        sb = None  # failing is allowed; leaking is not
    try:
        taken = _taken(before, pool)
        assert taken, "the create did not take a warm sandbox"
        for proc in taken:
            if sb is not None and proc is sb._handle.backend_sandbox:
                assert (await sb.run_code("1 + 1")).text == "2"
                continue
            assert proc.killed_reason is not None, "a claimed sandbox was left running, owned by nobody"
            assert await asyncio.to_thread(_wait_gone, proc.id) == {}
        if sb is not None:
            assert (await sb.run_code("6 * 7")).text == "42"
        assert await asyncio.to_thread(_orphans, [sb] if sb is not None else []) == {}
    finally:
        if sb is not None:
            await sb.kill()
