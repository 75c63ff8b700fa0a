"""Memory merging (KSM): sandboxes' processes are mergeable when the operator asks (SANDLOT_KSM=1 or
`sandlot serve --ksm`), and only then; ksmd is turned on with Sandlot's budget only if it was off, and
put back as found when the process that turned it on exits; `sandlot doctor` says where KSM stands.

Each case runs in a fresh interpreter with its environment set from the start, as a user's program or
`sandlot serve` is: the setting is read when a zygote starts (a pool made before keeps its sandboxes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandlot._host import ksm

from .conftest import needs_sandbox

pytestmark = [needs_sandbox,
              pytest.mark.skipif(not ksm.status().available, reason=ksm.status().why or "no KSM")]

ROOT = Path(__file__).resolve().parent.parent

PROBE = r'''
import dataclasses, json, sys
import sandlot
from sandlot._host import ksm
from tests.conftest import processes_in_sandbox
with sandlot.Sandbox() as sb:
    assert sb.run_code("import pandas; 1+1").text == "2"
    pids = sorted(processes_in_sandbox(sb.sandbox_id))
    print(json.dumps({"merges": {p: ksm.process_merges(p) for p in pids}, "ksmd": dataclasses.asdict(ksm.status())}))
'''


@pytest.fixture
def ksmd_as_found():
    """Whatever a case does, ksmd's knobs end as they were (the host's, not ours to leave changed)."""
    found = {name: ksm._read(name) for name in ksm.KNOBS}
    yield found
    ksm._put_back(found)


def _probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SANDLOT_") or k == "SANDLOT_REQUIRE_SANDBOX"}
    full.update(SANDLOT_POOL_MIN="0", **env)  # no warm pool: the one sandbox asked for, nothing more
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=full, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("boot", ["zygote", "exec"])
def test_sandbox_processes_are_mergeable_only_when_asked(boot, ksmd_as_found):
    zygote = {"SANDLOT_ZYGOTE": "1" if boot == "zygote" else "0"}
    off = _probe(**zygote)
    assert len(off["merges"]) >= 2, off  # the agent (pid 1) and the session (and an exec'd boot's outer process)
    assert set(off["merges"].values()) == {False}, off
    assert {name: ksm._read(name) for name in ksm.KNOBS} == ksmd_as_found  # not asked: ksmd untouched

    on = _probe(SANDLOT_KSM="1", **zygote)
    assert len(on["merges"]) >= 2, on
    assert set(on["merges"].values()) == {True}, on
    if ksmd_as_found["run"] == 0 and os.geteuid() == 0:
        # It was off: on while that program ran, with Sandlot's bounded budget...
        assert on["ksmd"]["running"], on
        assert (on["ksmd"]["pages_to_scan"], on["ksmd"]["sleep_millisecs"]) == (ksm.PAGES_TO_SCAN, ksm.SLEEP_MILLISECS)
    elif ksmd_as_found["run"] == 1:  # an operator's ksmd keeps its own settings
        assert (on["ksmd"]["pages_to_scan"], on["ksmd"]["sleep_millisecs"]) == (
            ksmd_as_found["pages_to_scan"], ksmd_as_found["sleep_millisecs"])
    # ...and back as found once it exited.
    assert {name: ksm._read(name) for name in ksm.KNOBS} == ksmd_as_found


def test_doctor_says_whether_ksm_is_available_and_asked(ksmd_as_found):
    def check(**env: str) -> dict:
        full = {k: v for k, v in os.environ.items() if k != "SANDLOT_KSM"}
        full.update(env)
        r = subprocess.run([sys.executable, "-m", "sandlot.cli", "doctor", "--no-sandbox", "--json"], cwd=ROOT,
                           env=full, capture_output=True, text=True, timeout=120)
        return next(c for c in json.loads(r.stdout)["host"] if c["name"] == "memory merging (KSM)")

    off, on = check(), check(SANDLOT_KSM="1")
    assert off["ok"] and not off["required"], off
    assert "off for sandboxes" in off["detail"] and "on for sandboxes" in on["detail"], (off, on)
    daemon = "ksmd runs" if ksmd_as_found["run"] == 1 else "ksmd off"
    assert daemon in off["detail"] and daemon in on["detail"], (off, on)  # the doctor looks, it never turns it on
    assert {name: ksm._read(name) for name in ksm.KNOBS} == ksmd_as_found


def test_a_server_asked_for_ksm_marks_its_tenants_sandboxes_and_puts_ksmd_back_when_it_stops(tmp_path, ksmd_as_found):
    import sandlot

    from .conftest import processes_in_sandbox
    from .serverproc import ServerProcess

    env = {k: v for k, v in os.environ.items() if k != "SANDLOT_KSM"}
    server = ServerProcess(tmp_path / "sandlot.db", "--ksm", env=dict(env, SANDLOT_POOL_MIN="0")).start()
    try:
        if ksmd_as_found["run"] == 0 and os.geteuid() == 0:  # it was off: on, with Sandlot's budget
            assert (ksm._read("run"), ksm._read("pages_to_scan"), ksm._read("sleep_millisecs")) == (
                1, ksm.PAGES_TO_SCAN, ksm.SLEEP_MILLISECS)
        key = server.key("acme")
        with sandlot.Sandbox(api_url=server.url, api_key=key) as sb:
            assert sb.run_code("import pandas; 1+1").text == "2"
            merges = {pid: ksm.process_merges(pid) for pid in processes_in_sandbox(sb.sandbox_id)}
        assert len(merges) >= 2 and set(merges.values()) == {True}, merges
    finally:
        server.stop()
    assert {name: ksm._read(name) for name in ksm.KNOBS} == ksmd_as_found, server.log()


SELF_MARK = r'''
import ctypes, errno, mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
def call(f, *args):
    ctypes.set_errno(0)
    return 0 if f(*args) == 0 else errno.errorcode[ctypes.get_errno()]
area = mmap.mmap(-1, 1 << 20)
addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
result = {"prctl": call(libc.prctl, 67, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
          "madvise": call(libc.madvise, addr, 1 << 20, 12),
          "unmark": call(libc.madvise, addr, 1 << 20, 13), "dontneed": call(libc.madvise, addr, 1 << 20, 4)}
result
'''


def test_a_sandbox_cannot_mark_its_own_memory_mergeable_unless_the_operator_asked(sandbox):
    """On a host whose ksmd runs for others (VMs), a sandbox that merged its pages with theirs could time
    copy-on-write faults to learn what they hold: marking is the operator's choice, refused inside otherwise."""
    ex = sandbox.run_code(SELF_MARK)
    assert ex.error is None, ex.error
    result = eval(ex.text)  # noqa: S307 - our own probe's dict of plain values
    assert result["prctl"] == "EPERM" and result["madvise"] == "EPERM", result
    assert result["unmark"] == 0 and result["dontneed"] == 0, result  # opting out and other advice still work
    from .conftest import processes_in_sandbox

    assert {ksm.process_merges(pid) for pid in processes_in_sandbox(sandbox.sandbox_id)} == {False}
