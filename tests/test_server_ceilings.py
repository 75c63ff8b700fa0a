"""What a tenant may ask of the server, and what the server tells whom (issue #8, hole 6).

Real server processes on loopback: operator ceilings on every limit (defaults from the host, flags to
change them), per-tenant totals of memory and pids, the audit log's retention, a /healthz that says
nothing about anyone's sandboxes, /metrics behind an operator key, and MCP transport sessions that
belong to the tenant that opened them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import httpx
import pytest

from sandlot import Sandbox
from sandlot._limits import Limits
from sandlot.server import Store

from .cli_server import COMMAND, CliServer, clean_env
from .conftest import RUNSC_MISSING, needs_sandbox
from .serverproc import ServerProcess

pytestmark = [needs_sandbox]

GiB, MiB = 1024**3, 1024**2
ISOLATIONS = ["process"] + ([] if RUNSC_MISSING else ["gvisor"])
# The operator's ceilings of the `ceilinged` server, every limit a tenant may ask for.
CEILINGS = {"cpu": 1.5, "memory": "768M", "pids": 256, "disk": "1G", "inodes": 100_000, "open_files": 4096,
            "timeout": 600, "idle_timeout": 3600, "lifetime": 7200, "output": "8M"}
CEILING_BYTES = {"memory": 768 * MiB, "disk": GiB, "output": 8 * MiB}


def ceiling_flags() -> list[str]:
    flags = []
    for name, value in CEILINGS.items():
        flags += ["--ceiling", f"{name}={value}"]
    return flags


def ceiling_of(name: str) -> float:
    return CEILING_BYTES.get(name, CEILINGS[name])


def shown(value: float) -> str:
    """A number as the server's messages write it."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """A server with no ceiling flags: every ceiling comes from the host. Old audit rows wait in its database."""
    db = tmp_path_factory.mktemp("default") / "sandlot.db"
    store = Store(db)
    try:
        now = time.time()
        for age_days, action in ((100, "ancient"), (91, "ancient"), (1, "recent")):
            with store._tx() as conn:
                conn.execute("INSERT INTO audit (at, tenant, action) VALUES (?, 'old-tenant', ?)",
                             (now - age_days * 86400, action))
    finally:
        store.close()
    proc = ServerProcess(db, "--isolations", ",".join(ISOLATIONS)).start()
    proc.keys = {"a": proc.key("tenant-a"), "b": proc.key("tenant-b")}
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ceilinged(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("ceilinged") / "sandlot.db", *ceiling_flags(),
                         "--isolations", ",".join(ISOLATIONS)).start()
    proc.keys = {"a": proc.key("tenant-a")}
    yield proc
    proc.stop()


def client(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def audit_actions(db_path) -> list[str]:
    store = Store(db_path)
    try:
        return [e.action for e in store.audit_log(limit=100_000)]
    finally:
        store.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(COMMAND + list(args), capture_output=True, text=True, env=clean_env(), timeout=120)


# -- ceilings --------------------------------------------------------------------------------------------
def test_every_limit_over_its_ceiling_is_refused_and_creates_nothing(ceilinged):
    """Each limit a tenant may ask for, one step over the operator's ceiling: 400 InvalidRequest naming the
    limit and the ceiling, on create and on one-shot runs, on every tier; nothing is created or audited."""
    assert set(CEILINGS) == set(Limits().to_dict())  # every limit has a ceiling in this test
    with client(ceilinged, ceilinged.keys["a"]) as c:
        for name in CEILINGS:
            over = ceiling_of(name) * 2
            for isolation in ISOLATIONS:
                for path, body in (("/v1/sandboxes", {}), ("/v1/run", {"code": "1"})):
                    r = c.post(path, json={**body, "limits": {name: over}, "isolation": isolation})
                    assert r.status_code in (400, 422), (name, r.text)
                    err = error_of(r)
                    assert err["type"] == "InvalidRequest" and "ceiling" in err["message"], err
                    assert name in err["message"] and shown(ceiling_of(name)) in err["message"], err
        # The lifetime asked as the create's timeout, and later through /timeout, meets the same ceiling.
        r = c.post("/v1/sandboxes", json={"timeout": 7201})
        assert r.status_code == 400 and "lifetime" in error_of(r)["message"] and "7200" in error_of(r)["message"]
        assert c.get("/v1/sandboxes", params={"status": "all"}).json() == []
    assert not [a for a in audit_actions(ceilinged.db_path) if a in ("create", "run_once")]


def test_at_the_ceiling_is_fine_and_defaults_shrink_to_it(ceilinged):
    with client(ceilinged, ceilinged.keys["a"]) as c:
        r = c.post("/v1/sandboxes", json={"limits": dict(CEILINGS)})
        assert r.status_code == 201, r.text
        sid = r.json()["sandbox_id"]
        try:
            assert r.json()["limits"]["pids"] == 256 and r.json()["limits"]["output"] == 8 * MiB
            # A call's own timeout is a limit too.
            r = c.post(f"/v1/sandboxes/{sid}/code", json={"code": "1", "timeout": 601})
            assert r.status_code == 400 and "timeout" in error_of(r)["message"] and "600" in error_of(r)["message"]
            r = c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "true", "timeout": 601})
            assert r.status_code == 400 and "ceiling" in error_of(r)["message"]
            r = c.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout": 7300})
            assert r.status_code == 400 and "lifetime" in error_of(r)["message"], r.text
            assert c.post(f"/v1/sandboxes/{sid}/code", json={"code": "6*7", "timeout": 600}).json()["text"] == "42"
        finally:
            c.delete(f"/v1/sandboxes/{sid}")
        # The default memory (1 GiB) is over this server's ceiling: a sandbox that asks nothing gets the ceiling.
        info = c.post("/v1/sandboxes", json={}).json()
        assert info["limits"]["memory"] == 768 * MiB and info["limits"]["output"] == 8 * MiB
        c.delete(f"/v1/sandboxes/{info['sandbox_id']}")


