"""Shared fixtures. Tests run real sandboxes: they need Linux user namespaces and writable cgroups,
which `.ci/run` provides (root on a fresh Debian 12). Where the machine lacks one, tests skip and say why."""

from __future__ import annotations

import os

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


@pytest.fixture
def sandbox():
    if PROBLEM:
        pytest.skip(PROBLEM)
    with sandlot.Sandbox() as sb:
        yield sb


@pytest.fixture(scope="module")
def shared_sandbox():
    """One sandbox for a module of read-only checks (cheaper than one per test)."""
    if PROBLEM:
        pytest.skip(PROBLEM)
    with sandlot.Sandbox() as sb:
        yield sb


@pytest.fixture
async def asandbox():
    if PROBLEM:
        pytest.skip(PROBLEM)
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
