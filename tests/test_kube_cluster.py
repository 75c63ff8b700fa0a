"""The emulated agent-sandbox cluster (tests/kube_cluster.py) behaves as KUBE-CONTRACT.md says, seen the way
the kubernetes backend sees it: through kubernetes_asyncio, over HTTP, from the kubeconfig.

The pods here run a stand-in container (a stdlib TCP echo server on 0.0.0.0:8888): the harness does not
care what the container runs. Each echo server carries a marker in its command line so the tests can
see, in the host's /proc, that no sandbox process outlives its claim or the cluster."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import secrets
import shlex
import socket
import time

import httpx

import pytest
import yaml
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.conftest import needs_sandbox
from tests.kube_cluster import KubeCluster, KubeClusterThread, socket_is_free

pytestmark = needs_sandbox

GROUP, VERSION, NS = "extensions.agents.x-k8s.io", "v1beta1", "default"
MERGE = "application/merge-patch+json"
ECHO = ("import socket,threading\n"
        "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.bind(('0.0.0.0',8888));s.listen()\n"
        "def h(c):\n"
        "  with c:\n"
        "    while d:=c.recv(65536): c.sendall(d)\n"
        "while 1:\n"
        "  c,_=s.accept();threading.Thread(target=h,args=(c,),daemon=True).start()\n")


def echo_command(marker: str) -> list[str]:
    return ["python3", "-c", ECHO + f"# {marker}\n"]


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


async def until(predicate, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def claim_body(name: str, pool: str = "sandlot-python", shutdown: str = "2099-01-01T00:00:00Z",
               policy: str = "Delete") -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SandboxClaim",
            "metadata": {"name": name, "labels": {"sandlot.dev/sandbox": name.removeprefix("sandlot-"),
                                                  "sandlot.dev/managed-by": "sandlot",
                                                  "sandlot.dev/template": "python"}},
            "spec": {"warmPoolRef": {"name": pool},
                     "lifecycle": {"shutdownTime": shutdown, "shutdownPolicy": policy}}}


def ready_condition(claim: dict) -> dict:
    return next(c for c in claim["status"]["conditions"] if c["type"] == "Ready")


MARKER = "kubeemu-" + secrets.token_hex(6)


@pytest.fixture(scope="module")
async def cluster():
    async with KubeCluster() as c:
        await c.apply_template("python", command=echo_command(MARKER), args=[])
        await c.apply_template("slow", command=echo_command(MARKER), args=[])
        c.never_ready("sandlot-slow")
        yield c
    assert c.running_pods() == 0
    await until(lambda: not processes_with(MARKER))


@pytest.fixture(scope="module")
async def api(cluster):
    return client.CustomObjectsApi(await cluster.api_client())


async def create_claim(api, name: str, **kw) -> dict:
    return await api.create_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", claim_body(name, **kw))


# -- the API server ------------------------------------------------------------------------------------------


async def test_kubeconfig_reaches_the_server_with_its_token(cluster):
    api = await cluster.api_client()
    assert (await client.VersionApi(api).get_code()).major == "1"
    groups = await client.ApisApi(api).get_api_versions()
    assert {GROUP, "agents.x-k8s.io"} <= {g.name for g in groups.groups}
    stranger = client.ApiClient(client.Configuration(host=cluster.url, api_key={"authorization": "Bearer nope"}))
    try:
        with pytest.raises(ApiException) as err:
            await client.CustomObjectsApi(stranger).list_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims")
        assert err.value.status == 401
    finally:
        await stranger.close()


async def test_create_get_conflict_and_not_found_answer_as_kube_apiserver(api):
    made = await api.create_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SandboxTemplate", "metadata": {"name": "t-crud"},
        "spec": {"podTemplate": {"spec": {"containers": []}}}, "status": {"ignored": True}})
    meta = made["metadata"]
    assert meta["namespace"] == NS and meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert "status" not in made  # the status subresource: create cannot set it
    got = await api.get_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", "t-crud")
    assert got == made
    with pytest.raises(ApiException) as err:
        await api.create_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "SandboxTemplate", "metadata": {"name": "t-crud"}})
    body = json.loads(err.value.body)
    assert (err.value.status, body["kind"], body["reason"]) == (409, "Status", "AlreadyExists")
    with pytest.raises(ApiException) as err:
        await api.get_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "nobody")
    body = json.loads(err.value.body)
    assert (err.value.status, body["reason"], body["details"]["name"]) == (404, "NotFound", "nobody")
    gone = await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", "t-crud")
    assert (gone["kind"], gone["status"]) == ("Status", "Success")
    with pytest.raises(ApiException) as err:
        await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", "t-crud")
    assert err.value.status == 404


async def test_finalizers_hold_a_deleted_object_until_they_are_removed(api):
    await api.create_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SandboxTemplate",
        "metadata": {"name": "t-fin", "finalizers": ["test/hold"]}, "spec": {}})
    held = await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", "t-fin")
    assert held["metadata"]["deletionTimestamp"]
    assert (await api.get_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", "t-fin"))["metadata"]["name"]
    await api.patch_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", "t-fin",
                                             {"metadata": {"finalizers": None}}, _content_type=MERGE)
    with pytest.raises(ApiException) as err:
        await api.get_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", "t-fin")
    assert err.value.status == 404


async def test_patch_replace_and_the_status_subresource(api):
    base = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SandboxWarmPool", "metadata": {"name": "p-patch"},
            "spec": {"replicas": 1, "sandboxTemplateRef": {"name": "none"}}}
    made = await api.create_namespaced_custom_object(GROUP, VERSION, NS, "sandboxwarmpools", base)
    # kubernetes_asyncio sends a dict as application/json-patch+json unless told: a real server says 400.
    with pytest.raises(ApiException) as err:
        await api.patch_namespaced_custom_object(GROUP, VERSION, NS, "sandboxwarmpools", "p-patch", {"spec": {"replicas": 2}})
    assert err.value.status == 400
    patched = await api.patch_namespaced_custom_object(
        GROUP, VERSION, NS, "sandboxwarmpools", "p-patch", {"spec": {"replicas": 2}, "status": {"x": 1}},
        _content_type=MERGE)
    assert patched["spec"]["replicas"] == 2 and "status" not in patched
    assert int(patched["metadata"]["resourceVersion"]) > int(made["metadata"]["resourceVersion"])
    assert patched["metadata"]["generation"] == 2
    status = await api.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, "sandboxwarmpools", "p-patch", {"status": {"readyReplicas": 2}, "spec": {"replicas": 9}},
        _content_type=MERGE)
    assert status["status"] == {"readyReplicas": 2} and status["spec"]["replicas"] == 2
    json_patched = await api.patch_namespaced_custom_object(
        GROUP, VERSION, NS, "sandboxwarmpools", "p-patch", [{"op": "replace", "path": "/spec/replicas", "value": 3}])
    assert json_patched["spec"]["replicas"] == 3
    stale = dict(base, metadata={"name": "p-patch", "resourceVersion": made["metadata"]["resourceVersion"]})
    with pytest.raises(ApiException) as err:
        await api.replace_namespaced_custom_object(GROUP, VERSION, NS, "sandboxwarmpools", "p-patch", stale)
    assert (err.value.status, json.loads(err.value.body)["reason"]) == (409, "Conflict")
    fresh = dict(base, metadata=json_patched["metadata"])
    replaced = await api.replace_namespaced_custom_object(GROUP, VERSION, NS, "sandboxwarmpools", "p-patch", fresh)
    assert replaced["spec"]["replicas"] == 1 and replaced["status"] == {"readyReplicas": 2}
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxwarmpools", "p-patch")


async def test_label_selectors_on_list(api):
    for name, tpl in (("sel-a", "python"), ("sel-b", "node")):
        await api.create_namespaced_custom_object(GROUP, VERSION, NS, "sandboxwarmpools", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "SandboxWarmPool",
            "metadata": {"name": name, "labels": {"sel": "yes", "tpl": tpl}},
            "spec": {"replicas": 0, "sandboxTemplateRef": {"name": "none"}}})

    async def names(selector: str) -> list[str]:
        got = await api.list_namespaced_custom_object(GROUP, VERSION, NS, "sandboxwarmpools", label_selector=selector)
        return [o["metadata"]["name"] for o in got["items"]]

    assert await names("sel=yes") == ["sel-a", "sel-b"]
    assert await names("sel=yes,tpl!=node") == ["sel-a"]
    assert await names("tpl in (node,go)") == ["sel-b"]
    assert await names("sel,!missing") == ["sel-a", "sel-b"]
    assert await names("sel=no") == []
    await api.delete_collection_namespaced_custom_object(GROUP, VERSION, NS, "sandboxwarmpools", label_selector="sel=yes")
    assert await names("sel") == []


async def test_watch_from_a_resource_version_gets_only_later_events_with_its_selector(api):
    listed = await api.list_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates")
    rv = listed["metadata"]["resourceVersion"]
    for name, team in (("w-1", "a"), ("w-2", "b")):
        await api.create_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "SandboxTemplate",
            "metadata": {"name": name, "labels": {"team": team}}, "spec": {}})
    await api.patch_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", "w-1",
                                             {"metadata": {"labels": {"team": "b"}}}, _content_type=MERGE)
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", "w-2")
    seen = []
    async with watch.Watch().stream(api.list_namespaced_custom_object, GROUP, VERSION, NS, "sandboxtemplates",
                                    resource_version=rv, label_selector="team=b", timeout_seconds=1) as stream:
        async for event in stream:
            seen.append((event["type"], event["object"]["metadata"]["name"]))
    # w-1 enters the selection when relabelled: ADDED, as the API server's watch cache says it
    assert seen == [("ADDED", "w-2"), ("ADDED", "w-1"), ("DELETED", "w-2")]
    seen = []
    async with watch.Watch().stream(api.list_namespaced_custom_object, GROUP, VERSION, NS, "sandboxtemplates",
                                    label_selector="team=b", timeout_seconds=1) as stream:
        async for event in stream:
            seen.append((event["type"], event["object"]["metadata"]["name"]))
    assert seen == [("ADDED", "w-1")]  # no resourceVersion: the current objects first
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxtemplates", "w-1")


async def test_gone_on_next_watch_gives_410_until_the_watcher_lists_again(cluster, api):
    listed = await api.list_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims")
    rv = listed["metadata"]["resourceVersion"]
    stream = watch.Watch().stream(api.list_namespaced_custom_object, GROUP, VERSION, NS, "sandboxclaims",
                                  resource_version=rv)
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.2)
    cluster.gone_on_next_watch()
    with pytest.raises(ApiException) as err:  # the open watch ends; its return with the old version is 410
        await asyncio.wait_for(first, 10)
    assert err.value.status == 410
    assert [w.get("resourceVersion") for w in cluster.watch_requests()][-3:] == [rv, rv, rv]  # the client retried once
    relisted = await api.list_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims")
    assert int(relisted["metadata"]["resourceVersion"]) > int(rv)
    async with watch.Watch().stream(api.list_namespaced_custom_object, GROUP, VERSION, NS, "sandboxclaims",
                                    resource_version=relisted["metadata"]["resourceVersion"],
                                    timeout_seconds=1) as again:
        assert [e async for e in again] == []


# -- the controller and the kubelet ------------------------------------------------------------------------------


async def test_a_claim_becomes_ready_with_a_pod_ip_that_reaches_its_container(cluster, api):
    started = time.monotonic()
    await create_claim(api, "sandlot-sb-ready")
    claim = await cluster.wait_ready("sandlot-sb-ready")
    took = time.monotonic() - started
    cond = ready_condition(claim)
    assert (cond["status"], cond["reason"]) == ("True", "SandboxReady")
    sandbox = claim["status"]["sandbox"]
    ip = sandbox["podIPs"][0]
    assert ip.startswith("127.0.0.") and int(ip.rsplit(".", 1)[1]) >= 10 and sandbox["name"]
    reader, writer = await asyncio.open_connection(ip, 8888)
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    writer.close()
    pod = await client.CoreV1Api(api.api_client).read_namespaced_pod(sandbox["name"], NS)
    assert pod.status.pod_ip == ip and pod.metadata.labels["sandlot.dev/template"] == "python"
    assert cluster.running_pods() == 1 and processes_with(MARKER)
    print(f"claim to Ready in {took:.3f}s")
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "sandlot-sb-ready")
    await until(lambda: cluster.running_pods() == 0 and not processes_with(MARKER))
    assert socket_is_free(ip, 8888)


async def _refused(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(ip, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def _echoes(ip: str, port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection(ip, port)
    except OSError:
        return False
    try:
        writer.write(b"ping")
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    except (OSError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def test_the_pod_address_reaches_every_port_its_code_listens_on_at_every_address(cluster, api):
    """As on a pod network: a server the pod's code starts on 0.0.0.0 is reached at the pod's address while it
    listens; a port nothing listens on, or one bound to the pod's loopback, refuses the connection."""
    await create_claim(api, "sandlot-sb-ports")
    ip = (await cluster.wait_ready("sandlot-sb-ports"))["status"]["sandbox"]["podIPs"][0]
    sandbox = cluster.pods[(NS, "sandlot-sb-ports")].sandbox
    assert await _refused(ip, 8001)
    server = await sandbox.commands.run("exec python3 -c " + shlex.quote(ECHO.replace("8888", "8001")),
                                        background=True)
    await sandbox.commands.run("exec python3 -c " + shlex.quote(ECHO.replace("'0.0.0.0',8888", "'127.0.0.1',8002")),
                               background=True)
    deadline = time.monotonic() + 10
    while not await _echoes(ip, 8001):
        assert time.monotonic() < deadline, "port 8001 never reached"
        await asyncio.sleep(0.05)
    r = await sandbox.commands.run("python3 -c \"import socket; socket.create_connection(('127.0.0.1', 8002), 5)\"")
    assert r.exit_code == 0  # it listens, on the pod's loopback only
    assert await _refused(ip, 8002) and await _refused(ip, 8003)
    await server.kill()
    await until(lambda: socket_is_free(ip, 8001))  # it stopped listening: refused again
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "sandlot-sb-ports")
    await until(lambda: cluster.running_pods() == 0 and not processes_with(MARKER))


