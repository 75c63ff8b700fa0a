"""Hostile suite, issue #8 hole 5: pid 1 (the agent) is not the user's to hurt.

pid 1 keeps real and saved uid 0 of the sandbox's user namespace and takes the user's ids only as
effective ones (no capabilities, empty bounding set, non-dumpable); the session and commands run
with all ids 1000. So user code cannot change pid 1's rlimits, signal it, trace it or read its
private /proc files, and pid 1 holds no descriptor it does not need (nothing of the host's /proc,
nothing shared with another sandbox). Every snippet that attacks runs inside a sandbox; the host
side only reads /proc.
"""

from __future__ import annotations

import ast
import collections
import errno
import json
import os
import subprocess
import sys

import pytest

import sandlot
from sandlot._backends.process import state_dir

from .conftest import needs_sandbox, processes_in_sandbox

pytestmark = [needs_sandbox, pytest.mark.usefixtures("tier")]


def _value(sb, code: str):
    """Run ``code`` whose last expression is a literal; return it (the cell must not fail)."""
    ex = sb.run_code(code)
    assert ex.error is None, f"{ex.error.name}: {ex.error.value}\n{ex.error.traceback}"
    return ast.literal_eval(ex.text)  # never eval(): the text comes from inside the sandbox


def _status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)


def _host_pid1(sb) -> int:
    """The host pid of the sandbox's pid 1 (process tier): the member of its cgroup whose pid there is 1."""
    for pid in processes_in_sandbox(sb.sandbox_id):
        try:
            if _status(pid)["NSpid"].split()[-1] == "1":
                return pid
        except (OSError, KeyError):
            continue
    raise AssertionError(f"no pid 1 found for {sb.sandbox_id}")


def _host_fds(pid: int) -> dict:
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return found


def _kind(target: str) -> str:
    """socket:[123] -> socket, pipe:[7] -> pipe, host:[3] -> host (gVisor's donated host fds); paths stay."""
    kind = target.split(":[", 1)[0]
    if target.startswith(str(state_dir() / "uids") + "/"):
        return "uid lock"
    return kind if kind in ("socket", "pipe", "host") and target.endswith("]") else target


# Run as user code (the session, or `python3 -c` in a command): every way to act on pid 1's rlimits.
PRLIMIT_PID1 = r"""
import resource
out = {}
for name, limit, value in (("nofile", resource.RLIMIT_NOFILE, (3, 3)), ("as", resource.RLIMIT_AS, (1 << 20, 1 << 20)),
                           ("nproc", resource.RLIMIT_NPROC, (0, 0)), ("cpu", resource.RLIMIT_CPU, (1, 1))):
    try:
        resource.prlimit(1, limit, value)
        out[name] = "CHANGED"
    except OSError as e:
        out[name] = e.errno
try:
    resource.prlimit(1, resource.RLIMIT_NOFILE)
    out["read"] = "READ"
except OSError as e:
    out["read"] = e.errno
"""


def test_prlimit_on_pid1_is_refused_and_pid1_keeps_serving(sandbox):
    sandbox.run_code("kept = 'intact'")
    from_session = _value(sandbox, PRLIMIT_PID1 + "out")
    sandbox.files.write("prl.py", PRLIMIT_PID1 + "print(repr(out))")
    r = sandbox.commands.run("python3 prl.py")
    assert r.exit_code == 0, r.stderr
    from_command = ast.literal_eval(r.stdout.strip())
    refused = {"nofile": errno.EPERM, "as": errno.EPERM, "nproc": errno.EPERM, "cpu": errno.EPERM,
               "read": errno.EPERM}
    assert from_session == refused and from_command == refused, (from_session, from_command)
    # pid 1 still opens descriptors, forks commands, moves files and runs cells.
    for i in range(3):
        assert sandbox.commands.run(f"echo alive {i}").stdout == f"alive {i}\n"
    sandbox.files.write("after.txt", "x" * 100_000)
    assert sandbox.files.read("after.txt") == "x" * 100_000
    assert sandbox.run_code("kept").text == "'intact'"
    if sandbox.isolation == "process":  # and its limits are still the ones the host set (seen from the host)
        with open(f"/proc/{_host_pid1(sandbox)}/limits") as f:
            limits = {line[:26].strip(): line[26:].split()[:2] for line in f.read().splitlines()[1:]}
        assert limits["Max open files"] == [str(sandbox.limits.open_files)] * 2, limits
        assert limits["Max address space"] == ["unlimited", "unlimited"], limits


