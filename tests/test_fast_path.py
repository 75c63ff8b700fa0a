"""The fast path: zygote forks and warm pools give sandboxes indistinguishable from fresh ones."""

from __future__ import annotations

import json
import time

import sandlot
from sandlot import Sandbox

from .conftest import needs_sandbox, processes_in_sandbox

pytestmark = needs_sandbox

PROBE = ("import random, uuid, os, numpy, json\n"
         "print(json.dumps([random.random(), str(uuid.uuid4()), float(numpy.random.rand()), os.urandom(8).hex(),"
         " os.readlink('/proc/self/ns/mnt'), os.readlink('/proc/self/ns/pid'), os.readlink('/proc/self/ns/net')]))")


def _probe(sb: Sandbox) -> list:
    ex = sb.run_code(PROBE)
    assert ex.error is None, ex.error
    return json.loads("".join(ex.logs.stdout))


def test_forks_of_one_zygote_do_not_share_randomness_or_namespaces():
    with Sandbox() as a, Sandbox() as b, Sandbox(limits={"disk": "128M"}) as c:  # pooled, pooled, direct fork
        values = [_probe(sb) for sb in (a, b, c)]
    for i, name in enumerate(["random", "uuid4", "numpy.random", "urandom", "mnt ns", "pid ns", "net ns"]):
        column = [v[i] for v in values]
        assert len(set(column)) == 3, f"{name} repeated across sandboxes: {column}"


def test_preloaded_modules_are_ready_at_once(sandbox):
    t0 = time.monotonic()
    ex = sandbox.run_code("import pandas as pd, numpy, matplotlib.pyplot, scipy, sklearn; pd.DataFrame({'a': [1, 2]}).a.sum()")
    assert ex.text == "3" and ex.error is None
    assert time.monotonic() - t0 < 0.5  # a cold import of pandas alone takes longer than this


def test_pooled_sandbox_gets_its_owner_env_and_limits():
    sandlot.configure_pool("python", min_ready=1)
    try:
        Sandbox().kill()  # make sure the pool has filled at least once
        time.sleep(0.5)
        with Sandbox(env={"OWNER": "me"}, limits={"memory": "300M", "output": 2048}) as sb:
            assert sb.run_code("import os; os.environ['OWNER']").text == "'me'"
            assert sb.commands.run("echo $OWNER").stdout == "me\n"
            ex = sb.run_code("blob = bytearray(400 * 1024 * 1024)")
            assert ex.error is not None and ex.error.limit == "memory"
            assert sb.run_code("print('x' * 5000)").error.limit == "output"
    finally:
        sandlot.configure_pool("python", min_ready=2)


def test_sandbox_is_never_reused():
    seen = set()
    for _ in range(4):
        with Sandbox() as sb:
            assert sb.sandbox_id not in seen
            seen.add(sb.sandbox_id)
            assert sb.run_code("'leftover' in globals()").text == "False"
            sb.run_code("leftover = 1")
            assert not sb.files.exists("/tmp/marker")
            sb.files.write("/tmp/marker", "x")


def test_idle_session_is_cheap(sandbox):
    sandbox.run_code("import pandas as pd; df = pd.DataFrame({'a': range(10)})")
    metrics = sandbox.metrics()
    # Pages shared with the zygote are not charged to the sandbox: an idle pandas session costs
    # a few MiB of its own, not the ~170 MiB an interpreter with these modules occupies.
    assert metrics.memory < 40 * 1024 * 1024, metrics
    assert len(processes_in_sandbox(sandbox.sandbox_id)) == 2  # the agent (pid 1) and the session


def test_env_and_first_cell_arriving_together_both_count():
    """A pooled sandbox gets its owner's env and first cell back to back; neither may be lost."""
    sandlot.configure_pool("python", min_ready=2)
    for i in range(6):
        ex = sandlot.run_code("import os; os.environ['N']", env={"N": str(i)}, timeout=10)
        assert ex.text == repr(str(i)), ex.error