async def test_claims_are_listed_by_label_and_each_pod_has_its_own_ip(cluster, api):
    await asyncio.gather(*(create_claim(api, f"sandlot-sb-many{i}") for i in range(3)))
    claims = [await cluster.wait_ready(f"sandlot-sb-many{i}") for i in range(3)]
    ips = {c["status"]["sandbox"]["podIPs"][0] for c in claims}
    assert len(ips) == 3 and cluster.running_pods() == 3
    listed = await api.list_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims",
                                                     label_selector="sandlot.dev/managed-by=sandlot")
    assert {o["metadata"]["name"] for o in listed["items"]} >= {f"sandlot-sb-many{i}" for i in range(3)}
    assert len(cluster.claims()) == 3
    for i in range(3):
        await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", f"sandlot-sb-many{i}")
    await until(lambda: cluster.running_pods() == 0 and not processes_with(MARKER))


async def test_kill_pod_fails_the_claim_and_closes_its_address(cluster, api):
    await create_claim(api, "sandlot-sb-kill")
    ip = (await cluster.wait_ready("sandlot-sb-kill"))["status"]["sandbox"]["podIPs"][0]
    await cluster.kill_pod("sandlot-sb-kill")
    claim = await api.get_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "sandlot-sb-kill")
    cond = ready_condition(claim)
    assert (cond["status"], cond["reason"]) == ("False", "PodFailed")
    assert claim["status"]["sandbox"]["podIPs"] == []
    assert cluster.running_pods() == 0 and socket_is_free(ip, 8888)
    await until(lambda: not processes_with(MARKER))
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "sandlot-sb-kill")


