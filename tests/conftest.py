"""Shared fixtures. Tests run real sandboxes: they need Linux user namespaces and writable cgroups,
which `.ci/run` provides (root on a fresh Debian 12). Where the machine lacks one, tests skip and say why."""

from __future__ import annotations

import glob
import os
import shutil
import time

import pytest

import sandlot
from sandlot._host import cgroups


def _host_problem() -> str | None:
    if not os.path.exists("/proc/self/ns/user"):
        return "kernel without user namespaces"
    info = cgroups.detect()
    if not info["writable"]:
        return "no writable cgroups: " + info["why"]
    return None


PROBLEM = _host_problem()
if PROBLEM and os.environ.get("SANDLOT_REQUIRE_SANDBOX") == "1":
    raise RuntimeError(f"SANDLOT_REQUIRE_SANDBOX=1 but this host cannot run sandboxes: {PROBLEM}")
needs_sandbox = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))


# -- isolation tiers ------------------------------------------------------------------------------------
# A module that marks itself `pytest.mark.usefixtures("tier")` runs every test once per tier: the
# process tier, then gVisor (skipped, saying why, where runsc is missing). The tier reaches the SDK
# the way it reaches a user's code: $SANDLOT_ISOLATION, the default of Sandbox(isolation=...).
# `@pytest.mark.tiers("process")` keeps a test that is about one tier's mechanism to that tier.
RUNSC_MISSING = None if shutil.which("runsc") else "runsc (Debian package `runsc`) is not installed"


def pytest_configure(config):
    config.addinivalue_line("markers", "tiers(*names): the isolation tiers a test runs on (default: every tier)")


def pytest_generate_tests(metafunc):
    if "tier" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("tiers")
    names = marker.args if marker else ("process", "gvisor")
    params = [pytest.param(name, id=name, marks=pytest.mark.skipif(
        name == "gvisor" and RUNSC_MISSING is not None, reason=str(RUNSC_MISSING))) for name in names]
    metafunc.parametrize("tier", params, indirect=True, scope="module")


@pytest.fixture(scope="module")
def tier(request):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SANDLOT_ISOLATION", request.param)
        yield request.param


def _tiered(request) -> None:
    """Fixtures that make sandboxes come after the tier is chosen (and are rebuilt when it changes)."""
    if PROBLEM:
        pytest.skip(PROBLEM)
    if "tier" in request.fixturenames:
        request.getfixturevalue("tier")


@pytest.fixture
def sandbox(request):
    _tiered(request)
    with sandlot.Sandbox() as sb:
        yield sb


@pytest.fixture(scope="module")
def shared_sandbox(tier):
    """One sandbox per tier for a module of read-only checks (cheaper than one per test)."""
    if PROBLEM:
        pytest.skip(PROBLEM)
    with sandlot.Sandbox() as sb:
        yield sb


@pytest.fixture
async def asandbox(request):
    _tiered(request)
    async with sandlot.AsyncSandbox() as sb:
        yield sb


def host_leftovers() -> dict:
    """What a sandbox could leave behind on the host: its cgroups and uid lock files in use."""
    for _ in range(5):  # a cgroup may vanish while we walk the tree: walk again
        try:
            found: dict = {}
            bases = [cgroups.ROOT / c for c in ("memory", "pids", "cpu")]
            if (cgroups.ROOT / "cgroup.controllers").exists():
                bases.append(cgroups.ROOT)
            for base in bases:
                for d in base.glob("**/sandlot/sb-*") if base.exists() else []:
                    found.setdefault("cgroups", []).append(str(d))
            return found
        except FileNotFoundError:
            continue
    return found


def sandbox_processes(uid_range: tuple[int, int] | None = None) -> list[int]:
    """Host pids of live sandbox processes: anything running as a sandbox uid (in ``uid_range`` if given)."""
    from sandlot._backends.process import UID_BASE

    low, high = uid_range or (UID_BASE, 2**32)

    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        uid = int(status.split("\nUid:")[1].split()[0])
        if low <= uid < high or (uid_range is None and b"_agent/boot.py" in cmdline):
            pids.append(int(entry))
    return pids


def http_body_once_up(url: str, headers: "dict | None" = None, within: float = 20.0) -> bytes:
    """The body of a GET of ``url``, retried until its server answers 2xx (a server just started takes a moment)
    or ``within`` seconds have passed (then the last error)."""
    import urllib.request

    deadline = time.monotonic() + within
    while True:
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10).read()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def processes_in_sandbox(sandbox_id: str) -> dict[int, int]:
    """Host pid -> host uid of every process in the sandbox's cgroup (found from the host side)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup") as f:
                if f"/{sandbox_id}" not in f.read():
                    continue
            with open(f"/proc/{entry}/status") as f:
                found[int(entry)] = int(f.read().split("\nUid:")[1].split()[0])
        except (OSError, IndexError):
            continue
    return found


# -- mounts (host directories and volumes) ----------------------------------------------------------------
GRANT_OWNER = 1234  # a host uid that is neither root nor any sandbox's, owning what tests grant writable


def owned_dir(path, uid: int = GRANT_OWNER, mode: int = 0o755):
    """A directory for a grant, owned by ``uid`` (the owner a writable grant writes as)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/status") as f:
                pid = int(f.read().split("\nPPid:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            return False
    return False


def own_sandbox_cgroups() -> set:
    """The sandbox cgroups holding a process of this test run (other runs on the host are not ours)."""
    me = os.getpid()
    found = set()
    for path in host_leftovers().get("cgroups", []):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                procs = [int(p) for p in f.read().split()]
        except OSError:
            continue
        if any(_descends_from(p, me) for p in procs):
            found.add(os.path.basename(path))
    return found


def mounts_under(path) -> list:
    """Host mounts whose mount point lies under ``path`` (a data dir, a tmp_path)."""
    prefix = os.path.realpath(str(path))
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def loops_backed_under(path) -> list:
    """Loop devices whose backing file lies under ``path`` (a test's volume images)."""
    prefix = os.path.realpath(str(path))
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith(prefix + "/"):
            found.append(f"{backing.split('/')[3]}: {name}")
    return found


def wait_until_released(path, seconds: float = 5.0) -> tuple:
    """(mounts, loops) of grants and volumes still under ``path`` after waiting up to ``seconds`` for a killed
    sandbox's to go. A gVisor sandbox's own storage is left out: a warm pool refilling in the background
    (from an earlier test of this process) boots its sandboxes under whatever data dir is set at the time,
    and they are the pool's, alive, not this test's leftovers."""
    deadline = time.monotonic() + seconds
    while True:
        mounts = [m for m in mounts_under(path) if "/gvisor/sandboxes/" not in m]
        left = (mounts, loops_backed_under(path))
        if left == ([], []) or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def volume_home(tmp_path, monkeypatch):
    """A private SANDLOT_DATA_DIR for a test's volumes (never the host's real one); afterwards every volume
    made there is deleted and nothing of them may stay mounted or attached to a loop device."""
    data = tmp_path / "sandlot-data"
    data.mkdir()
    monkeypatch.setenv("SANDLOT_DATA_DIR", str(data))
    yield data
    for info in sandlot.volumes.list():
        sandlot.volumes.delete(info.name)
    assert wait_until_released(data) == ([], []), "a volume stayed mounted or on a loop device"
