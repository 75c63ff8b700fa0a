"""The HTTP server as a client sees it: a real server process on loopback and real httpx clients.

Auth and tenant isolation, quotas, bad input (by hand and fuzzed from the OpenAPI spec), NDJSON streaming,
metrics, the audit log, restart after kill -9, and 50 concurrent clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid

import httpx
import pytest

import sandlot
from sandlot import AsyncSandbox, Sandbox
from sandlot.server import Store

from .conftest import host_leftovers, needs_sandbox, processes_in_sandbox
from .serverproc import ServerProcess, alive, descendants, open_fds, rss_bytes

pytestmark = needs_sandbox


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("server") / "sandlot.db").start()
    proc.keys = {"a": proc.key("tenant-a"), "b": proc.key("tenant-b")}
    proc.wait_warm(proc.keys["a"])
    yield proc
    proc.stop()


def client(server, tenant="a", key=None) -> httpx.Client:
    key = key if key is not None else server.keys[tenant]
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def pool_ready(server) -> int:
    """Warm sandboxes waiting in the server's pools, from its metrics."""
    with client(server, key=sandlot.server.create_operator_key(server.db_path)) as operator:  # operators only
        text = operator.get("/metrics").text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("sandlot_pool_ready{")))


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_healthz_is_public_everything_else_needs_a_key(server):
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    assert httpx.get(server.url + "/openapi.json").json()["info"]["title"] == "Sandlot"
    for key in (None, "sl_", "sl_nope", "Basic abc"):
        headers = {} if key is None else {"Authorization": key if key.startswith("Basic") else f"Bearer {key}"}
        r = httpx.get(server.url + "/v1/sandboxes", headers=headers)
        assert r.status_code == 401 and error_of(r)["type"] == "AuthError"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(server.url + "/metrics", headers=headers).status_code == 401
    with client(server) as c:
        assert c.get("/v1/sandboxes").status_code == 200
    # A revoked key stops working at once, while the server runs.
    key = server.key("tenant-a")
    with client(server, key=key) as c:
        assert c.get("/v1/sandboxes").status_code == 200
        assert sandlot.server.revoke_key(key, server.db_path)
        r = c.get("/v1/sandboxes")
        assert r.status_code == 401 and "revoked" in error_of(r)["message"]


def test_tenants_never_see_each_other(server):
    with client(server, "a") as a, client(server, "b") as b:
        sid = a.post("/v1/sandboxes", json={"metadata": {"owner": "a"}}).json()["sandbox_id"]
        try:
            unknown = b.get("/v1/sandboxes/sb-ffffffffffff")
            attempts = [b.get(f"/v1/sandboxes/{sid}"), b.delete(f"/v1/sandboxes/{sid}"),
                        b.post(f"/v1/sandboxes/{sid}/code", json={"code": "1"}),
                        b.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "true"}),
                        b.get(f"/v1/sandboxes/{sid}/files", params={"path": "/etc/hostname"}),
                        b.put(f"/v1/sandboxes/{sid}/files", params={"path": "x"}, content=b"x"),
                        b.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout": 60}),
                        b.get(f"/v1/sandboxes/{sid}/metrics")]
            for r in attempts:  # 404, worded like an id nobody owns: B cannot even learn that it exists
                assert r.status_code == 404, r.text
                assert error_of(r) == {**error_of(unknown), "message": error_of(unknown)["message"].replace(
                    "sb-ffffffffffff", sid)}
            assert sid not in [s["sandbox_id"] for s in b.get("/v1/sandboxes", params={"status": "all"}).json()]
            assert a.post(f"/v1/sandboxes/{sid}/code", json={"code": "'still mine'"}).json()["text"] == "'still mine'"
        finally:
            a.delete(f"/v1/sandboxes/{sid}")
    with pytest.raises(sandlot.SandboxNotFound):
        Sandbox.connect(sid, api_url=server.url, api_key=server.keys["b"])