async def test_a_container_that_exits_fails_its_pod(cluster, api):
    await cluster.apply_template("crash", command=["python3", "-c", "import sys; sys.exit(3)"], args=[])
    await create_claim(api, "sandlot-sb-crash", pool="sandlot-crash")

    def failed() -> bool:
        conditions = ((cluster.claim("sandlot-sb-crash") or {}).get("status") or {}).get("conditions") or []
        return any(c["reason"] == "PodFailed" for c in conditions)

    await until(failed)
    assert cluster.running_pods() == 0
    claim = cluster.claim("sandlot-sb-crash")
    assert "code 3" in ready_condition(claim)["message"] and claim["status"]["sandbox"]["podIPs"] == []
    pod = await client.CoreV1Api(api.api_client).read_namespaced_pod(claim["status"]["sandbox"]["name"], NS)
    assert pod.status.phase == "Failed"
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "sandlot-sb-crash")


async def test_never_ready_keeps_the_claim_unready_while_its_pod_runs(cluster, api):
    await create_claim(api, "sandlot-sb-slow", pool="sandlot-slow")
    await until(lambda: cluster.running_pods() == 1)
    await asyncio.sleep(1.0)
    claim = cluster.claim("sandlot-sb-slow")
    assert ready_condition(claim)["status"] == "False" and not claim["status"]["sandbox"].get("podIPs")
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "sandlot-sb-slow")
    await until(lambda: cluster.running_pods() == 0 and not processes_with(MARKER))


