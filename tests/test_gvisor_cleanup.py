"""A gVisor sandbox's host-side tmpfs (its home, /tmp and /dev/shm) never outlives it, however its owner ends.

The writable tmpfs is mounted by the host under the data directory; its cleanup runs in the background after
kill(). An owner whose event loop closes right after the kill (``asyncio.run`` returning) must not leave the
mount behind for the next sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import RUNSC_MISSING, needs_sandbox

pytestmark = [needs_sandbox, pytest.mark.skipif(RUNSC_MISSING is not None, reason=str(RUNSC_MISSING))]

OWNER = """
import asyncio, sandlot
async def main():
    sb = await sandlot.AsyncSandbox.create(isolation="gvisor", api_url="")
    assert (await sb.run_code("open('/tmp/x', 'w').write('y' * 1000)")).error is None
    await sb.kill()          # and the loop closes right away
asyncio.run(main())
print("done")
"""


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path))]


def test_an_owner_that_exits_right_after_kill_leaves_no_tmpfs_mounted(tmp_path):
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, SANDLOT_DATA_DIR=str(tmp_path), SANDLOT_POOL_MIN="0", PYTHONPATH=repo)
    done = subprocess.run([sys.executable, "-c", OWNER], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]
    left = _mounts_under(tmp_path)
    for mount in left:  # do not leave the test's own mess on the host either
        subprocess.run(["umount", "-l", mount], check=False)
    assert left == []
