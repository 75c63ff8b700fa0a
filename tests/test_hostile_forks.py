"""What sandboxes share with each other, on both tiers: the hostile side of the zygote fast path.

Forks of one zygote share what a fork cannot renew: Python's string-hash secret, the address-space
layout (ASLR) and the stack canary. That is documented as the price of the fast path (README, "Security:
what a sandbox can and cannot observe of others"); a template with ``zygote=False`` (sandbox.yaml
``zygote: false``) or ``SANDLOT_ZYGOTE=0`` execs each sandbox instead, and these tests hold both truths.

Every sandbox of the process tier (forked or exec'd) reads the same host inodes for its read-only root.
inotify on them would report other sandboxes' (and the host's) file opens: inotify is refused (ENOSYS, so
tools fall back to polling). Locks on those inodes (flock, fcntl) are a channel between two sandboxes that
*both* use it, and show nothing of a sandbox that does not: documented (a private copy of every shared inode,
device nodes included, is not cheap); the gVisor tier keeps locks inside each sentry. All hostile code runs inside sandboxes; the host only opens a file and reads results.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import platform

import pytest

import sandlot
from sandlot._templates import python_template, register_transient, unregister_transient

from .conftest import needs_sandbox

pytestmark = [needs_sandbox, pytest.mark.usefixtures("tier")]

# Boot-time limits unlike the template's defaults: the sandbox is made now (forked from the zygote, or
# exec'd), never taken from a warm pool that an earlier test filled under other settings.
DIRECT = {"open_files": 1000}

# What a memory-corruption exploit aimed at another sandbox would need to know, seen from inside.
FINGERPRINT = r"""
import ctypes, json, platform
libc = ctypes.CDLL(None)
libc.pthread_self.restype = ctypes.c_void_p
found = {"hash": hash("sandlot"), "libc": ctypes.cast(libc.printf, ctypes.c_void_p).value,
         "heap": id(object())}
if platform.machine() == "x86_64":  # glibc keeps the canary in the thread control block, at %fs:0x28
    found["canary"] = ctypes.c_uint64.from_address(libc.pthread_self() + 0x28).value
print(json.dumps(found))
"""
SHARED_BY_FORKS = ("hash", "libc", "canary") if platform.machine() == "x86_64" else ("hash", "libc")


def fingerprint(sb) -> dict:
    execution = sb.run_code(FINGERPRINT)
    assert execution.error is None, execution.error
    return json.loads("".join(execution.logs.stdout))


@pytest.fixture
def zygote_on(monkeypatch, tier):
    """The fast path as a server runs it (the CLI turns it off for its one-shot sandboxes)."""
    monkeypatch.setenv("SANDLOT_ZYGOTE", "1")


@pytest.fixture
def fresh_template(tier):
    """The builtin python template, opted out of the zygote (what sandbox.yaml `zygote: false` records)."""
    template = dataclasses.replace(python_template(), name="python-no-zygote", zygote=False)
    sandlot.configure_pool(template.name, min_ready=0)
    register_transient(template)
    yield template.name
    unregister_transient(template.name)


# -- what forks share, and the opt-out -----------------------------------------------------------------

@pytest.mark.tiers("process")
def test_sandbox_yaml_zygote_false_reaches_the_template(tier, tmp_path):
    from sandlot._sandboxfile import load_file
    from sandlot._templates import from_record

    (tmp_path / "sandbox.yaml").write_text("base: python:3.12-slim\nzygote: false\n")
    assert load_file(str(tmp_path / "sandbox.yaml"))[0].zygote is False
    (tmp_path / "sandbox.yaml").write_text("base: python:3.12-slim\n")
    assert load_file(str(tmp_path / "sandbox.yaml"))[0].zygote is None  # the base's choice
    record = {"name": "t", "rootfs": str(tmp_path), "python": "/usr/bin/python3", "preload": ["json"]}
    assert from_record(record).zygote is True
    assert from_record(dict(record, zygote=False)).zygote is False


def test_sandboxes_of_the_fast_path_share_hash_secret_layout_and_canary(tier, zygote_on):
    with sandlot.Sandbox(limits=DIRECT) as a, sandlot.Sandbox(limits=DIRECT) as b:
        first, second = fingerprint(a), fingerprint(b)
    if tier == "process":
        # Documented: one zygote, one secret, one layout, one canary.
        assert {k: first[k] for k in SHARED_BY_FORKS} == {k: second[k] for k in SHARED_BY_FORKS}
    else:
        # gVisor has no zygote: each sandbox's interpreter starts from exec, inside its own sentry.
        assert all(first[k] != second[k] for k in SHARED_BY_FORKS), (first, second)


@pytest.mark.tiers("process")
def test_a_template_without_zygote_gives_each_sandbox_its_own_secret_layout_and_canary(tier, zygote_on,
                                                                                       fresh_template):
    with sandlot.Sandbox(template=fresh_template, limits=DIRECT) as a, \
            sandlot.Sandbox(template=fresh_template, limits=DIRECT) as b:
        first, second = fingerprint(a), fingerprint(b)
    assert all(first[k] != second[k] for k in SHARED_BY_FORKS), (first, second)
    assert first["heap"] != second["heap"]


@pytest.mark.tiers("process")
def test_zygote_off_host_wide_gives_each_sandbox_its_own_secret_layout_and_canary(tier, monkeypatch):
    monkeypatch.setenv("SANDLOT_ZYGOTE", "0")
    with sandlot.Sandbox(limits=DIRECT) as a, sandlot.Sandbox(limits=DIRECT) as b:
        first, second = fingerprint(a), fingerprint(b)
    assert all(first[k] != second[k] for k in SHARED_BY_FORKS), (first, second)


# -- inotify: no sandbox sees another's (or the host's) opens -------------------------------------------

WATCH = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
watcher = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
watch_errno = ctypes.get_errno() if watcher < 0 else 0
if watcher >= 0:
    # IN_ACCESS | IN_OPEN on a stdlib file no one else here touches, and on its directory.
    for path in (PATH, os.path.dirname(PATH)):
        assert libc.inotify_add_watch(watcher, path.encode(), 0x1 | 0x20) >= 0, ctypes.get_errno()
print(watch_errno)
"""
DRAIN = r"""
import select
events = b""
if watcher >= 0:
    if select.select([watcher], [], [], 1.0)[0]:
        events = os.read(watcher, 65536)
print(len(events))
"""