# What user code can see of pid 1 through /proc: its status (public), and nothing private.
PID1_PROC = r"""
import os
out = {}
for name in ("environ", "maps", "fd", "root", "cwd", "mem", "auxv", "stack", "syscall"):
    path = "/proc/1/" + name
    try:
        os.listdir(path) if os.path.isdir(path) else open(path, "rb").read(1)
        out[name] = "OPEN"
    except OSError as e:
        out[name] = e.errno
status = dict(l.split(":", 1) for l in open("/proc/1/status").read().splitlines() if ":" in l)
out["status"] = {k: status[k].split() for k in ("Uid", "Gid", "CapEff", "CapPrm", "CapBnd")}
"""


def test_pid1_identity_and_private_proc_files(sandbox):
    seen = [_value(sandbox, PID1_PROC + "out")]
    sandbox.files.write("p1.py", PID1_PROC + "print(repr(out))")
    r = sandbox.commands.run("python3 p1.py")
    assert r.exit_code == 0, r.stderr
    seen.append(ast.literal_eval(r.stdout.strip()))
    for facts in seen:
        # Real and saved uid 0 of the sandbox's user namespace, the user's ids as effective ones.
        assert facts["status"]["Uid"] == ["0", "1000", "0", "1000"], facts["status"]
        assert facts["status"]["Gid"] == ["0", "1000", "0", "1000"], facts["status"]
        assert {int(facts["status"][k][0], 16) for k in ("CapEff", "CapPrm", "CapBnd")} == {0}, facts["status"]
        private = {k: v for k, v in facts.items() if k != "status"}
        expected = dict.fromkeys(private, errno.EACCES)
        if sandbox.isolation == "gvisor":
            # gVisor's 2022 procfs checks only file modes for these: pid 1's environ, fd list, maps and
            # auxv are readable (README, "The strong tier: gVisor", pid 1); it has no stack or syscall
            # file; root, cwd and memory are closed.
            expected.update(dict.fromkeys(("environ", "fd", "maps", "auxv"), "OPEN"),
                            stack=errno.ENOENT, syscall=errno.ENOENT)
        assert private == expected


def test_user_processes_have_all_ids_1000_and_no_way_back(sandbox):
    probe = r"""
import os
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
out = {"uid": status["Uid"].split(), "gid": status["Gid"].split(), "groups": os.getgroups()}
for name, call in (("setresuid", lambda: os.setresuid(0, 0, 0)), ("setuid", lambda: os.setuid(0)),
                   ("seteuid", lambda: os.seteuid(0)), ("setresgid", lambda: os.setresgid(0, 0, 0))):
    try:
        call()
        out[name] = "BECAME ROOT"
    except OSError as e:
        out[name] = e.errno
"""
    session = _value(sandbox, probe + "out")
    sandbox.files.write("ids.py", probe + "print(repr(out))")
    r = sandbox.commands.run("python3 ids.py")
    assert r.exit_code == 0, r.stderr
    for facts in (session, ast.literal_eval(r.stdout.strip())):
        assert facts == {"uid": ["1000"] * 4, "gid": ["1000"] * 4, "groups": [], "setresuid": errno.EPERM,
                         "setuid": errno.EPERM, "seteuid": errno.EPERM, "setresgid": errno.EPERM}, facts
    if sandbox.isolation != "process":
        return  # gVisor: the host sees only runsc's processes
    sandbox.commands.run("sleep 30 >/dev/null 2>&1 &")
    pid1 = _host_pid1(sandbox)
    one = _status(pid1)["Uid"].split()
    assert one[0] == one[2] != one[1] == one[3], one  # real and saved, apart from effective and fs (host uids)
    user_uid = one[1]
    others = [p for p in processes_in_sandbox(sandbox.sandbox_id) if p != pid1]
    assert len(others) >= 2, others  # the session and the background sleep
    for pid in others:
        assert _status(pid)["Uid"].split() == [user_uid] * 4, (pid, _status(pid)["Uid"])