async def test_a_claim_past_its_shutdown_time_is_deleted_with_its_sandbox(cluster, api):
    soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1.5))
    await create_claim(api, "sandlot-sb-expiring", shutdown=soon.strftime("%Y-%m-%dT%H:%M:%SZ"))
    await cluster.wait_ready("sandlot-sb-expiring")
    await until(lambda: cluster.claim("sandlot-sb-expiring") is None, within=5)
    with pytest.raises(ApiException) as err:
        await api.get_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "sandlot-sb-expiring")
    assert err.value.status == 404
    await until(lambda: cluster.running_pods() == 0 and not processes_with(MARKER))


async def test_a_claim_waits_for_its_warm_pool(cluster, api):
    await create_claim(api, "sandlot-sb-early", pool="sandlot-later")
    await until(lambda: (cluster.claim("sandlot-sb-early").get("status") or {}).get("conditions"))
    assert ready_condition(cluster.claim("sandlot-sb-early"))["reason"] == "WarmPoolNotFound"
    await cluster.apply_template("later", command=echo_command(MARKER), args=[])
    await cluster.wait_ready("sandlot-sb-early")
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "sandlot-sb-early")
    await until(lambda: cluster.running_pods() == 0)


async def test_close_kills_every_pod_it_started():
    marker = "kubeemu-close-" + secrets.token_hex(4)
    cluster = await KubeCluster(prewarm=False).start()
    try:
        await cluster.apply_template("python", command=echo_command(marker), args=[])
        api = client.CustomObjectsApi(await cluster.api_client())
        for i in range(2):
            await create_claim(api, f"sandlot-sb-close{i}")
        ips = [(await cluster.wait_ready(f"sandlot-sb-close{i}"))["status"]["sandbox"]["podIPs"][0] for i in range(2)]
        await create_claim(api, "sandlot-sb-close-starting")  # still starting when the cluster closes
        assert len(processes_with(marker)) >= 2
    finally:
        await cluster.close()
    assert cluster.running_pods() == 0
    await until(lambda: not processes_with(marker))
    assert all(socket_is_free(ip, 8888) for ip in ips)


