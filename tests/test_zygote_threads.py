"""A zygote is forked from in two ways: one whose preload runs no thread gives birth to pid 1 of each sandbox
straight into its namespaces (clone(2), bypassing libc's fork); one whose preload started threads (a BLAS pool
a template asked for in its env) forks an outer process instead, as libc's fork requires. Both boot sandboxes
that work and hold the same shape: pid 1 and the session, nothing else."""

from __future__ import annotations

import dataclasses
import os

import pytest

import sandlot
from sandlot._templates import python_template, register_transient, unregister_transient

from .conftest import needs_sandbox

pytestmark = [needs_sandbox, pytest.mark.tiers("process"), pytest.mark.usefixtures("tier")]

MATMUL = "import numpy; print((numpy.ones((64, 64)) @ numpy.ones((64, 64)))[0, 0])"
SHAPE = "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.getppid())"


def started_zygote_threads(template) -> int:
    """Threads of the template's zygote, started now (before its first fork: libc's fork makes OpenBLAS
    stop its pool, which it starts again only for work)."""
    from sandlot._engine import default_engine

    zygote = default_engine().backend("process").zygote_for(template)
    zygote.ensure_started()
    return len(os.listdir(f"/proc/{zygote.pid}/task"))


@pytest.fixture(params=["1", "2"], ids=["single-threaded", "blas-pool"])
def blas_template(request, monkeypatch):
    monkeypatch.setenv("SANDLOT_ZYGOTE", "1")
    threads = request.param
    base = python_template()
    env = tuple((k, threads if k.endswith("_NUM_THREADS") else v) for k, v in base.env)
    template = dataclasses.replace(base, name=f"python-blas-{threads}", env=env, preload=("numpy",))
    sandlot.configure_pool(template.name, min_ready=0)  # each sandbox a direct fork of the zygote
    register_transient(template)
    yield template, int(threads)
    unregister_transient(template.name)


def test_forks_of_a_zygote_with_or_without_threads_work_alike(blas_template):
    template, threads = blas_template
    name = template.name
    started = started_zygote_threads(template)
    if threads > 1 and started == 1:
        pytest.skip("this numpy's BLAS starts no thread pool: the zygote stays single-threaded")
    assert (started > 1) == (threads > 1)
    for _ in range(2):  # with a pool: the first through an outer process, the next born pid 1 (pool stopped)
        with sandlot.Sandbox(name, isolation="process") as sb:
            run = sb.run_code(MATMUL)
            assert run.error is None, run.error
            assert "".join(run.logs.stdout).strip() == "64.0"
            run = sb.run_code(SHAPE)
            assert run.error is None, run.error
            pids, parent = "".join(run.logs.stdout).rsplit(" ", 1)
            assert pids == "[1, 2]"  # pid 1 and this session: no outer process, no stray
            assert parent.strip() == "1"
