"""The gVisor keeper's relay rules, proven fast: a real keeper process (sandlot/_host/keeper.py, run as the
gVisor tier runs it) whose "runsc" is ``cat``, so what reaches the agent's side comes back as it arrived.

Only whole frames cross (an owner dying mid-frame leaves nothing in the agent's stream), a new owner is
announced to the agent first and takes over from the one before, and the lease decides when an ownerless
sandbox ends. The full story under runsc is tests/test_gvisor_keeper.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandlot._agent import protocol
from sandlot._host import keeper

KEEPER = keeper.__file__


@pytest.fixture
def started(tmp_path):
    """Start a keeper over ``cat`` in a home of its own; yields (home, process); kills it afterwards."""
    procs = []

    def start() -> tuple[Path, subprocess.Popen]:
        home = tmp_path / f"sb-{len(procs)}"
        home.mkdir(mode=0o700)
        config = {"home": str(home), "cgroups": [], "run": ["cat"], "delete": ["true"]}
        proc = subprocess.Popen([sys.executable, "-I", "-S", KEEPER, json.dumps(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        assert proc.stdout.readline() == b"ready\n"
        proc.stdout.close()
        return home, proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _connect(home: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(home / keeper.SOCKET))
    sock.settimeout(10)
    return sock


def _frames(sock: socket.socket, count: int) -> list[dict]:
    """The next ``count`` whole frames' headers (a framing error fails the test)."""
    buffer, found = protocol.FrameBuffer(), []
    while len(found) < count:
        data = sock.recv(65536)
        assert data, f"the keeper closed the connection after {found}"
        found += [header for header, _ in buffer.feed(data)]
    return found


def _lease(seconds: float) -> bytes:
    return protocol.encode({"t": "lease", "id": 0, "until": time.time() + seconds})


def test_an_owner_dying_mid_frame_leaves_the_agents_stream_whole_and_the_next_owner_is_announced(started):
    home, proc = started()
    first = _connect(home)
    first.sendall(_lease(60) + protocol.encode({"t": "ping", "id": 1}))
    assert [h["t"] for h in _frames(first, 2)] == ["lease", "ping"]
    half = protocol.encode({"t": "exec", "id": 2, "code": "x = 1"}, b"p" * 1000)
    first.sendall(half[: len(half) // 2])
    first.close()  # dies mid-frame
    time.sleep(0.2)
    assert proc.poll() is None  # leased: it outlives its owner
    second = _connect(home)
    second.sendall(protocol.encode({"t": "ping", "id": 1}))
    # The agent's stream saw: the new owner's announcement, then the new owner's frame; nothing of the half.
    assert _frames(second, 2) == [{"t": "owner", "id": 0}, {"t": "ping", "id": 1}]
    second.sendall(protocol.encode({"t": "ping", "id": 3}))
    assert _frames(second, 1) == [{"t": "ping", "id": 3}]


def test_a_new_owner_takes_over_from_a_connected_one(started):
    home, proc = started()
    first = _connect(home)
    first.sendall(_lease(60))
    assert _frames(first, 1)[0]["t"] == "lease"
    second = _connect(home)
    assert first.recv(65536) == b""  # the earlier owner is let go
    second.sendall(protocol.encode({"t": "ping", "id": 1}))
    assert [h["t"] for h in _frames(second, 2)] == ["owner", "ping"]
    assert proc.poll() is None


def test_without_a_lease_it_ends_with_its_owner_and_cleans_its_home(started):
    home, proc = started()
    owner = _connect(home)
    owner.sendall(protocol.encode({"t": "ping", "id": 1}))
    assert _frames(owner, 1)[0]["t"] == "ping"
    owner.close()
    assert proc.wait(10) == 128 + 9  # its "runsc" was killed
    assert not home.exists()  # ownerless at the end: the keeper cleaned up itself


def test_an_ownerless_sandbox_ends_at_its_lease(started):
    home, proc = started()
    owner = _connect(home)
    owner.sendall(_lease(1.5))
    assert _frames(owner, 1)[0]["t"] == "lease"
    owner.close()
    time.sleep(0.5)
    assert proc.poll() is None
    assert proc.wait(10) == 128 + 9
    assert not home.exists()


def test_a_keeper_restoring_a_paused_sandbox_starts_with_its_lease(started):
    home, proc = started()
    owner = _connect(home)
    owner.sendall(_lease(60))
    assert _frames(owner, 1)[0]["t"] == "lease"
    (home / "image").mkdir()  # as a pause leaves it: the next keeper runs `runsc restore` in the same home
    owner.close()
    proc.kill()  # gone as a keeper is once runsc checkpointed
    proc.wait()
    restored = home
    config = {"home": str(restored), "cgroups": [], "run": ["cat"], "delete": ["true"]}
    again = subprocess.Popen([sys.executable, "-I", "-S", KEEPER, json.dumps(config)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    try:
        assert again.stdout.readline() == b"ready\n"
        owner = _connect(restored)
        owner.sendall(protocol.encode({"t": "ping", "id": 1}))
        assert _frames(owner, 1)[0]["t"] == "ping"
        owner.close()  # ownerless, but leased: it lives on
        time.sleep(0.5)
        assert again.poll() is None
    finally:
        again.kill()
        again.wait()


def test_the_socket_is_its_owners_alone(started):
    home, _ = started()
    assert (os.stat(home / keeper.SOCKET).st_mode & 0o777) == 0o600
