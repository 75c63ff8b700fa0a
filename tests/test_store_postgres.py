"""What PostgreSQL adds to the store: several servers (replicas) on one database at once, and a database
that lives elsewhere, may be down or missing, and may drop a connection. Against a real PostgreSQL from
Debian's package (tests/postgres.py); the behaviour both implementations share is in test_store.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from sandlot.server import Store
from sandlot.server.store import DatabaseUnavailable, PostgresStore, describe, lock_database

from .cli_server import COMMAND, clean_env
from .test_store import at_most
from . import postgres
from .serverproc import free_port

postgres_server, pg_url = postgres.postgres_server, postgres.pg_url  # the fixtures, for this module's tests

LIMITS = {"memory": 256 * 1024**2, "pids": 64}


def replicas(url: str, n: int) -> list[PostgresStore]:
    return [Store(url) for _ in range(n)]


def test_replicas_share_tenants_keys_and_sandboxes(pg_url):
    one, two = replicas(pg_url, 2)
    try:
        key = one.create_key("acme")
        one.set_quotas("acme", max_live=7)
        acme = two.authenticate(key)  # the other replica knows the key at once
        assert acme.name == "acme" and acme.max_live == 7 and [t.name for t in two.tenants()] == ["acme"]
        now = time.time()
        two.add_sandbox("sb-1", acme, "python", {"job": "etl"}, LIMITS, now, now + 60)
        assert one.sandbox(one.tenant("acme"), "sb-1").metadata == {"job": "etl"}
        one.end_sandbox("sb-1", "ended", "killed through the first replica")
        assert two.sandbox(acme, "sb-1").end_reason == "killed through the first replica"
        assert two.revoke_key(key)
        assert one.authenticate(key) is None  # a key revoked on one replica is refused by all
    finally:
        for store in (one, two):
            store.close()


def test_replicas_adding_at_once_keep_a_tenants_live_quota(pg_url):
    """Eight replicas adding the same tenant's sandboxes at the same moments (three rounds), each checking
    a quota of five live sandboxes on the rows: exactly five rows, every other attempt QuotaExceeded."""
    stores = replicas(pg_url, 8)
    tenant = stores[0].create_tenant("acme")
    added, refused, rounds = [], [], threading.Barrier(8)

    def worker(store: PostgresStore, n: int) -> None:
        for i in range(3):
            rounds.wait()
            sandbox_id = f"sb-{n}-{i}"
            try:
                now = time.time()
                store.add_sandbox(sandbox_id, tenant, "python", {}, LIMITS, now, now + 60, check=at_most(5))
                added.append(sandbox_id)
            except Exception as exc:  # noqa: BLE001 - counted below: only QuotaExceeded is right
                refused.append(exc)

    threads = [threading.Thread(target=worker, args=(store, n)) for n, store in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(added) == 5 and len(refused) == 19, (added, refused[:3])
        assert {type(e).__name__ for e in refused} == {"QuotaExceeded"}
        assert stores[1].counts(tenant).live == 5
    finally:
        for store in stores:
            store.close()


def test_replicas_creating_keys_for_a_new_tenant_at_once(pg_url):
    stores = replicas(pg_url, 4)
    keys, errors, start = [], [], threading.Barrier(4)

    def make(store: PostgresStore) -> None:
        start.wait()
        try:
            keys.append(store.create_key("newcomer"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == [] and len(keys) == 4
        assert [t.name for t in stores[0].tenants()] == ["newcomer"]
        assert {stores[0].authenticate(k).name for k in keys} == {"newcomer"}
    finally:
        for store in stores:
            store.close()


def test_replicas_starting_together_create_the_schema_once(pg_url):
    opened, errors, start = [], [], threading.Barrier(6)

    def open_one() -> None:
        start.wait()
        try:
            opened.append(Store(pg_url))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == [] and len(opened) == 6
        opened[0].create_tenant("acme")
        assert opened[5].tenant("acme").name == "acme"
    finally:
        for store in opened:
            store.close()


def test_an_unreachable_server_is_a_clear_error_soon():
    url = f"postgresql://sandlot:s3cret@127.0.0.1:{free_port()}/sandlot"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        Store(url)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "postgresql://sandlot:***@127.0.0.1" in message and "s3cret" not in message
    assert "refused" in message.lower() or "connect" in message.lower()


def test_a_missing_database_or_a_bad_url_is_a_clear_error(postgres_server):
    with pytest.raises(DatabaseUnavailable, match="does not exist"):
        Store(postgres_server.url("no_such_database"))
    with pytest.raises(DatabaseUnavailable, match="cannot"):
        Store("postgresql://postgres@127.0.0.1:notaport/db")


def test_a_dropped_connection_is_opened_again(postgres_server, pg_url):
    """PostgreSQL ended the store's connection (a restart, a failover, an idle cut): the next read or write
    goes through, on a new connection."""
    store = Store(pg_url)
    try:
        key = store.create_key("acme")

        def drop() -> None:
            with psycopg.connect(pg_url, autocommit=True) as admin:
                ended = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                      " WHERE application_name = 'sandlot' AND datname = current_database()").fetchall()
                assert ended

        drop()
        assert store.authenticate(key).name == "acme"
        drop()
        store.audit("acme", "after-a-drop")
        assert [e.action for e in store.audit_log("acme")] == ["after-a-drop"]
    finally:
        store.close()


def test_replicas_take_no_lock_file():
    assert lock_database("postgresql://sandlot@db.example/sandlot") is None


def test_a_password_never_shows_when_the_database_is_named():
    assert describe("postgresql://me:pw@db:5432/sandlot?sslmode=require") == \
        "postgresql://me:***@db:5432/sandlot?sslmode=require"
    assert describe("postgresql://me@db/sandlot") == "postgresql://me@db/sandlot"
    assert describe("postgresql://me@db/sandlot?password=pw&sslmode=verify-full") == \
        "postgresql://me@db/sandlot?password=***&sslmode=verify-full"
    assert describe("/var/lib/sandlot/sandlot.db") == "/var/lib/sandlot/sandlot.db"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(COMMAND + list(args), capture_output=True, text=True, env=clean_env(**env), timeout=120)


def test_keys_commands_on_postgresql(pg_url):
    made = cli("keys", "create", "--tenant", "acme", "--db", pg_url, "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["tenant"] == "acme" and key["key"].startswith("sl_") and key["key_id"].startswith("k_")
    listed = cli("keys", "ls", "--json", SANDLOT_DB=pg_url)  # the variable names the database too
    assert listed.returncode == 0, listed.stderr
    assert [(k["key_id"], k["tenant"], k["status"]) for k in json.loads(listed.stdout)] == \
        [(key["key_id"], "acme", "active")]
    store = Store(pg_url)
    try:
        assert store.authenticate(key["key"]).name == "acme"
        revoked = cli("keys", "revoke", key["key_id"], "--db", pg_url)
        assert revoked.returncode == 0, revoked.stderr
        assert store.authenticate(key["key"]) is None
    finally:
        store.close()


def test_keys_commands_say_which_extra_to_install_without_the_driver(pg_url):
    """Where psycopg is not installed (sandlot without the `postgres` extra), a URL is refused with the fix."""
    blocked = ("import sys; sys.modules['psycopg'] = None; sys.argv[0] = 'sandlot'; "
               "from sandlot.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", blocked, "keys", "create", "--tenant", "acme", "--db", pg_url],
                         capture_output=True, text=True, env=clean_env(), timeout=120)
    assert out.returncode == 3, out
    assert "pip install 'sandlot[postgres]'" in out.stderr and "Traceback" not in out.stderr


def test_keys_commands_report_an_unreachable_database(tmp_path):
    out = cli("keys", "ls", "--db", f"postgresql://sandlot:s3cret@127.0.0.1:{free_port()}/sandlot")
    assert out.returncode == 3 and "DatabaseUnavailable" in out.stderr and "s3cret" not in out.stderr, out


def test_a_store_outlives_a_restart_of_postgresql():
    """PostgreSQL goes down under a running store: calls fail with DatabaseUnavailable (the first within the
    connect timeout, the next ones at once rather than each waiting on a connect); once it is back, the
    same store works again, with what was committed before."""
    if postgres.why_not():
        pytest.skip(postgres.why_not())
    server = postgres.PostgresServer().start()
    store = None
    try:
        url = server.new_database()
        store = Store(url)
        key = store.create_key("acme")
        server.stop_only()
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            store.authenticate(key)
        with pytest.raises(DatabaseUnavailable, match="retry shortly"):
            store.audit("acme", "while-down")
        assert time.monotonic() - started < 6
        server.start_again()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert store.authenticate(key).name == "acme"
                break
            except DatabaseUnavailable:
                assert time.monotonic() < deadline, "the store never came back"
                time.sleep(0.2)
        store.audit("acme", "after-restart")
        assert [e.action for e in store.audit_log("acme")] == ["after-restart"]
    finally:
        if store is not None:
            store.close()
        server.stop()


def test_the_variable_alone_names_a_postgresql_database(pg_url, monkeypatch):
    monkeypatch.setenv("SANDLOT_DB", pg_url)
    from sandlot import server

    key = server.create_key("acme")  # no db_path: $SANDLOT_DB
    store = Store()
    try:
        assert isinstance(store, PostgresStore) and store.authenticate(key).name == "acme"
    finally:
        store.close()
    assert server.Settings().db_path == pg_url  # kept whole: a Path would fold its '//'
