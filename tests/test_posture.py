"""Posture, checked from inside a real sandbox: the hardening checklist holds by default."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from sandlot import _doctor
from sandlot._backends.process import UID_BASE

from .conftest import needs_sandbox

pytestmark = [needs_sandbox, pytest.mark.usefixtures("tier")]


def _facts(sandbox) -> dict:
    ex = sandbox.run_code(_doctor.POSTURE_PROBE)
    assert ex.error is None, ex.error
    return json.loads("".join(ex.logs.stdout))


def test_kernel_fences(shared_sandbox):
    facts = _facts(shared_sandbox)
    assert facts["seccomp"] == "2"
    assert facts["no_new_privs"] == "1"
    assert int(facts["cap_eff"], 16) == 0 and int(facts["cap_prm"], 16) == 0 and int(facts["cap_bnd"], 16) == 0


def test_namespaces_differ_from_host(shared_sandbox):
    facts = _facts(shared_sandbox)
    for name, inside in facts["ns"].items():
        assert inside != os.readlink(f"/proc/self/ns/{name}"), name


def test_identity_is_unprivileged(shared_sandbox, tier):
    from .conftest import processes_in_sandbox

    facts = _facts(shared_sandbox)
    assert facts["uid"] == 1000 and facts["gid"] == 1000
    uids = processes_in_sandbox(shared_sandbox.sandbox_id)
    if tier == "gvisor":
        # The code runs on gVisor's kernel, whose sentry runs as host "nobody" in a user namespace of
        # its own (runsc's gofer, which serves it the read-only files, runs as root by design).
        assert facts["kernel_release"] != os.uname().release
        sentries = [pid for pid in uids if _cmdline(pid).startswith(b"runsc-sandbox")]
        assert sentries and all(uids[pid] == 65534 for pid in sentries), uids
        return
    # Seen from the host, every process of the sandbox runs as a uid of the sandbox range.
    assert uids and all(uid >= UID_BASE for uid in uids.values()), uids
    # And the map (relative to the parent namespace) never reaches the parent's root.
    rows = [facts["uid_map"][i:i + 3] for i in range(0, len(facts["uid_map"]), 3)]
    assert all(int(outside) != 0 for _, outside, _ in rows)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_root_readonly_network_and_processes(shared_sandbox):
    facts = _facts(shared_sandbox)
    assert facts["root_readonly"] and facts["home_writable"]
    assert facts["interfaces"] == ["lo"]
    assert facts["pids_visible"][0] == 1 and max(facts["pids_visible"]) < 100  # only the sandbox's own
    assert facts["sid"] == 1
    assert facts["secrets_visible"] == []


def test_rlimits(shared_sandbox):
    facts = _facts(shared_sandbox)
    limits = shared_sandbox.limits
    assert facts["rlimit_core"] == 0
    assert facts["rlimit_nofile"] == limits.open_files
    assert limits.pids <= facts["rlimit_nproc"] <= limits.pids + 8  # the cgroup's pids.max refuses first


def test_root_shows_only_what_the_template_needs(shared_sandbox, tier):
    from sandlot._templates import python_template

    def listing(path: str) -> list:  # os.listdir, not `ls`: see the README on coreutils under gVisor
        return _value(shared_sandbox, f"sorted(__import__('os').listdir({path!r}))")

    prefixes = python_template().prefixes  # the interpreter's own trees (a venv, a pyenv), wherever they are
    top = listing("/")
    expected = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "opt", "dev", "proc", "tmp", "home",
                ".sandlot-scratch", ".sandlot-zygote"} | {p.split("/")[1] for p in prefixes}
    if tier == "gvisor":
        expected.add("sys")  # runsc insists on a /sys mount: ours is an empty, closed tmpfs
    assert set(top) <= expected, set(top) - expected
    if "root" in top and not any(p.startswith("/root/") for p in prefixes):
        assert listing("/root") == []
    for p in prefixes:  # each prefix's parents show only the way down to it, never their other contents
        parent = os.path.dirname(p)
        if parent not in ("/", "/tmp", "/home"):
            listed = listing(parent)
            assert listed == [os.path.basename(p)] or set(listed) <= {os.path.basename(q) for q in prefixes}, listed
    etc = set(listing("/etc"))
    assert "shadow" not in etc and "passwd" in etc


def _value(sandbox, code: str):
    ex = sandbox.run_code(code)
    assert ex.error is None, ex.error
    return ast.literal_eval(ex.text)


def test_tmp_and_shm_are_capped_tmpfs(shared_sandbox, tier):
    if tier == "gvisor":
        # Home, /tmp and /dev/shm come through the gofer from one host tmpfs with the caps.
        # Found by the sandbox's id: a warm sandbox may have booted under an earlier test's data dir.
        rw = f"/sandboxes/{shared_sandbox.sandbox_id}/rw"
        with open("/proc/self/mountinfo") as f:
            line = next(line for line in f if line.split()[4].endswith(rw))
        assert " - tmpfs " in line, line
        assert f"size={shared_sandbox.limits.disk // 1024}k" in line and f"nr_inodes={shared_sandbox.limits.inodes}" in line
        inside = shared_sandbox.commands.run("cat /proc/self/mounts").stdout
        assert all(f" {p} " in inside for p in ("/home/user", "/tmp", "/dev/shm")), inside
        return
    out = shared_sandbox.commands.run("cat /proc/self/mountinfo").stdout
    scratch = [line for line in out.splitlines() if " /home/user " in line]
    assert scratch and "tmpfs" in scratch[0]
    assert f"size={shared_sandbox.limits.disk // 1024}k" in scratch[0]
    assert f"nr_inodes={shared_sandbox.limits.inodes}" in scratch[0]


def test_doctor_cli_passes_here():
    out = subprocess.run([sys.executable, "-m", "sandlot.cli", "doctor", "--json"], capture_output=True,
                         text=True, timeout=120)
    report = json.loads(out.stdout)
    failing = [c for c in report["host"] + report["posture"] if c["required"] and not c["ok"]]
    assert out.returncode == 0 and report["ok"], failing
    assert {c["name"] for c in report["posture"]} >= {"seccomp filter", "no capabilities", "network"}
    durable = [c for c in report["host"] if c["name"] == "durable sessions"]  # pidfd_getfd works for root here
    assert durable and durable[0]["ok"] and not durable[0]["required"], durable