def test_default_ceilings_fit_the_host(default_server):
    """Without flags the ceilings come from the machine: its cores, RAM, pid_max; a 1 GiB output cap is refused."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = len(os.sched_getaffinity(0))
    with client(default_server, default_server.keys["a"]) as c:
        info = c.get("/v1/info").json()
        ceilings = info["ceilings"]
        assert set(ceilings) == set(Limits().to_dict())
        assert ceilings["cpu"] == cores and ceilings["memory"] <= physical and ceilings["pids"] < pid_max
        assert ceilings["output"] < GiB and ceilings["disk"] <= physical
        for name, value in Limits().to_dict().items():  # the defaults fit under the ceilings here
            assert value <= ceilings[name], name
        for name, asked in (("output", "1G"), ("pids", pid_max + 1), ("cpu", cores + 1), ("memory", physical + GiB)):
            r = c.post("/v1/sandboxes", json={"limits": {name: asked}})
            assert r.status_code == 400, (name, r.text)
            assert name in error_of(r)["message"] and "ceiling" in error_of(r)["message"]
        assert info["quotas"]["total_memory"] >= Limits().memory and info["quotas"]["total_pids"] < pid_max


def test_serve_help_documents_the_operator_settings():
    r = cli("serve", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for words in ("--ceiling", "--total-memory", "--total-pids", "--audit-retention", "--audit-max-rows",
                  "SANDLOT_CEILINGS"):
        assert words in text, words


# -- per-tenant totals -------------------------------------------------------------------------------------
def test_totals_of_memory_and_pids_across_a_tenants_live_sandboxes(ceilinged):
    mem_key = ceilinged.key("mem-tenant", total_memory=GiB)
    pid_key = ceilinged.key("pid-tenant", total_pids=300)
    with client(ceilinged, mem_key) as c:
        first = c.post("/v1/sandboxes", json={"limits": {"memory": "600M"}}).json()["sandbox_id"]
        r = c.post("/v1/sandboxes", json={"limits": {"memory": "600M"}})
        assert r.status_code == 429 and error_of(r)["type"] == "QuotaExceeded", r.text
        assert "memory" in error_of(r)["message"] and "total" in error_of(r)["message"]
        assert c.post("/v1/run", json={"code": "1", "limits": {"memory": "600M"}}).status_code == 429
        small = c.post("/v1/sandboxes", json={"limits": {"memory": "400M"}})  # 1000M of 1024M: fits
        assert small.status_code == 201, small.text
        c.delete(f"/v1/sandboxes/{first}")
        second = c.post("/v1/sandboxes", json={"limits": {"memory": "600M"}})  # room again after a kill
        assert second.status_code == 201, second.text
        for sid in (small.json()["sandbox_id"], second.json()["sandbox_id"]):
            c.delete(f"/v1/sandboxes/{sid}")
    with client(ceilinged, pid_key) as c:
        first = c.post("/v1/sandboxes", json={"limits": {"pids": 200}}).json()["sandbox_id"]
        r = c.post("/v1/sandboxes", json={"limits": {"pids": 128}})
        assert r.status_code == 429 and "pids" in error_of(r)["message"] and "300" in error_of(r)["message"]
        c.delete(f"/v1/sandboxes/{first}")
    with client(ceilinged, ceilinged.keys["a"]) as c:  # another tenant was never held back
        sid = c.post("/v1/sandboxes", json={"limits": {"memory": "600M"}}).json()["sandbox_id"]
        c.delete(f"/v1/sandboxes/{sid}")


# -- audit retention -----------------------------------------------------------------------------------------
def test_audit_log_keeps_ninety_days_by_default(default_server):
    deadline = time.monotonic() + 15  # the reaper prunes on its first pass
    while "ancient" in audit_actions(default_server.db_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    actions = audit_actions(default_server.db_path)
    assert "ancient" not in actions and "recent" in actions


def test_audit_log_retention_and_row_cap_set_by_the_operator(tmp_path):
    db = tmp_path / "sandlot.db"
    server = ServerProcess(db, "--audit-retention", "8s", "--audit-max-rows", "20",
                           env=clean_env(SANDLOT_POOL_MIN="0", SANDLOT_ZYGOTE="0")).start()
    try:
        store = Store(db)  # rows written while it runs (SQLite's WAL lets the two share the database)
        try:
            for i in range(30):
                store.audit("t", f"row-{i:02d}")
        finally:
            store.close()
        deadline = time.monotonic() + 5
        while len(audit_actions(db)) > 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert audit_actions(db) == [f"row-{i:02d}" for i in range(29, 9, -1)]  # the newest 20
        key = server.key("fresh")
        with client(server, key) as c:
            sid = c.post("/v1/sandboxes", json={}).json()["sandbox_id"]
            c.delete(f"/v1/sandboxes/{sid}")
        assert "create" in audit_actions(db)
        deadline = time.monotonic() + 20
        while audit_actions(db) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert audit_actions(db) == []  # older than 8 s: gone
    finally:
        server.stop()


# -- what the server tells whom ---------------------------------------------------------------------------
def test_healthz_says_only_that_the_server_lives(default_server):
    with client(default_server, default_server.keys["a"]) as c:
        sid = c.post("/v1/sandboxes", json={}).json()["sandbox_id"]
        try:
            r = httpx.get(default_server.url + "/healthz")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
        finally:
            c.delete(f"/v1/sandboxes/{sid}")


def test_metrics_need_an_operator_key(default_server):
    r = cli("keys", "create", "--operator", "--db", str(default_server.db_path), "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    operator = made["key"]
    assert made["role"] == "operator" and operator.startswith("sl_")
    listed = cli("keys", "ls", "--db", str(default_server.db_path), "--json")
    assert "operator" in [k["role"] for k in json.loads(listed.stdout)]
    assert httpx.get(default_server.url + "/metrics").status_code == 401
    for tenant_key in default_server.keys.values():
        r = httpx.get(default_server.url + "/metrics", headers={"Authorization": f"Bearer {tenant_key}"})
        assert r.status_code == 403 and error_of(r)["type"] == "AuthError" and "operator" in error_of(r)["message"]
    with client(default_server, operator) as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and "sandlot_sandboxes_live " in r.text
        # An operator key is not a tenant: it cannot make or see sandboxes.
        for r in (c.post("/v1/sandboxes", json={}), c.get("/v1/sandboxes"), c.post("/v1/run", json={"code": "1"})):
            assert r.status_code == 403 and error_of(r)["type"] == "AuthError", r.text


# -- MCP transport sessions ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mcp_server(tmp_path_factory):
    pytest.importorskip("mcp")
    srv = CliServer(tmp_path_factory.mktemp("mcp")).start()
    yield srv
    srv.stop()


def test_an_mcp_session_belongs_to_the_tenant_that_opened_it(mcp_server):
    """Alice's MCP session id, presented with Bob's key (raw HTTP: POST, GET, DELETE), is refused like an
    unknown session; Alice's session and sandbox carry on untouched."""
    httpx2 = pytest.importorskip("httpx2")
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    url = mcp_server.url + "/mcp/"
    alice, bob = mcp_server.key("alice"), mcp_server.key("bob")
    seen: dict[str, str] = {}

    async def remember(response) -> None:
        if "mcp-session-id" in response.headers:
            seen["transport"] = response.headers["mcp-session-id"]
        if "mcp-protocol-version" in response.request.headers:
            seen["version"] = response.request.headers["mcp-protocol-version"]

    def bob_tries(sandbox_session: str) -> list[tuple[str, int, str]]:
        """Bob's key with Alice's transport session: (method, status, body) of each attempt."""
        headers = {"Authorization": f"Bearer {bob}", "mcp-session-id": seen["transport"],
                   "Accept": "application/json, text/event-stream", "Content-Type": "application/json",
                   "mcp-protocol-version": seen.get("version", "2025-06-18")}
        call = {"jsonrpc": "2.0", "id": 99, "method": "tools/call",
                "params": {"name": "run_code", "arguments": {"code": "secret", "session_id": sandbox_session}}}
        answers = []
        with httpx.Client(timeout=10) as h:
            for body in (call, {"jsonrpc": "2.0", "id": 100, "method": "tools/list"}):
                r = h.post(url, headers=headers, json=body)
                answers.append(("POST", r.status_code, r.text))
            with h.stream("GET", url, headers={**headers, "Accept": "text/event-stream"}) as r:
                answers.append(("GET", r.status_code, r.read().decode() if r.status_code != 200 else ""))
            r = h.delete(url, headers=headers)
            answers.append(("DELETE", r.status_code, r.text))
        return answers

    async def main():
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {alice}"}, timeout=60,
                                      event_hooks={"response": [remember]}) as http:
            async with streamable_http_client(url, http_client=http) as (read, write, *_):
                async with ClientSession(read, write) as s:
                    await s.initialize()
                    made = await s.call_tool("create_session", {"ttl_seconds": 600})
                    sid = made.structured_content["session_id"]
                    await s.call_tool("run_code", {"code": "secret = 'alice only'", "session_id": sid})
                    answers = await asyncio.to_thread(bob_tries, sid)
                    after = await s.call_tool("run_code", {"code": "secret", "session_id": sid})
                    await s.call_tool("close_session", {"session_id": sid})
                    return answers, after

    answers, after = asyncio.run(main())
    for method, status, text in answers:
        assert status == 404 and "alice only" not in text, (method, status, text)
    assert not after.is_error and "alice only" in after.content[0].text
    assert Sandbox.list(api_url=mcp_server.url, api_key=alice) == []


