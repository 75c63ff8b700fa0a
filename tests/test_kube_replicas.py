"""Two server replicas of the kubernetes tier on one PostgreSQL (Debian's, started by the tests): any replica serves
any sandbox, a sandbox moves between them with its session, quotas count every replica's sandboxes, and a replica
that starts leaves the other's sandboxes alone. The cluster is the emulated one (tests/kube_cluster.py)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

import sandlot
from sandlot import QuotaExceeded
from sandlot._backends import kubernetes as kube

from . import postgres
from .conftest import needs_sandbox
from .serverproc import ServerProcess

pytestmark = [needs_sandbox]
kube_cluster = pytest.importorskip("tests.kube_cluster", reason="the cluster emulator needs kmock and kubernetes_asyncio "
                                   "(pip install -e '.[test]')")
postgres_server, pg_url = postgres.postgres_server, postgres.pg_url  # the fixtures, for this module's tests


@pytest.fixture(scope="module")
async def cluster():
    async with kube_cluster.KubeCluster() as c:
        await c.apply_template("python")
        yield c


async def _gone(cluster, name: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while cluster.claim(name) is not None:
        assert time.monotonic() < deadline, f"claim {name} still there"
        await asyncio.sleep(0.05)


async def test_two_replicas_on_one_postgresql_serve_any_sandbox(cluster, pg_url, tmp_path):
    env = dict(os.environ, KUBECONFIG=cluster.kubeconfig, SANDLOT_KUBE_NAMESPACE=cluster.namespace)
    replicas = [ServerProcess(tmp_path / f"replica{i}.db", "--isolations", "kubernetes", env=env) for i in (1, 2)]
    for replica in replicas:
        replica.db_path = pg_url  # both on the one database
    a, b = replicas
    await asyncio.to_thread(a.start)  # in threads: the emulated cluster answers from this event loop
    await asyncio.to_thread(b.start)
    try:
        from sandlot.server import Store

        store = Store(pg_url)
        try:
            store.create_tenant("acme")
            key = store.create_key("acme")
            store.set_quotas("acme", max_live=2)
        finally:
            store.close()
        on_a = await sandlot.AsyncSandbox.create(api_url=a.url, api_key=key)
        assert (await on_a.run_code("n = 1")).error is None
        # The same sandbox through the other replica: it takes the pod's channel over, the session comes along.
        on_b = await sandlot.AsyncSandbox.connect(on_a.sandbox_id, api_url=b.url, api_key=key)
        assert (await on_b.run_code("n += 1; n")).results[0].text == "2"
        # And back: the first replica was told it lost the sandbox (it forgot it, did not end it).
        assert (await on_a.run_code("n += 1; n")).results[0].text == "3"
        assert (await on_b.run_code("n")).results[0].text == "3"
        assert cluster.claim(kube.claim_name(on_a.sandbox_id)) is not None
        # Quotas count every replica's sandboxes: the tenant may hold 2 in all.
        second = await sandlot.AsyncSandbox.create(api_url=b.url, api_key=key)
        with pytest.raises(QuotaExceeded):
            await sandlot.AsyncSandbox.create(api_url=a.url, api_key=key)
        # A replica that restarts leaves the other's sandboxes running (none is marked lost).
        await asyncio.to_thread(a.kill9)
        await asyncio.to_thread(a.start)
        assert (await second.run_code("'still here'")).results[0].text == "'still here'"
        listed = {i.sandbox_id: i.status for i in await sandlot.AsyncSandbox.list(api_url=a.url, api_key=key)}
        assert listed == {on_a.sandbox_id: "running", second.sandbox_id: "running"}
        # Killed through either replica, each sandbox's claim goes.
        await on_b.kill()
        await second.kill()
        await _gone(cluster, kube.claim_name(on_a.sandbox_id))
        await _gone(cluster, kube.claim_name(second.sandbox_id))
    finally:
        for replica in replicas:
            await asyncio.to_thread(replica.stop)