def test_a_cluster_on_its_own_thread_serves_sync_tests():
    """A sync test (a subprocess server, the sync SDK) blocks its thread: the cluster runs on its own loop."""
    marker = "kubeemu-thread-" + secrets.token_hex(4)
    with KubeClusterThread(prewarm=False) as cluster:
        cluster.apply_template("python", command=echo_command(marker), args=[])
        with open(cluster.kubeconfig) as f:
            config = yaml.safe_load(f)
        server, token = config["clusters"][0]["cluster"]["server"], config["users"][0]["user"]["token"]
        url = f"{server}/apis/{GROUP}/{VERSION}/namespaces/{NS}/sandboxclaims"
        headers = {"Authorization": f"Bearer {token}"}
        made = httpx.post(url, json=claim_body("sandlot-sb-thread"), headers=headers)
        assert made.status_code == 201
        ip = cluster.wait_ready("sandlot-sb-thread")["status"]["sandbox"]["podIPs"][0]
        with socket.create_connection((ip, 8888), timeout=5) as conn:
            conn.sendall(b"sync")
            assert conn.recv(4) == b"sync"
        assert cluster.running_pods() == 1 and processes_with(marker)
        assert httpx.delete(f"{url}/sandlot-sb-thread", headers=headers).status_code == 200
        deadline = time.monotonic() + 10
        while cluster.running_pods():
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while processes_with(marker):
        assert time.monotonic() < deadline
        time.sleep(0.05)


async def test_container_limits_become_the_sandbox_limits(cluster, api):
    await cluster.apply_template("small", command=echo_command(MARKER), args=[],
                                 resources={"limits": {"cpu": "500m", "memory": "256Mi"}})
    await cluster.apply_template("tiny", command=echo_command(MARKER), args=[],
                                 resources={"limits": {"memory": "1Mi"}})  # below what a sandbox accepts
    await create_claim(api, "sandlot-sb-small", pool="sandlot-small")
    await create_claim(api, "sandlot-sb-tiny", pool="sandlot-tiny")
    await cluster.wait_ready("sandlot-sb-small")
    limits = cluster.pods[(NS, "sandlot-sb-small")].sandbox.limits
    assert (limits.cpu, limits.memory) == (0.5, 256 * 2**20)

    def tiny_failed() -> bool:
        conditions = ((cluster.claim("sandlot-sb-tiny") or {}).get("status") or {}).get("conditions") or []
        return any(c["reason"] == "PodFailed" for c in conditions)

    await until(tiny_failed)
    for name in ("sandlot-sb-small", "sandlot-sb-tiny"):
        await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", name)
    await until(lambda: cluster.running_pods() == 0)


async def test_a_freed_pod_address_is_not_handed_out_again_at_once(cluster, api):
    """As a CNI's allocator: a client still retrying an old pod's address must not reach the next pod."""
    await create_claim(api, "sandlot-sb-ip1")
    first = (await cluster.wait_ready("sandlot-sb-ip1"))["status"]["sandbox"]["podIPs"][0]
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "sandlot-sb-ip1")
    await until(lambda: cluster.running_pods() == 0)
    await create_claim(api, "sandlot-sb-ip2")
    second = (await cluster.wait_ready("sandlot-sb-ip2"))["status"]["sandbox"]["podIPs"][0]
    assert second != first
    await api.delete_namespaced_custom_object(GROUP, VERSION, NS, "sandboxclaims", "sandlot-sb-ip2")
    await until(lambda: cluster.running_pods() == 0)