@pytest.mark.skipif(RUNSC_MISSING is not None, reason=str(RUNSC_MISSING))
def test_a_paused_sandbox_holds_no_memory_in_the_totals_until_it_resumes(ceilinged):
    """gVisor tier: a paused sandbox is a checkpoint on disk, so its memory leaves the tenant's total; resuming
    it (or a call, which would wake it) counts it again, and is refused while the total has no room for it."""
    key = ceilinged.key("pauser", total_memory=GiB)
    with client(ceilinged, key) as c:
        first = c.post("/v1/sandboxes", json={"isolation": "gvisor", "limits": {"memory": "600M"}})
        assert first.status_code == 201, first.text
        first = first.json()["sandbox_id"]
        try:
            assert c.post(f"/v1/sandboxes/{first}/code", json={"code": "x = 'kept'"}).status_code == 200
            assert c.post(f"/v1/sandboxes/{first}/pause").status_code == 200
            assert c.get("/v1/info").json()["usage"]["memory"] == 0
            other = c.post("/v1/sandboxes", json={"limits": {"memory": "600M"}})  # the paused one holds nothing
            assert other.status_code == 201, other.text
            r = c.post(f"/v1/sandboxes/{first}/resume")
            assert r.status_code == 429 and "total of memory" in error_of(r)["message"], r.text
            r = c.post(f"/v1/sandboxes/{first}/code", json={"code": "x"})  # a call would wake it: the same 429
            assert r.status_code == 429 and "total of memory" in error_of(r)["message"], r.text
            assert c.get(f"/v1/sandboxes/{first}").json()["status"] == "paused"
            c.delete(f"/v1/sandboxes/{other.json()['sandbox_id']}")
            assert c.post(f"/v1/sandboxes/{first}/resume").status_code == 200
            assert c.post(f"/v1/sandboxes/{first}/code", json={"code": "x"}).json()["text"] == "'kept'"
        finally:
            c.delete(f"/v1/sandboxes/{first}")