def test_files_the_agent_writes_belong_to_the_user(sandbox):
    sandbox.files.write("deep/down/f.txt", "content\n")
    sandbox.files.mkdir("made/here")
    owners = _value(sandbox, """
import os
[(p, os.stat(p).st_uid, os.stat(p).st_gid) for p in ('deep', 'deep/down', 'deep/down/f.txt', 'made', 'made/here')]""")
    assert all(uid == gid == 1000 for _, uid, gid in owners), owners
    r = sandbox.commands.run("echo more >> deep/down/f.txt && rm -r made && cat deep/down/f.txt")
    assert r.stdout == "content\nmore\n", r.stderr


def _expected_pid1_fds(isolation: str) -> collections.Counter:
    """What pid 1 needs, and nothing else: its standard streams (/dev/null), the host channel, its
    event loop and wake-up pipe, the session's control socket and output pipes, the number it keeps for a
    next owner's channel (/dev/null while it has an owner), and (process tier) its host uid range's lock."""
    if isolation == "gvisor":
        # 0, 1: the sandbox's /dev/null; 2: the container's stderr; the channel as two host pipes and the
        # socketpair the relay threads feed (boot.py _relay).
        return collections.Counter({"/dev/null": 3, "host": 3, "socket": 3, "pipe": 4, "anon_inode:[eventpoll]": 1})
    return collections.Counter({"/dev/null": 4, "uid lock": 1, "socket": 2, "pipe": 4, "anon_inode:[eventpoll]": 1})


def test_pid1_holds_only_the_descriptors_it_needs(tier):
    a, b = sandlot.Sandbox(), sandlot.Sandbox()
    try:
        for sb in (a, b):
            assert sb.run_code("1 + 1").text == "2"
        if tier == "gvisor":
            # Seen from inside (gVisor's procfs lists pid 1's descriptors to the user; two sandboxes
            # are two sentries, which share nothing).
            for sb in (a, b):
                fds = _value(sb, "import os\n{fd: os.readlink('/proc/1/fd/' + fd) for fd in os.listdir('/proc/1/fd')}")
                assert collections.Counter(_kind(t) for t in fds.values()) == _expected_pid1_fds("gvisor"), fds
            return
        # Both are forks of the template's zygote (pooled or not): anything it leaked, both would hold.
        seen = [_host_fds(_host_pid1(sb)) for sb in (a, b)]
        for fds in seen:
            # None is the host's /proc or root (or any other path), none a stray from the zygote.
            assert collections.Counter(_kind(t) for t in fds.values()) == _expected_pid1_fds("process"), fds
        # (The zygote's uid range lock is held by each of its forks on purpose: the range stays taken while any
        # of them lives, each with a nested slot of its own inside it.)
        shared = {t for t in set(seen[0].values()) & set(seen[1].values()) if _kind(t) != "uid lock"}
        shared -= {"/dev/null", "anon_inode:[eventpoll]"}
        assert not shared, f"pid 1 of two sandboxes hold the same {shared}"
    finally:
        a.kill()
        b.kill()


# The direct path (SANDLOT_ZYGOTE=0), from a separate host process so that no pool or zygote applies.
DIRECT = r"""
import json, sandlot
from tests.test_hostile_pid1 import _host_fds, _host_pid1, _status
with sandlot.Sandbox() as sb:
    sb.run_code("1")
    pid1 = _host_pid1(sb)
    prl = sb.run_code("import resource\ntry:\n    resource.prlimit(1, resource.RLIMIT_NOFILE, (3, 3)); r = 'CHANGED'\n"
                      "except OSError as e:\n    r = e.errno\nr").text
    print(json.dumps({"fds": _host_fds(pid1), "uid": _status(pid1)["Uid"].split(), "prlimit": prl,
                      "cmdline": open(f"/proc/{pid1}/cmdline", "rb").read().split(b"\0")[-2].decode(),
                      "echo": sb.commands.run("echo ok").stdout}))
"""


