"""The server's state store, the same behaviour from both implementations: SQLite (a file, the default)
and PostgreSQL (a URL; a throwaway server from Debian's package, see tests/postgres.py)."""

from __future__ import annotations

import time

import pytest

from sandlot import QuotaExceeded
from sandlot._exceptions import InvalidRequest
from sandlot.server import Store
from sandlot.server.store import OPERATOR_TENANT, PostgresStore, RowCounts, SQLiteStore

from . import postgres

postgres_server, pg_url = postgres.postgres_server, postgres.pg_url  # the fixtures, for this module's tests

LIMITS = {"memory": 512 * 1024**2, "pids": 256, "cpu": 1.0}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> str:
    """Where a store lives: a SQLite file, or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return str(tmp_path / "sandlot.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db):
    opened = Store(db)
    yield opened
    opened.close()


def at_most(n: int):
    """A quota check for add_sandbox: at most ``n`` live sandboxes, counted from the rows."""
    def check(counts: RowCounts) -> None:
        if counts.live >= n:
            raise QuotaExceeded(f"{counts.live} live sandboxes, quota {n}")
    return check


def add(store, sandbox_id: str, tenant, *, metadata=None, created_at=None, limits=LIMITS, **kwargs) -> None:
    now = time.time() if created_at is None else created_at
    store.add_sandbox(sandbox_id, tenant, "python", metadata or {}, limits, now, now + 3600, **kwargs)


def test_a_path_opens_sqlite_and_a_url_opens_postgresql(db, store):
    assert type(store) is (PostgresStore if db.startswith("postgresql://") else SQLiteStore)
    assert isinstance(store, Store)


def test_an_unknown_kind_of_url_is_refused_with_what_is_accepted():
    with pytest.raises(InvalidRequest, match="postgresql://"):
        Store("mysql://root:hunter2@db/sandlot")
    with pytest.raises(InvalidRequest) as info:
        Store("mysql://root:hunter2@db/sandlot")
    assert "hunter2" not in str(info.value)


def test_tenants(store):
    acme = store.create_tenant("acme")
    assert acme.name == "acme" and acme.max_live is None
    with pytest.raises(InvalidRequest, match="already exists"):
        store.create_tenant("acme")
    for bad in ("", "-x", "a b", "x" * 65, OPERATOR_TENANT):
        with pytest.raises(InvalidRequest, match="tenant name"):
            store.create_tenant(bad)
    store.create_tenant("beta")
    store.create_operator_key()
    assert [t.name for t in store.tenants()] == ["acme", "beta"]  # never the operator's
    with pytest.raises(InvalidRequest, match="no tenant named"):
        store.tenant("nobody")


def test_quotas_are_stored_whole_sizes_included(store):
    store.create_tenant("acme")
    tenant = store.set_quotas("acme", max_live=3, max_lifetime=86400.5, requests_per_minute=60,
                              total_memory="64G", total_pids=8192, max_volumes=2, total_volume_size="50G",
                              max_paused_bytes="20G")
    assert (tenant.max_live, tenant.max_lifetime, tenant.requests_per_minute) == (3, 86400.5, 60)
    assert tenant.total_memory == 64 * 1024**3 and tenant.total_volume_size == 50 * 1024**3  # past 32 bits
    assert tenant.max_paused_bytes == 20 * 1024**3 and (tenant.total_pids, tenant.max_volumes) == (8192, 2)
    assert store.set_quotas("acme", max_live=4).total_memory == 64 * 1024**3  # None keeps the rest
    for bad in ({"max_live": -1}, {"max_live": True}, {"total_pids": "many"}):
        with pytest.raises(InvalidRequest):
            store.set_quotas("acme", **bad)


def test_keys_authenticate_until_revoked(store):
    key = store.create_key("acme")  # the tenant is made on demand
    assert key.startswith("sl_") and len(key) > 40
    tenant = store.authenticate(key)
    assert tenant.name == "acme" and tenant.role == "tenant" and tenant.key_id.startswith("k_")
    [info] = store.list_keys("acme")
    assert info.key_id == tenant.key_id and key.startswith(info.hint[:9]) and info.last_used_at is not None
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.authenticate("not-a-key") is None and store.authenticate("sl_" + "x" * 200) is None
    second = store.create_key("acme")
    assert store.revoke_key(info.key_id) and not store.revoke_key(info.key_id)
    assert store.authenticate(key) is None and store.authenticate(second).name == "acme"
    assert store.revoke_key(second)  # by the key itself
    assert store.authenticate(second) is None
    with pytest.raises(InvalidRequest):
        store.create_key("nobody", create_tenant=False)


def test_operator_keys(store):
    key = store.create_operator_key()
    again = store.create_operator_key()  # the operator's tenant is made once
    assert store.authenticate(key).role == "operator" and store.authenticate(again).role == "operator"
    assert {k.role for k in store.list_keys()} == {"operator"} and len(store.list_keys()) == 2


def test_sandboxes_rows_filters_and_privacy(store):
    acme, beta = store.create_tenant("acme"), store.create_tenant("beta")
    t0 = time.time()
    add(store, "sb-1", acme, metadata={"job": "etl", "run": "1"}, created_at=t0)
    add(store, "sb-2", acme, metadata={"job": "etl", "run": "2"}, created_at=t0 + 1, isolation="gvisor",
        on_idle="pause")
    add(store, "sb-3", beta, metadata={"job": "etl"}, created_at=t0 + 2)
    row = store.sandbox(acme, "sb-2")
    assert (row.tenant, row.template, row.status, row.isolation, row.on_idle) == ("acme", "python", "running",
                                                                                 "gvisor", "pause")
    assert row.metadata == {"job": "etl", "run": "2"} and row.limits == LIMITS
    assert row.created_at == t0 + 1 and row.expires_at == t0 + 1 + 3600  # times keep their precision
    assert store.sandbox(acme, "sb-3") is None  # another tenant's: not found
    assert [r.id for r in store.sandboxes(acme)] == ["sb-2", "sb-1"]  # newest first
    assert [r.id for r in store.sandboxes(acme, metadata={"run": "1"})] == ["sb-1"]
    assert [r.id for r in store.sandboxes(acme, metadata={"job": "etl", "run": "2"})] == ["sb-2"]
    assert [r.id for r in store.sandboxes(acme, limit=1)] == ["sb-2"]
    store.end_sandbox("sb-1", "ended", "killed by its owner")
    store.end_sandbox("sb-1", "lost", "too late")  # an ended sandbox stays as it ended
    ended = store.sandbox(acme, "sb-1")
    assert (ended.status, ended.end_reason) == ("ended", "killed by its owner") and ended.ended_at >= t0
    assert [r.id for r in store.sandboxes(acme, status="running")] == ["sb-2"]
    store.set_expiry("sb-2", t0 + 99)
    assert store.sandbox(acme, "sb-2").expires_at == t0 + 99


def test_paused_sandboxes_and_counts(store):
    acme = store.create_tenant("acme")
    assert store.counts(acme) == RowCounts(0, 0, 0, 0)
    add(store, "sb-1", acme)
    add(store, "sb-2", acme)
    add(store, "sb-3", acme)
    store.end_sandbox("sb-3", "ended", "done")
    store.set_paused("sb-2", True, 12345)
    assert store.counts(acme) == RowCounts(live=2, memory=LIMITS["memory"], pids=LIMITS["pids"], paused_bytes=12345)
    [(row, tenant)] = store.paused_sandboxes()
    assert (row.id, row.status, row.checkpoint_bytes, tenant.name) == ("sb-2", "paused", 12345, "acme")
    store.set_paused("sb-2", False)
    assert store.paused_sandboxes() == [] and store.sandbox(acme, "sb-2").checkpoint_bytes == 0
    assert store.counts(acme) == RowCounts(2, 2 * LIMITS["memory"], 2 * LIMITS["pids"], 0)


def test_a_quota_checked_on_the_rows_as_one_is_added(store):
    acme = store.create_tenant("acme")
    seen = []
    add(store, "sb-1", acme, check=seen.append)
    add(store, "sb-2", acme, check=at_most(2))
    assert seen == [RowCounts(0, 0, 0, 0)]
    with pytest.raises(QuotaExceeded, match="2 live sandboxes, quota 2"):
        add(store, "sb-3", acme, check=at_most(2))
    assert store.sandbox(acme, "sb-3") is None
    store.end_sandbox("sb-1", "ended", "done")
    add(store, "sb-3", acme, check=seen.append)
    assert seen[-1] == RowCounts(1, LIMITS["memory"], LIMITS["pids"], 0)


def test_handles_restart_and_lost(store):
    acme = store.create_tenant("acme")
    add(store, "sb-1", acme)
    add(store, "sb-2", acme)
    add(store, "sb-3", acme)
    store.set_handle("sb-1", {"record": {"pid": 42}, "spec": {"template": "python"}})
    store.set_paused("sb-3", True, 1)
    handles = dict((row.id, handle) for row, handle in store.running_handles())
    assert handles == {"sb-1": {"record": {"pid": 42}, "spec": {"template": "python"}}, "sb-2": None}
    assert store.handle("sb-1") == handles["sb-1"] and store.handle("sb-2") is None and store.handle("nope") is None
    assert store.mark_running_lost("the server stopped", keep={"sb-1"}) == [("sb-2", "acme")]
    lost = store.sandbox(acme, "sb-2")
    assert (lost.status, lost.end_reason) == ("lost", "the server stopped")
    assert store.sandbox(acme, "sb-1").status == "running" and store.sandbox(acme, "sb-3").status == "paused"


def test_prune_forgets_long_ended_rows(store):
    acme = store.create_tenant("acme")
    add(store, "sb-1", acme, metadata={"k": "v"})
    add(store, "sb-2", acme)
    store.end_sandbox("sb-1", "ended", "done")
    assert store.prune(time.time() - 60) == 0
    assert store.prune(time.time() + 1) == 1  # the running one stays
    assert [r.id for r in store.sandboxes(acme)] == ["sb-2"]
    add(store, "sb-1", acme, metadata={"k": "v"})  # its metadata went with it: the id is free again


def test_audit_log_and_its_pruning(store):
    for i in range(5):
        store.audit("acme", f"action-{i}", "sb-1" if i % 2 else None, "x" * 3000 if i == 4 else None, "k_1")
    store.audit("beta", "create", "sb-9")
    entries = store.audit_log("acme")
    assert [e.action for e in entries] == [f"action-{i}" for i in range(4, -1, -1)]  # newest first
    assert len(entries[0].detail) == 2001 and entries[0].detail.endswith("…")
    assert [e.action for e in store.audit_log(sandbox_id="sb-1")] == ["action-3", "action-1"]
    assert [e.action for e in store.audit_log(limit=2)] == ["create", "action-4"]
    assert store.prune_audit(time.time() - 3600, max_rows=3) == 3
    assert [e.action for e in store.audit_log()] == ["create", "action-4", "action-3"]
    assert store.prune_audit(time.time() + 1, max_rows=100) == 3
    assert store.audit_log() == []


def test_a_second_store_on_the_same_database_sees_everything(db, store):
    key = store.create_key("acme")
    add(store, "sb-1", store.tenant("acme"), metadata={"job": "etl"})
    store.audit("acme", "create", "sb-1")
    other = Store(db)  # a later process on the same file, or another replica on the same PostgreSQL
    try:
        acme = other.authenticate(key)
        assert acme.name == "acme"
        assert [r.id for r in other.sandboxes(acme, metadata={"job": "etl"})] == ["sb-1"]
        assert [e.action for e in other.audit_log("acme")] == ["create"]
        other.end_sandbox("sb-1", "ended", "killed elsewhere")
    finally:
        other.close()
    assert store.sandbox(store.tenant("acme"), "sb-1").status == "ended"