def test_one_tenant_cannot_take_every_mcp_transport_session(mcp_server):
    """Transport sessions are capped per tenant (32), so one tenant opening sessions without end is refused
    (429) while another tenant still gets one; closing one makes room again."""
    url = mcp_server.url + "/mcp/"
    hog, other = mcp_server.key("hog"), mcp_server.key("other")
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                             "clientInfo": {"name": "test", "version": "0"}}}

    def open_session(h: httpx.Client, key: str) -> httpx.Response:
        return h.post(url, json=initialize, headers={"Authorization": f"Bearer {key}",
                                                     "Accept": "application/json, text/event-stream"})

    with httpx.Client(timeout=30) as h:
        opened = [open_session(h, hog) for _ in range(32)]
        assert [r.status_code for r in opened] == [200] * 32
        refused = open_session(h, hog)
        assert refused.status_code == 429 and error_of(refused)["type"] == "QuotaExceeded", refused.text
        assert "32" in error_of(refused)["message"] and "MCP" in error_of(refused)["message"]
        assert open_session(h, other).status_code == 200  # another tenant is not held back
        first = opened[0].headers["mcp-session-id"]
        r = h.delete(url, headers={"Authorization": f"Bearer {hog}", "mcp-session-id": first,
                                   "mcp-protocol-version": "2025-06-18"})
        assert r.status_code == 200, r.text
        assert open_session(h, hog).status_code == 200  # a closed session makes room