@pytest.mark.tiers("process")
def test_direct_path_pid1_is_the_same(tier):
    out = subprocess.run([sys.executable, "-c", DIRECT], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         env={**os.environ, "SANDLOT_ZYGOTE": "0", "SANDLOT_POOL_MIN": "0"})
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["cmdline"] != "zygote"  # really the exec'd path
    assert collections.Counter(_kind(t) for t in facts["fds"].values()) == _expected_pid1_fds("process"), facts["fds"]
    uid = facts["uid"]
    assert uid[0] == uid[2] != uid[1], uid
    assert facts["prlimit"] == str(errno.EPERM) and facts["echo"] == "ok\n", facts


# -- image templates: pid 1 execve's the image's interpreter (or the host's, lent to an image without one) ------------
def _images_missing():
    import shutil

    from . import imagekit

    missing = [t for t in ("skopeo", "umoci", "docker-registry") if shutil.which(t) is None]
    return f"{missing} not installed (scripts/setup installs them)" if missing else imagekit.available()


try:
    from .test_images import world  # noqa: F401  (the module fixture: test images in a registry on loopback)
except Exception:  # pragma: no cover - the images test module needs click
    world = None


@pytest.mark.tiers("process")
@pytest.mark.skipif(world is None or _images_missing() is not None, reason=str(world is None or _images_missing()))
def test_image_template_pid1_keeps_its_identity_across_execve(tier, world):  # noqa: F811
    for name, python in (("img-py", True), ("img-base", False)):
        with sandlot.Sandbox(name) as sb:
            sb.commands.run("sleep 30 >/dev/null 2>&1 &")
            if python:
                assert sb.run_code("1").text == "1"  # the session is up
            pid1 = _host_pid1(sb)
            status = _status(pid1)
            uid, gid = status["Uid"].split(), status["Gid"].split()
            assert uid[0] == uid[2] != uid[1] == uid[3] and gid[0] == gid[2] != gid[1] == gid[3], (name, uid, gid)
            assert (status["NoNewPrivs"].strip(), status["Seccomp"].strip()) == ("1", "2"), name
            assert {int(status[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")} == {0}, name
            outer = int(status["PPid"])  # the exec'd path's boot process, waiting outside the pid namespace
            users = [pid for pid in processes_in_sandbox(sb.sandbox_id) if pid not in (pid1, outer)]
            assert users and all(_status(pid)["Uid"].split() == [uid[1]] * 4 for pid in users), (name, users)
            # Non-dumpable after the exec too: pid 1's private /proc files stay closed to the user.
            r = sb.commands.run("cat /proc/1/environ; ls /proc/1/fd; cat /proc/1/maps; echo done")
            assert r.stdout == "done\n" and r.stderr.count("Permission denied") == 3, (name, r)
            sb.files.write("/home/user/mine/f.txt", "x")
            owners = [line.split()[2:4] for line in sb.commands.run("ls -lnd ~/mine ~/mine/f.txt").stdout.splitlines()]
            assert owners == [["1000", "1000"]] * 2, (name, owners)
            kinds = collections.Counter(_kind(t) for t in _host_fds(pid1).values())
            expected = _expected_pid1_fds("process")
            if not python:  # no session process: its socket and two pipes are absent
                expected.subtract({"socket": 1, "pipe": 2})
            assert kinds == +expected, (name, kinds)
            if python:
                sb.files.write("prl.py", PRLIMIT_PID1 + "print(repr(out))")
                r = sb.commands.run("python3 prl.py")
                assert ast.literal_eval(r.stdout.strip()) == dict.fromkeys(("nofile", "as", "nproc", "cpu", "read"),
                                                                          errno.EPERM), r
                assert sb.run_code("6 * 7").text == "42"
            assert sb.commands.run("echo still").stdout == "still\n"