def test_quota_of_live_sandboxes(server):
    key = server.key("small", max_live=2)
    with client(server, key=key) as c:
        ids = [c.post("/v1/sandboxes", json={}).json()["sandbox_id"] for _ in range(2)]
        r = c.post("/v1/sandboxes", json={})
        assert r.status_code == 429 and error_of(r)["type"] == "QuotaExceeded"
        assert "quota is 2" in error_of(r)["message"]
        assert c.post("/v1/run", json={"code": "1"}).status_code == 429  # one-shot runs count too
        with pytest.raises(sandlot.QuotaExceeded, match="quota"):
            Sandbox(api_url=server.url, api_key=key)
        c.delete(f"/v1/sandboxes/{ids[0]}")
        ids[0] = c.post("/v1/sandboxes", json={}).json()["sandbox_id"]  # a kill frees its place at once
        for sid in ids:
            c.delete(f"/v1/sandboxes/{sid}")


def test_quota_of_lifetime(server):
    key = server.key("short-lived", max_lifetime=60)
    with client(server, key=key) as c:
        r = c.post("/v1/sandboxes", json={"timeout": 120})
        assert r.status_code == 429 and "at most 60 s" in error_of(r)["message"]
        info = c.post("/v1/sandboxes", json={}).json()  # the default lifetime shrinks to fit
        assert info["limits"]["lifetime"] == 60
        r = c.post(f"/v1/sandboxes/{info['sandbox_id']}/timeout", json={"timeout": 600})
        assert r.status_code == 429
        assert c.post(f"/v1/sandboxes/{info['sandbox_id']}/timeout", json={"timeout": 30}).status_code == 200
        c.delete(f"/v1/sandboxes/{info['sandbox_id']}")


def test_quota_of_request_rate(server):
    key = server.key("chatty", requests_per_minute=5)
    with client(server, key=key) as c:
        codes = [c.get("/v1/sandboxes").status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        r = c.get("/v1/sandboxes")
        assert "5 requests per minute" in error_of(r)["message"] and int(r.headers["retry-after"]) >= 1
    with client(server) as other:  # other tenants are not slowed down
        assert other.get("/v1/sandboxes").status_code == 200


def test_bad_input_gets_a_clear_4xx(server, tmp_path):
    with client(server) as c:
        def check(response, status, kind, words):
            assert response.status_code == status, response.text
            err = error_of(response)
            assert err["type"] == kind and words in err["message"], err

        check(c.post("/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"}),
              400, "InvalidRequest", "not valid JSON")
        check(c.post("/v1/sandboxes", content=b'{"template": 1}', headers={"content-type": "text/plain"}),
              422, "InvalidRequest", "Content-Type: application/json")
        check(c.post("/v1/sandboxes", json={"template": "nope"}), 400, "InvalidRequest", "unknown template")
        check(c.post("/v1/sandboxes", json={"limits": {"memory": "100T"}}), 400, "InvalidRequest", "outside")
        check(c.post("/v1/sandboxes", json={"limits": {"cpu": 1000}}), 400, "InvalidRequest", "more than this server")
        check(c.post("/v1/sandboxes", json={"limits": {"pids": 0}}), 400, "InvalidRequest", "pids")
        check(c.post("/v1/sandboxes", json={"limits": {"bogus": 1}}), 400, "InvalidRequest", "unknown limit")
        check(c.post("/v1/sandboxes", json={"isolation": "vm"}), 400, "InvalidRequest", "not enabled on this server")
        check(c.post("/v1/sandboxes", json={"timeout": 1e12}), 422, "InvalidRequest", "timeout")
        check(c.post("/v1/sandboxes", json={"env": {"A=B": "x"}}), 422, "InvalidRequest", "not a valid name")
        check(c.post("/v1/sandboxes", json={"surprise": 1}), 422, "InvalidRequest", "surprise")
        check(c.post("/v1/sandboxes", content=b'{"metadata": {"k": "\\ud800"}}',
                     headers={"content-type": "application/json"}), 422, "InvalidRequest", "surrogates")
        check(c.post("/v1/run", json={"code": "x" * (9 * 1024**2)}), 413, "InvalidRequest", "over this server's limit")
        chunked = (b"x" * 1024**2 for _ in range(9))  # no Content-Length: counted as it arrives
        check(c.post("/v1/run", content=chunked, headers={"content-type": "application/json"}),
              413, "InvalidRequest", "over this server's limit")
        # the SDK's own limit (the same check, the same words): bytes of UTF-8, not characters
        check(c.post("/v1/run", json={"code": "#" + "é" * 100_000}), 422, "InvalidRequest", "at most 196608 (192 KiB)")
        check(c.get("/v1/nowhere"), 404, "NotFound", "no such endpoint: GET /v1/nowhere")
        check(c.patch("/v1/sandboxes"), 405, "InvalidRequest", "PATCH is not allowed")

        sid = c.post("/v1/sandboxes", json={}).json()["sandbox_id"]
        base = f"/v1/sandboxes/{sid}"
        check(c.get(base + "/files", params={"path": "a\0b"}), 400, "InvalidRequest", "NUL")
        check(c.get(base + "/files", params={"path": ""}), 422, "InvalidRequest", "path")
        check(c.post(base + "/commands", json={"cmd": "cat", "stdin": "%%%", "stdin_base64": True}),
              400, "InvalidRequest", "base64")
        check(c.get(base + "/commands/cmd-nope"), 404, "SandboxNotFound", "no background command")
        # Paths are resolved inside the sandbox: the server's own files are out of reach.
        secret = tmp_path / f"host-secret-{uuid.uuid4().hex}"
        secret.write_text("host only")
        for path in (str(secret), "../../.." + str(secret)):
            check(c.get(base + "/files", params={"path": path}), 404, "FileError", "No such file")
        c.delete(base)
        check(c.post(base + "/code", json={"code": "1"}), 404, "SandboxNotFound", "killed by its owner")
        check(c.get(base + "/files/list"), 404, "SandboxNotFound", "killed")
        assert c.delete(base).json()["status"] == "ended"  # killing twice is fine