def test_inotify_cannot_watch_other_sandboxes_or_the_host_open_shared_files(tier, zygote_on):
    with sandlot.Sandbox(limits=DIRECT) as watcher, sandlot.Sandbox(limits=DIRECT) as other:
        path = other.run_code("import os; print(os.path.join(os.path.dirname(os.__file__), 'this.py'))")
        path = "".join(path.logs.stdout).strip()
        result = watcher.run_code(f"PATH = {path!r}\n" + WATCH)
        assert result.error is None, result.error
        watch_errno = int("".join(result.logs.stdout))
        # Another sandbox opens and reads it; so does the host, when it is the same file.
        assert other.run_code(f"open({path!r}).read(); None").error is None
        if os.path.exists(path):
            with open(path) as f:
                f.read()
        drained = watcher.run_code(DRAIN)
        assert drained.error is None, drained.error
        seen = int("".join(drained.logs.stdout))
    assert seen == 0, f"{seen} bytes of inotify events from outside the sandbox"
    # One seccomp allowlist for both tiers: inotify answers ENOSYS, so `tail -f` and friends poll.
    assert watch_errno == errno.ENOSYS


# -- locks on the shared read-only root -------------------------------------------------------------------

LOCK = r"""
import errno, fcntl, os
held = open(PATH, "rb")
try:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked")
except OSError as exc:  # gVisor: ENOLCK on its device nodes
    print(errno.errorcode[exc.errno])
"""
TRY_LOCK = r"""
import errno, fcntl, os
with open(PATH, "rb") as probe:  # closing it unlocks
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("free")
    except BlockingIOError:
        print("held")
    except OSError as exc:
        print(errno.errorcode[exc.errno])
"""
STDLIB_FILE = "os.path.join(os.path.dirname(os.__file__), 'this.py')"


@pytest.mark.parametrize("path", [STDLIB_FILE, "'/dev/null'"], ids=["stdlib-file", "dev-null"])
def test_locks_on_the_shared_root_are_a_channel_only_on_the_process_tier(tier, zygote_on, path):
    """Documented truth: two sandboxes that both lock a file of the read-only root (a host directory's
    file, or a device node bound from the host) can signal each other on the process tier (the same host
    inode), not on gVisor's (locks live in each sentry). The zygote opt-out does not change it."""
    with sandlot.Sandbox(limits=DIRECT) as a, sandlot.Sandbox(limits=DIRECT) as b:
        before = "".join(b.run_code(f"import os\nPATH = {path}\n" + TRY_LOCK).logs.stdout).strip()
        locked = "".join(a.run_code(f"import os\nPATH = {path}\n" + LOCK).logs.stdout).strip()
        after = "".join(b.run_code(TRY_LOCK).logs.stdout).strip()
    if tier == "process":
        assert (before, locked, after) == ("free", "locked", "held")
    else:
        assert before == after and after in ("free", "ENOLCK"), (before, locked, after)
