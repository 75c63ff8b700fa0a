"""`sandlot serve --db postgresql://...`: the whole server on PostgreSQL (a throwaway one from Debian's
package, tests/postgres.py), keys from `sandlot keys --db URL`, code run in a real process-tier sandbox
through the SDK and through /v1/run; what it did is in the shared database."""

from __future__ import annotations

import time

import httpx
import pytest

from sandlot import Sandbox
from sandlot._host import cgroups
from sandlot.server import Store

from . import postgres
from .cli_server import CliServer
from .conftest import needs_sandbox

postgres_server, pg_url = postgres.postgres_server, postgres.pg_url  # the fixtures, for this module's tests


def end_left_sandboxes(url: str) -> None:
    """What the stopped server left running (durable sandboxes wait for a next server): ended, by its rows."""
    store = Store(url)
    try:
        ids = {row.id for row, _ in store.running_handles()}
    finally:
        store.close()
    if ids:
        cgroups.remove_named(ids)


@needs_sandbox
def test_a_server_on_postgresql_runs_code(pg_url, tmp_path):
    server = CliServer(tmp_path)
    server.db = pg_url  # the CLI takes the URL wherever it takes the file's path
    key = server.key("acme")
    server.start()
    try:
        assert "database postgresql://postgres@127.0.0.1" in server.log()  # named, no lock file anywhere
        with Sandbox(api_url=server.url, api_key=key) as sb:
            assert sb.run_code("x = 6 * 7\nx").text == "42"
            assert sb.commands.run("echo hi").stdout == "hi\n"
            sandbox_id = sb.sandbox_id
        r = httpx.post(server.url + "/v1/run", json={"code": "sum(range(10))"},
                       headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200 and r.json()["results"][0]["text"] == "45", r.text
        refused = httpx.post(server.url + "/v1/run", json={"code": "1"},
                             headers={"Authorization": "Bearer sl_" + "x" * 43}, timeout=60)
        assert refused.status_code == 401
        store = Store(pg_url)
        try:
            acme = store.tenant("acme")
            row = store.sandbox(acme, sandbox_id)
            assert row.status == "ended" and row.template == "python"
            actions = [e.action for e in reversed(store.audit_log("acme", sandbox_id=sandbox_id))]
            assert actions[:3] == ["create", "run_code", "command"] and actions[-1] == "kill"
            assert "run_once" in [e.action for e in store.audit_log("acme")]
            assert store.list_keys("acme")[0].last_used_at is not None
        finally:
            store.close()
    finally:
        server.stop()
        end_left_sandboxes(pg_url)
    assert list(tmp_path.glob("*.lock")) == []


def test_a_server_rides_out_a_restart_of_its_postgresql(tmp_path):
    """PostgreSQL goes away under a running server (a restart, a failover): requests get 503 promptly (not
    500, not a hang), and the server serves again once the database is back, without a restart of its own."""
    if postgres.why_not():
        pytest.skip(postgres.why_not())
    database = postgres.PostgresServer().start()
    server = CliServer(tmp_path)
    try:
        server.db = database.new_database()
        key = server.key("acme")
        server.start()
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(server.url + "/v1/sandboxes", headers=headers, timeout=30).status_code == 200
        database.stop_only()
        started = time.monotonic()
        for _ in range(3):
            r = httpx.get(server.url + "/v1/sandboxes", headers=headers, timeout=30)
            assert r.status_code == 503, r.text
            assert "cannot be used" in r.json()["error"]["message"]
        assert time.monotonic() - started < 10
        database.start_again()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/v1/sandboxes", headers=headers, timeout=30).status_code != 200:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.3)
    finally:
        server.stop()
        database.stop()