def test_streaming_is_ndjson_and_arrives_while_code_runs(server):
    with client(server) as c:
        sid = c.post("/v1/sandboxes", json={}).json()["sandbox_id"]
        code = "import time\nprint('a', flush=True)\ntime.sleep(1)\nprint('b')\n1/0"
        t0 = time.monotonic()
        events = []
        with c.stream("POST", f"/v1/sandboxes/{sid}/code", json={"code": code, "stream": True}) as r:
            assert r.headers["content-type"].startswith("application/x-ndjson")
            for line in r.iter_lines():
                events.append((json.loads(line), time.monotonic() - t0))
        kinds = [e["type"] for e, _ in events]
        assert kinds == ["stdout", "stdout", "error", "end"]
        assert events[0][1] < 0.9 and events[0][0]["text"] == "a\n"
        assert events[2][0]["error"]["name"] == "ZeroDivisionError" and events[3][0]["execution_count"] == 1
        plain = c.post(f"/v1/sandboxes/{sid}/code", json={"code": "print('p'); 5"}).json()  # the JSON form
        assert plain["text"] == "5" and plain["logs"]["stdout"] == ["p\n"]
        lines = c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "echo x; exit 4", "stream": True}).text.splitlines()
        assert [json.loads(s)["type"] for s in lines] == ["stdout", "end"] and json.loads(lines[-1])["exit_code"] == 4
        c.delete(f"/v1/sandboxes/{sid}")


def test_metrics_and_audit_log(server):
    with client(server) as c:
        sid = c.post("/v1/sandboxes", json={}).json()["sandbox_id"]
        c.post(f"/v1/sandboxes/{sid}/code", json={"code": "while True: pass", "timeout": 0.5})
        c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "echo audited"})
        c.delete(f"/v1/sandboxes/{sid}")
    with client(server, key=sandlot.server.create_operator_key(server.db_path)) as operator:  # they span tenants
        text = operator.get("/metrics").text
    for name in ("sandlot_sandboxes_live ", 'sandlot_pool_ready{template="python"}', "sandlot_executions_total",
                 'sandlot_limit_kills_total{limit="timeout"}', "sandlot_execution_seconds_bucket",
                 'sandlot_http_request_seconds_bucket{le="0.005",method="POST",route="/v1/sandboxes/{sandbox_id}/code"',
                 "sandlot_create_seconds_count"):
        assert name in text, name
    store = Store(server.db_path)
    try:
        actions = [(e.action, e.tenant, e.detail) for e in reversed(store.audit_log(sandbox_id=sid))]
        keys = {e.key_id for e in store.audit_log(sandbox_id=sid)}
    finally:
        store.close()
    assert [a for a, _, _ in actions] == ["create", "run_code", "command", "kill"]
    assert {t for _, t, _ in actions} == {"tenant-a"} and actions[2][2] == "echo audited"
    assert len(keys) == 1 and next(iter(keys)).startswith("k_")


def test_a_second_server_on_the_same_database_is_refused(server):
    out = subprocess.run([sys.executable, "-m", "sandlot.server", "--port", "1", "--db", str(server.db_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "another Sandlot server" in out.stderr


def test_fuzz_the_api_from_its_openapi_spec(server):
    """Schemathesis generates requests from /openapi.json, valid and invalid; nothing may answer 5xx.
    Half the cases aim at a live sandbox and a running background command, to get past the 404s.
    Bounded: a fixed number of examples per operation and a time budget for the whole run."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from schemathesis import GenerationMode

    key = server.key("fuzzer", max_live=6)
    auth = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    statuses: dict[int, int] = {}
    budget = time.monotonic() + 100
    with client(server, key=key) as c:
        def fresh() -> dict:
            """A live sandbox for the fuzzer to aim at."""
            for info in c.get("/v1/sandboxes").json():  # room under the quota: drop what fuzzing created
                c.delete(f"/v1/sandboxes/{info['sandbox_id']}")
            return {"sandbox_id": c.post("/v1/sandboxes", json={}).json()["sandbox_id"]}

        def command() -> str:  # short-lived: following its stream must end soon
            for attempt in range(2):
                r = c.post(f"/v1/sandboxes/{live['sandbox_id']}/commands",
                           json={"cmd": "sleep 2", "background": True})
                if r.status_code == 200:
                    return r.json()["command_id"]
                # The fuzzer's own calls may have ended the live sandbox since it was last looked at
                # (a POST .../timeout of 2 s runs out a moment later): aim at a fresh one.
                live.update(fresh())
            raise AssertionError(f"a background command in a fresh sandbox: {r.status_code} {r.text[:300]}")

        live = fresh()
        for result in schema.get_all_operations():
            operation = result.ok()
            if time.monotonic() > budget:
                break
            if "/ports/" in operation.path:
                # A gateway to the sandbox's own server: its answers (its 5xx included) are that server's,
                # and 502 is the documented "nothing listens there" (tests/test_network.py covers it).
                continue
            live["command_id"] = command()
            strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                                 operation.as_strategy(GenerationMode.NEGATIVE))

            @settings(max_examples=50, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy, aim=st.booleans())
            def fuzz(case, aim):
                if time.monotonic() > budget:
                    return
                if aim and case.path_parameters and case.method.upper() != "DELETE":
                    for name in ("sandbox_id", "command_id"):
                        if name in case.path_parameters:
                            case.path_parameters[name] = live[name]
                if isinstance(case.body, dict):  # keep each call short: a time budget, not validation
                    value = case.body.get("timeout")
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 2:
                        case.body["timeout"] = 2
                if isinstance(case.query, dict) and isinstance(case.query.get("wait"), (int, float)):
                    case.query["wait"] = min(case.query["wait"], 1)
                response = case.call(base_url=server.url, headers=auth, timeout=60)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                    f"{response.text[:300]}\n  {case.as_curl_command()}")

            fuzz()
            if c.get(f"/v1/sandboxes/{live['sandbox_id']}").json()["status"] != "running" or \
                    len(c.get("/v1/sandboxes").json()) > 1:
                live.update(fresh())
        for info in c.get("/v1/sandboxes").json():
            c.delete(f"/v1/sandboxes/{info['sandbox_id']}")
    assert not failures, "\n".join(failures[:10])
    assert sum(statuses.values()) > 300 and statuses.get(200, 0) > 50, statuses  # it did reach the code
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_restart_after_kill_9_reports_lost_and_leaves_nothing(tmp_path):
    """A server told its sandboxes end with it (--no-durable): killed -9, they die; the next one says so."""
    first = ServerProcess(tmp_path / "sandlot.db", "--no-durable").start()
    key = first.key("owner")
    remote = {"api_url": first.url, "api_key": key}
    sb = Sandbox(**remote, metadata={"keep": "me"})
    sb.commands.run("sleep 1000 &")
    sid = sb.sandbox_id
    assert len(processes_in_sandbox(sid)) >= 3
    tree = descendants(first.pid) | set(processes_in_sandbox(sid))
    first.kill9()
    deadline = time.monotonic() + 10  # sandboxes, zygote and pool die with their owner
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in tree if alive(p)]

    second = ServerProcess(first.db_path, "--no-durable", port=first.port).start()
    try:
        with client(second, key=key) as c:
            info = c.get(f"/v1/sandboxes/{sid}").json()
            assert info["status"] == "lost" and "restart or crash" in info["end_reason"]
            assert info["metadata"] == {"keep": "me"}
            r = c.post(f"/v1/sandboxes/{sid}/code", json={"code": "1"})
            assert r.status_code == 404 and "lost" in error_of(r)["message"]
            assert [i["sandbox_id"] for i in c.get("/v1/sandboxes", params={"status": "lost"}).json()] == [sid]
            assert c.get("/v1/sandboxes").json() == []
        with pytest.raises(sandlot.SandboxNotFound, match="lost"):
            sb.run_code("1")
        assert not any(sid in p for p in host_leftovers().get("cgroups", []))
        assert processes_in_sandbox(sid) == {}
    finally:
        second.stop()


@pytest.mark.slow
def test_fifty_concurrent_clients_for_a_minute(server):
    """50 clients, each with its own sandbox, run code, commands and files for a minute; some recycle their
    sandbox on the way. No error, and afterwards no sandbox, process, cgroup or descriptor left over."""
    key = server.key("load", max_live=60, requests_per_minute=100_000, total_memory="64G", total_pids=60 * 128)
    remote = {"api_url": server.url, "api_key": key}
    duration = float(os.environ.get("SANDLOT_LOAD_SECONDS", "60"))
    with client(server) as c:
        c.get("/v1/sandboxes")
    time.sleep(1)
    fds_before, rss_before, warm_before = open_fds(server.pid), rss_bytes(server.pid), pool_ready(server)
    seen_ids: set[str] = set()
    counts = {"calls": 0}

    async def one_client(n: int) -> None:
        rng = random.Random(n)
        end = time.monotonic() + duration
        while time.monotonic() < end:
            async with AsyncSandbox(metadata={"client": str(n)}, **remote) as sb:
                seen_ids.add(sb.sandbox_id)
                await sb.run_code(f"total = {n}")
                for i in range(rng.randint(5, 15)):
                    if time.monotonic() > end:
                        break
                    out = []
                    ex = await sb.run_code(f"total += 1\nprint(total)", on_stdout=out.append)
                    assert ex.error is None and out == [f"{n + i + 1}\n"], (ex, out)
                    r = await sb.commands.run(f"echo {n}-{i}")
                    assert r.exit_code == 0 and r.stdout == f"{n}-{i}\n"
                    blob = os.urandom(rng.randint(1, 64 * 1024))
                    await sb.files.write(f"f{i}.bin", blob)
                    assert await sb.files.read(f"f{i}.bin", format="bytes") == blob
                    counts["calls"] += 4

    async def main() -> None:
        await asyncio.gather(*(one_client(n) for n in range(50)))

    asyncio.run(main())
    with client(server, key=key) as c:
        assert c.get("/v1/sandboxes").json() == []
        ended = c.get("/v1/sandboxes", params={"status": "ended", "limit": 1000}).json()
        assert {i["sandbox_id"] for i in ended} >= seen_ids
    assert counts["calls"] > 20 * duration, counts
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        leftover_cgroups = [p for p in host_leftovers().get("cgroups", []) if any(i in p for i in seen_ids)]
        leftover_procs = [i for i in seen_ids if processes_in_sandbox(i)]
        if not leftover_cgroups and not leftover_procs:
            break
        time.sleep(0.2)
    assert not leftover_cgroups and not leftover_procs
    # The burst grew the warm pool for a while (two descriptors per waiting sandbox: its channel and pidfd).
    allowed = fds_before + 10 + 2 * max(0, pool_ready(server) - warm_before)
    deadline = time.monotonic() + 15  # idle keep-alive connections close after uvicorn's 5 s timeout
    while open_fds(server.pid) > allowed and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_fds(server.pid) <= allowed, (fds_before, allowed, open_fds(server.pid))
    assert rss_bytes(server.pid) < rss_before + 150 * 1024**2, (rss_before, rss_bytes(server.pid))
    assert "Traceback" not in server.log()
