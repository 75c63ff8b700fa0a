"""The kubernetes tier end to end, on an emulated cluster (tests/kube_cluster.py: a Kubernetes API over real HTTP
with kubernetes-sigs/agent-sandbox's resources; the test plays the controller and the kubelet, and each claimed
pod is a real local sandbox running Sandlot's pod holder and agent).

From the SDK through the tier's backend to code running in the pod: claims and their lifetime, the pod address,
the per-sandbox key, a claim that never becomes ready, a pod that dies, 410 on a watch.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import sandlot
from sandlot import SandboxCrashed, SandboxNotFound
from sandlot._backends import kubernetes as kube
from sandlot._engine import Engine
from sandlot._spec import SandboxSpec

from .conftest import http_body_once_up, needs_sandbox

pytestmark = [needs_sandbox]

kube_cluster = pytest.importorskip("tests.kube_cluster", reason="the cluster emulator needs kmock and kubernetes_asyncio "
                                   "(pip install -e '.[test]')")


@pytest.fixture(scope="module")
async def cluster():
    async with kube_cluster.KubeCluster() as c:
        await c.apply_template("python")
        yield c


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    """This process's sandboxes of the kubernetes tier go to the emulated cluster, made as a program using the SDK
    makes them (its engine not durable: an in-process server of an earlier test may have left it so)."""
    from sandlot._engine import default_engine

    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig)
    monkeypatch.setenv("SANDLOT_KUBE_NAMESPACE", cluster.namespace)
    monkeypatch.setattr(default_engine(), "durable", False)
    return cluster


def _ours(cluster, sandbox_id: str):
    return cluster.claim(kube.claim_name(sandbox_id))


async def _gone(cluster, name: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while cluster.claim(name) is not None:
        assert time.monotonic() < deadline, f"claim {name} still there"
        await asyncio.sleep(0.05)


async def test_a_sandbox_is_a_claimed_pod_running_code_commands_and_files(on_cluster):
    cluster = on_cluster
    async with sandlot.AsyncSandbox(isolation="kubernetes", api_url="") as sb:
        claim = _ours(cluster, sb.sandbox_id)
        assert claim is not None
        assert claim["spec"]["warmPoolRef"] == {"name": "sandlot-python"}
        assert claim["metadata"]["labels"] == {"sandlot.dev/sandbox": sb.sandbox_id, "sandlot.dev/managed-by": "sandlot",
                                               "sandlot.dev/template": "python"}
        assert claim["spec"]["lifecycle"]["shutdownPolicy"] == "Delete"
        shutdown = kube_cluster._parse_time(claim["spec"]["lifecycle"]["shutdownTime"]).timestamp()
        assert time.time() < shutdown <= time.time() + 24 * 3600 + 5  # the sandbox's lifetime: no pod outlives it
        execution = await sb.run_code("import os\nx = 6 * 7\nprint('uid', os.getuid())\nx")
        assert execution.error is None, execution.error
        assert execution.logs.stdout == ["uid 1000\n"] and execution.results[0].text == "42"
        assert (await sb.run_code("x + 1")).results[0].text == "43"  # a session: state kept between calls
        await sb.files.write("/home/user/data.txt", b"hello pod")
        r = await sb.commands.run("cat /home/user/data.txt; echo; hostname")
        assert r.exit_code == 0 and r.stdout.startswith("hello pod\n")
        assert await sb.files.read("/home/user/data.txt") == "hello pod"
        assert (await sb.run_code("1/0")).error.name == "ZeroDivisionError"
        name = kube.claim_name(sb.sandbox_id)
    await _gone(cluster, name)  # kill deletes the claim: the controller deletes the pod


async def test_one_shot_run_code_on_the_tier(on_cluster):
    # The sync facade, as a script would call it (its own event loop in a thread; the cluster answers from ours).
    execution = await asyncio.to_thread(sandlot.run_code, "print(sum(range(10)))", isolation="kubernetes")
    assert execution.logs.stdout == ["45\n"]
    deadline = time.monotonic() + 15
    while [c for c in on_cluster.claims() if "deletionTimestamp" not in c["metadata"]]:
        assert time.monotonic() < deadline, on_cluster.claims()
        await asyncio.sleep(0.05)


async def test_a_claim_that_never_becomes_ready_times_out_and_is_deleted(on_cluster, monkeypatch):
    cluster = on_cluster
    await cluster.apply_template("slow")
    cluster.never_ready("sandlot-slow")
    monkeypatch.setenv("SANDLOT_KUBE_CLAIM_TIMEOUT", "2")
    before = {c["metadata"]["name"] for c in cluster.claims()}
    started = time.monotonic()
    with pytest.raises(sandlot.TimeoutError, match="no ready pod within 2 s"):
        await sandlot.AsyncSandbox.create(template=_slow_template(), isolation="kubernetes", api_url="")
    assert time.monotonic() - started < 10
    _templates_forget("slow")
    made = {c["metadata"]["name"] for c in cluster.claims()} - before
    for name in made:
        await _gone(cluster, name)


def _templates_forget(name: str) -> None:
    from sandlot import _templates

    _templates.unregister_transient(name)


def _slow_template() -> str:
    """A Sandlot template named "slow" (the python template's copy) whose warm pool never gets ready."""
    import dataclasses

    from sandlot import _templates

    _templates.register_transient(dataclasses.replace(_templates.get_template("python"), name="slow"))
    return "slow"


async def test_a_pod_that_dies_ends_its_sandbox(on_cluster):
    cluster = on_cluster
    sb = await sandlot.AsyncSandbox.create(isolation="kubernetes", api_url="")
    try:
        await sb.run_code("y = 1")
        await cluster.kill_pod(kube.claim_name(sb.sandbox_id))
        with pytest.raises((SandboxCrashed, SandboxNotFound)):
            for _ in range(50):
                await sb.run_code("y")
                await asyncio.sleep(0.1)
    finally:
        await sb.kill()
    await _gone(cluster, kube.claim_name(sb.sandbox_id))


async def test_a_410_on_the_watch_is_taken_up_again(on_cluster):
    cluster = on_cluster
    cluster.gone_on_next_watch()
    async with sandlot.AsyncSandbox(isolation="kubernetes", api_url="") as sb:
        assert (await sb.run_code("2 ** 10")).results[0].text == "1024"


async def test_the_lease_moves_the_claims_shutdown_time(on_cluster):
    cluster = on_cluster
    engine = Engine()
    engine.durable = True  # as a server's
    sandbox = await engine.create(SandboxSpec.build("python", isolation="kubernetes",
                                                                  limits={"lifetime": 600}))
    try:
        claim = _ours(cluster, sandbox.sandbox_id)
        shutdown = kube_cluster._parse_time(claim["spec"]["lifecycle"]["shutdownTime"]).timestamp()
        assert abs(shutdown - (time.time() + 600)) < 30
        await sandbox.set_timeout(120)
        claim = _ours(cluster, sandbox.sandbox_id)
        shutdown = kube_cluster._parse_time(claim["spec"]["lifecycle"]["shutdownTime"]).timestamp()
        assert abs(shutdown - (time.time() + 120)) < 30
    finally:
        await sandbox.kill()
        await engine.shutdown()


async def test_a_pod_bound_by_someone_else_is_refused_and_its_claim_deleted(on_cluster):
    """An unbound warm pod binds to whoever speaks first: if that was not this server, the create fails clearly
    and the claim goes (the NetworkPolicy should have kept anyone else out)."""
    cluster = on_cluster
    real_wait = kube._Cluster.wait_ready

    async def someone_binds_first(self, name, timeout):
        address = await real_wait(self, name, timeout)
        sock, _ = await kube.connect_pod(address, 8888, "s" * 43, bind=True)  # an intruder's hello
        sock.close()
        return address

    kube._Cluster.wait_ready = someone_binds_first
    try:
        with pytest.raises(kube.PodRefused):
            await sandlot.AsyncSandbox.create(isolation="kubernetes", api_url="")
    finally:
        kube._Cluster.wait_ready = real_wait
    deadline = time.monotonic() + 15
    while [c for c in cluster.claims() if "deletionTimestamp" not in c["metadata"]]:
        assert time.monotonic() < deadline, cluster.claims()
        await asyncio.sleep(0.05)


# -- through a server: `sandlot serve --isolations kubernetes` ------------------------------------------------
def _server_env(cluster) -> dict:
    import os

    return dict(os.environ, KUBECONFIG=cluster.kubeconfig, SANDLOT_KUBE_NAMESPACE=cluster.namespace)


async def test_a_server_of_the_tier_serves_the_sdk_and_a_restarted_one_takes_its_sandboxes_back(cluster, tmp_path):
    from .serverproc import ServerProcess

    db = tmp_path / "sandlot.db"
    server = ServerProcess(db, "--isolations", "kubernetes", env=_server_env(cluster))
    await asyncio.to_thread(server.start)  # in a thread: the emulated cluster answers from this event loop
    try:
        key = server.key("alice")
        # The SDK unchanged: no isolation named, the server's (first) tier is the default.
        sb = await sandlot.AsyncSandbox.create(api_url=server.url, api_key=key)
        assert cluster.claim(kube.claim_name(sb.sandbox_id)) is not None
        assert (await sb.run_code("counter = 41\ncounter + 1")).results[0].text == "42"
        r = await sb.commands.run("echo from-the-pod")
        assert r.stdout == "from-the-pod\n"
        # The server restarts (an upgrade, a crash): the sandbox runs on in its pod, the next server takes it back.
        await asyncio.to_thread(server.kill9)
        await asyncio.to_thread(server.start)
        again = await sandlot.AsyncSandbox.connect(sb.sandbox_id, api_url=server.url, api_key=key)
        assert (await again.run_code("counter")).results[0].text == "41"  # its session survived
        await again.kill()
        await _gone(cluster, kube.claim_name(sb.sandbox_id))
        # What a server's crash left half made (a claim no row records) is swept by the next server.
        orphan = {"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim",
                  "metadata": {"name": "sandlot-sb-0000000000ff",
                               "labels": {"sandlot.dev/sandbox": "sb-0000000000ff", "sandlot.dev/managed-by": "sandlot",
                                          "sandlot.dev/durable": "true"}},
                  "spec": {"warmPoolRef": {"name": "sandlot-python"}}}
        await cluster.apply(orphan)
        # An API server stamps creationTimestamp itself: the claim is aged in the emulator's store (time passing).
        from .kube_api import SANDBOX_CLAIMS

        cluster.api._store[(SANDBOX_CLAIMS, cluster.namespace, "sandlot-sb-0000000000ff")]["metadata"][
            "creationTimestamp"] = "2026-01-01T00:00:00Z"
        young = dict(orphan, metadata=dict(orphan["metadata"], name="sandlot-sb-0000000000fe",
                                           labels=dict(orphan["metadata"]["labels"], **{"sandlot.dev/sandbox": "sb-0000000000fe"})))
        await cluster.apply(young)  # unrecorded but new: maybe another replica's create in flight
        await asyncio.to_thread(server.kill9)
        await asyncio.to_thread(server.start)
        await _gone(cluster, "sandlot-sb-0000000000ff")
        assert cluster.claim("sandlot-sb-0000000000fe") is not None
        api = await cluster.api_client()
        from kubernetes_asyncio import client as kclient

        await kclient.CustomObjectsApi(api).delete_namespaced_custom_object(
            kube.GROUP, kube.VERSION, cluster.namespace, kube.CLAIMS, "sandlot-sb-0000000000fe")
    finally:
        await asyncio.to_thread(server.stop)


async def test_the_cli_and_mcp_work_unchanged_against_a_server_of_the_tier(on_cluster, tmp_path):
    """`sandlot serve --isolations kubernetes` (the command the manifests' Deployment runs), then the CLI's `run` and
    an MCP client on its /mcp, each unchanged: their sandboxes are claimed pods."""
    import json
    import subprocess

    from .cli_server import COMMAND, CliServer, clean_env

    server = CliServer(tmp_path)
    await asyncio.to_thread(server.start, "--isolations", "kubernetes")
    try:
        key = await asyncio.to_thread(server.key, "carol")
        env = clean_env(SANDLOT_API_URL=server.url, SANDLOT_API_KEY=key)
        r = await asyncio.to_thread(subprocess.run, COMMAND + ["run", "--json", "print(7 * 6)"], capture_output=True,
                                    text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["stdout"] == "42\n"

        mcp_session = pytest.importorskip("mcp").ClientSession
        httpx2 = pytest.importorskip("httpx2")  # the transport of the mcp SDK's HTTP client
        from mcp.client.streamable_http import streamable_http_client

        async def over_mcp() -> list:
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
                async with streamable_http_client(server.url + "/mcp", http_client=http) as (read, write, *_):
                    async with mcp_session(read, write) as s:
                        await s.initialize()
                        made = await s.call_tool("create_session", {"ttl_seconds": 600})
                        sid = made.structured_content["session_id"]
                        await s.call_tool("run_code", {"code": "z = 'pod'", "session_id": sid})
                        out = await s.call_tool("run_code", {"code": "z * 2", "session_id": sid})
                        claimed = on_cluster.claim(kube.claim_name(sid)) is not None
                        await s.call_tool("close_session", {"session_id": sid})
                        return [c.text for c in out.content if c.type == "text"], claimed, sid

        texts, claimed, sid = await over_mcp()
        assert texts == ["Out[2]: 'podpod'"] and claimed  # the MCP session was a claimed pod
        await _gone(on_cluster, kube.claim_name(sid))
    finally:
        await asyncio.to_thread(server.stop)


async def test_usage_and_metrics_are_the_pods_own(on_cluster):
    async with sandlot.AsyncSandbox(isolation="kubernetes", api_url="") as sb:
        burn = await sb.run_code("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass")
        assert burn.error is None
        assert 0.3 < burn.usage.cpu_seconds < 5
        big = await sb.run_code("block = bytearray(120 * 1024 * 1024)\nimport time; time.sleep(0.7)\nlen(block)")
        assert big.usage.peak_memory >= 120 * 1024 * 1024
        m = await sb.metrics()
        assert m.memory >= 120 * 1024 * 1024 and m.memory_peak >= m.memory
        assert m.cpu_seconds >= 0.4 and m.processes >= 2  # the holder, the agent, the session
        await sb.run_code("del block")
        after = await sb.run_code("1")
        assert after.usage.peak_memory <= big.usage.peak_memory - 100 * 1024 * 1024  # the peak starts over each call


async def test_a_network_policy_of_addresses_is_the_pods_own_network_policy(on_cluster):
    """The cluster enforces egress on this tier: a sandbox's policy becomes a NetworkPolicy selecting its pod alone
    (the template's own denies everything); names and secrets, which a NetworkPolicy cannot say, are refused."""
    from .kube_api import NETWORK_POLICIES

    cluster = on_cluster
    policy = {"allow": ["203.0.113.0/24:443", "0.0.0.0/0:80"], "deny": ["203.0.113.7"]}
    async with sandlot.AsyncSandbox(isolation="kubernetes", api_url="", network=policy) as sb:
        name = kube.claim_name(sb.sandbox_id)
        np = cluster.api.get(NETWORK_POLICIES, cluster.namespace, name)
        assert np is not None
        claim = cluster.claim(name)
        assert claim["spec"]["additionalPodMetadata"]["labels"] == {"sandlot.dev/sandbox": sb.sandbox_id}
        assert np["spec"]["podSelector"] == {"matchLabels": {"sandlot.dev/sandbox": sb.sandbox_id}}
        assert np["spec"]["policyTypes"] == ["Egress"]
        assert np["metadata"]["ownerReferences"][0]["uid"] == claim["metadata"]["uid"]  # goes with its claim
        first, wide = np["spec"]["egress"]
        assert first == {"to": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.7/32"]}}],
                         "ports": [{"protocol": "TCP", "port": 443}]}
        # A rule wider than the special blocks does not open them (private, loopback, metadata...): as on one host.
        excepted = set(wide["to"][0]["ipBlock"]["except"])
        assert {"10.0.0.0/8", "169.254.0.0/16", "127.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= excepted
        assert "169.254.169.254/32" not in excepted  # inside 169.254.0.0/16 already
        assert wide["ports"] == [{"protocol": "TCP", "port": 80}]
        assert (await sb.run_code("1 + 1")).results[0].text == "2"
    await _gone(cluster, name)
    assert cluster.api.get(NETWORK_POLICIES, cluster.namespace, name) is None

    async with sandlot.AsyncSandbox(isolation="kubernetes", api_url="", network="public") as sb:
        np = cluster.api.get(NETWORK_POLICIES, cluster.namespace, kube.claim_name(sb.sandbox_id))
        v4, v6 = np["spec"]["egress"][0]["to"]
        assert v4["ipBlock"]["cidr"] == "0.0.0.0/0" and "10.0.0.0/8" in v4["ipBlock"]["except"]
        assert v6["ipBlock"]["cidr"] == "::/0" and "fc00::/7" in v6["ipBlock"]["except"]
        assert np["spec"]["egress"][1]["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    with pytest.raises(sandlot.InvalidRequest, match="knows addresses, not names"):
        await sandlot.AsyncSandbox.create(isolation="kubernetes", api_url="", network={"allow": ["pypi.org"]})
    with pytest.raises(sandlot.InvalidRequest, match="secrets= need"):
        await sandlot.AsyncSandbox.create(isolation="kubernetes", api_url="", secrets={"K": {"value": "v",
                                                                                         "hosts": ["api.example"]}})
    assert cluster.claims() == [c for c in cluster.claims() if "deletionTimestamp" in c["metadata"]]  # none made


async def test_taking_back_a_sandbox_whose_address_is_now_a_fresh_pods_never_binds_that_pod(on_cluster):
    """A pod that died leaves its claim without an address; its recorded one may be a new warm pod's by then. A
    server taking the sandbox back must not bind that pod with the dead sandbox's key: it is some tenant's next
    sandbox (whose server's hello would be refused), and its agent would take the lease for its boot plan."""
    cluster = on_cluster
    backend = kube.KubernetesBackend()
    engine = Engine()
    engine.durable = True
    sandbox = await engine.create(SandboxSpec.build("python", isolation="kubernetes", limits={"lifetime": 600}))
    try:
        record = sandbox.backend_sandbox.describe()
        await cluster.kill_pod(kube.claim_name(sandbox.sandbox_id))
        await cluster.apply({"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim",
                             "metadata": {"name": "someone-elses"}, "spec": {"warmPoolRef": {"name": "sandlot-python"}}})
        fresh = (await cluster.wait_ready("someone-elses"))["status"]["sandbox"]["podIPs"][0]
        with pytest.raises(SandboxNotFound):
            await backend.adopt(dict(record, address=fresh))
        sock, welcome = await kube.connect_pod(fresh, 8888, "n" * 43, bind=True)  # its own server's hello, later
        sock.close()
        assert welcome["bound"] == "now"
    finally:
        await sandbox.kill()
        await engine.shutdown()
        await backend.finish_cleanups()
        api = await cluster.api_client()
        from kubernetes_asyncio import client as kclient

        await kclient.CustomObjectsApi(api).delete_namespaced_custom_object(
            kube.GROUP, kube.VERSION, cluster.namespace, kube.CLAIMS, "someone-elses")


async def test_a_sandbox_that_cannot_be_taken_back_is_ended_at_the_cluster_not_left_running(on_cluster):
    """A take-back that fails (the pod refuses the key, is out of reach, or the sandbox's own code crowds its
    holder's port) makes the server record the sandbox as lost: then nobody holds it, counts it in a quota or ends
    it at its idle timeout. Its claim must go too, or its pod runs the tenant's code on until its lifetime."""
    cluster = on_cluster
    backend = kube.KubernetesBackend()
    engine = Engine()
    engine.durable = True
    sandbox = await engine.create(SandboxSpec.build("python", isolation="kubernetes", limits={"lifetime": 600}))
    name = kube.claim_name(sandbox.sandbox_id)
    try:
        record = sandbox.backend_sandbox.describe()
        await sandbox.backend_sandbox.channel.aclose()  # its server is gone; the pod waits on its lease
        with pytest.raises(SandboxNotFound):
            await backend.adopt(dict(record, key="z" * 43))
        await _gone(cluster, name)
    finally:
        await sandbox.kill()
        await engine.shutdown()
        await backend.finish_cleanups()


async def test_a_create_cancelled_while_its_claim_is_being_made_leaves_no_claim(on_cluster):
    """A caller that goes away (a client disconnecting, a timeout) while the API server makes the claim: the claim
    is made, its answer not read yet. Left behind, it would hold a pod until its shutdownTime (the lifetime)."""
    cluster = on_cluster
    real_create = kube._Cluster.create_claim

    async def slow_answer(self, body):
        made = await real_create(self, body)
        await asyncio.sleep(30)  # the API server's answer, on its way
        return made

    before = {c["metadata"]["name"] for c in cluster.claims()}
    kube._Cluster.create_claim = slow_answer
    try:
        task = asyncio.get_running_loop().create_task(sandlot.AsyncSandbox.create(isolation="kubernetes", api_url=""))
        deadline = time.monotonic() + 15
        while not {c["metadata"]["name"] for c in cluster.claims()} - before:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        kube._Cluster.create_claim = real_create
    for name in {c["metadata"]["name"] for c in cluster.claims()} - before:
        await _gone(cluster, name)


async def test_two_replicas_hold_a_tenant_to_one_quota(on_cluster, tmp_path):
    """Replicas share the database; each holds the sandboxes it was last asked about. A tenant at its quota on one
    replica whose sandboxes were taken over by another (its calls land on either) is still at its quota: otherwise
    it creates a quota's worth on one, has the other take them, and creates again, without end."""
    from sandlot import QuotaExceeded
    from sandlot.server.metrics import Metrics
    from sandlot.server.registry import Registry
    from sandlot.server.settings import Quotas, Settings
    from sandlot.server.store import Store

    store = Store(tmp_path / "shared.db")
    settings = Settings(db_path=tmp_path / "shared.db", isolations=("kubernetes",), quotas=Quotas(max_live=1))
    replicas = []
    for _ in range(2):
        engine = Engine(durable=True)
        replicas.append(Registry(store, settings, Metrics(lambda: 0, dict), engine))
    a, b = replicas
    tenant = store.create_tenant("alice")
    made = []
    try:
        live = await a.create(tenant, isolation="kubernetes")
        made.append(live.id)
        await b.find(tenant, live.id)  # the tenant's next call landed on the other replica
        deadline = time.monotonic() + 10
        while live.id in a.live:  # told "moved", the first forgets it
            a.collect()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        with pytest.raises(QuotaExceeded):
            made.append((await a.create(tenant, isolation="kubernetes")).id)
    finally:
        for sandbox_id in made:
            await b.kill(tenant, sandbox_id)
        for registry in replicas:
            await registry.close()
        store.close()


async def test_an_api_server_that_never_answers_fails_the_create_in_its_time(tmp_path, monkeypatch):
    """A connection to the API server that went dead without a word (a load balancer that dropped it): the client
    has no timeout of its own, so a create (and a kill's delete, a lease's patch) would wait for ever, holding its
    tenant's quota. It fails as a timeout instead."""
    import yaml

    async def never_answer(reader, writer):
        await reader.read()  # reads, answers nothing
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "dead", "user": {"token": "t"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "dead", "namespace": "default"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("SANDLOT_KUBE_CLAIM_TIMEOUT", "2")
    monkeypatch.setattr(kube, "API_TIMEOUT", 2.0, raising=False)
    backend = kube.KubernetesBackend()
    from sandlot._templates import get_template
    from sandlot._limits import Limits

    started = time.monotonic()
    try:
        with pytest.raises(sandlot.TimeoutError):
            await asyncio.wait_for(backend.start(get_template("python"), Limits(), {}), 30)
        assert time.monotonic() - started < 15
    finally:
        await backend.finish_cleanups()
        server.close()


async def test_an_owner_let_go_without_hearing_moved_does_not_end_the_sandbox_its_successor_holds(on_cluster):
    """The holder tells the owner it lets go ("moved") with 2 s to take it: one not reading then (its loop busy, a
    slow download filling its buffers) or cut off from the pod network gets the close alone, which is what a pod
    that died looks like. Its kill (its registry's, its idle watchdog's) must not delete the claim: the sandbox is
    another replica's now, in use."""
    cluster = on_cluster
    first, second = Engine(durable=True), Engine(durable=True)
    sandbox = await first.create(SandboxSpec.build("python", isolation="kubernetes", limits={"lifetime": 600}))
    taken = None
    try:
        await sandbox.run_code("x = 7")
        sandbox.backend_sandbox.channel.honours_moved = False  # as if the "moved" never reached it
        taken = await second.adopt(sandbox.backend_sandbox.describe(), sandbox.spec, time.time() + 600)
        deadline = time.monotonic() + 10
        while sandbox.backend_sandbox.channel.is_open:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await sandbox.kill()  # what the first replica does with a sandbox whose channel closed
        await first.backend("kubernetes").finish_cleanups()
        assert (await taken.run_code("x * 6")).results[0].text == "42"
        assert cluster.claim(kube.claim_name(sandbox.sandbox_id)) is not None
    finally:
        if taken is not None:
            await taken.kill()
        await first.shutdown()
        await second.shutdown()


async def test_waiting_for_a_pod_does_not_spin_on_watches_that_end_at_once(tmp_path, monkeypatch):
    """An API server (or a proxy before it) that ends each watch at once, or answers each with 410 Gone: the wait
    reads the claim and watches again, paced, not as fast as the loop can go (many creates at once would flood
    the API server for their whole claim timeout)."""
    import yaml
    from aiohttp import web

    calls = {"get": 0, "watch": 0}
    path = "/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/default/sandboxclaims"

    async def get_claim(request):
        calls["get"] += 1
        return web.json_response({"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim",
                                  "metadata": {"name": "sandlot-sb-000000000001", "resourceVersion": "7"}})

    async def watch(request):
        calls["watch"] += 1
        return web.Response(text="", content_type="application/json")  # the stream ends at once

    app = web.Application()
    app.router.add_get(path + "/{name}", get_claim)
    app.router.add_get(path, watch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "c", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "c", "namespace": "default"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    backend = kube.KubernetesBackend()
    try:
        cluster = await backend.cluster()
        with pytest.raises(sandlot.TimeoutError):
            await cluster.wait_ready("sandlot-sb-000000000001", 3)
        assert calls["watch"] <= 15, calls
    finally:
        await backend.finish_cleanups()
        await runner.cleanup()


async def test_a_servers_sweep_leaves_alone_the_sandboxes_of_a_program_using_the_sdk_directly(on_cluster):
    """`Sandbox(isolation="kubernetes")` works from any process with a kubeconfig: such a program's sandboxes have
    no row in any server's database. A server starting in the same namespace (a new replica, a rolling update)
    must not take them for what a crashed server left, however long they have run."""
    cluster = on_cluster
    async with sandlot.AsyncSandbox(isolation="kubernetes", api_url="") as sb:
        name = kube.claim_name(sb.sandbox_id)
        from .kube_api import SANDBOX_CLAIMS

        cluster.api._store[(SANDBOX_CLAIMS, cluster.namespace, name)]["metadata"]["creationTimestamp"] = \
            "2026-01-01T00:00:00Z"  # it has run for hours
        backend = kube.KubernetesBackend()  # a server's, starting
        try:
            await backend.sweep_orphans(set())
        finally:
            await backend.finish_cleanups()
        assert cluster.claim(name) is not None
        assert (await sb.run_code("1 + 1")).results[0].text == "2"
    engine = Engine(durable=True)  # a server's: its claims are the sweep's to judge
    sandbox = await engine.create(SandboxSpec.build("python", isolation="kubernetes"))
    try:
        assert _ours(cluster, sandbox.sandbox_id)["metadata"]["labels"]["sandlot.dev/durable"] == "true"
    finally:
        await sandbox.kill()
        await engine.shutdown()


async def test_a_pod_that_died_before_its_claim_says_so_still_has_its_claim_deleted(on_cluster, monkeypatch):
    """The claim's Ready lags its pod's death by seconds: an owner whose channel the dying holder closed finds the
    claim still Ready, and must still delete it (the holder is gone: nobody took the sandbox over)."""
    cluster = on_cluster
    engine = Engine(durable=True)
    sandbox = await engine.create(SandboxSpec.build("python", isolation="kubernetes", limits={"lifetime": 600}))
    name = kube.claim_name(sandbox.sandbox_id)
    try:
        monkeypatch.setattr(cluster, "_fail", lambda pod, message: asyncio.sleep(0))  # the controller, behind
        await cluster.pods[(cluster.namespace, name)].sandbox.kill()  # the pod dies; its claim still says Ready
        deadline = time.monotonic() + 10
        while sandbox.backend_sandbox.channel.is_open:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert cluster.claim(name)["status"]["conditions"][0]["status"] == "True"
        await sandbox.kill()
        await engine.backend("kubernetes").finish_cleanups()
        await _gone(cluster, name)
    finally:
        await engine.shutdown()


# -- get_url: a server the sandbox's code started in its pod ---------------------------------------------------
# Bound to every address: the server reaches the pod at its address (one bound to 127.0.0.1 is the pod's own).
BIG = 8 * 1024 * 1024  # a body several times the carriers' 64 KiB chunks: it streams
SERVE = ("mkdir -p /tmp/site && cd /tmp/site && echo hi-from-the-pod > index.html && "
         "python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(256)) * (%d // 256))' > big.bin && "
         "exec python3 -m http.server 8000 --bind 0.0.0.0" % BIG)


async def _fetch(url: str, headers: "dict | None" = None, within: float = 20.0) -> bytes:
    """From a thread: the emulated cluster answers from this event loop."""
    return await asyncio.to_thread(http_body_once_up, url, headers, within)


async def _status(url: str, headers: "dict | None" = None) -> int:
    import urllib.error
    import urllib.request

    def get() -> int:
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30).status
        except urllib.error.HTTPError as exc:
            return exc.code
    return await asyncio.to_thread(get)


def _big() -> bytes:
    return bytes(range(256)) * (BIG // 256)


async def test_get_url_reaches_a_server_the_code_started_in_its_pod(on_cluster):
    async with sandlot.AsyncSandbox(isolation="kubernetes", api_url="") as sb:
        await sb.commands.run(SERVE, background=True)
        url = await sb.get_url(8000)
        assert url.startswith("http://127.0.0.1:") and await sb.get_url(8000) == url
        assert await _fetch(url + "index.html") == b"hi-from-the-pod\n"
        assert await _fetch(url + "index.html", within=0) == b"hi-from-the-pod\n"  # a second connection
        assert await _fetch(url + "big.bin", within=0) == _big()
        # Nothing listens on 8002 in the pod: its address refuses the connection, the URL answers 502.
        assert await _status(await sb.get_url(8002)) == 502
        # A server bound to the pod's loopback is the pod's own: not reached from outside either.
        await sb.commands.run("exec python3 -m http.server 8001 --bind 127.0.0.1", background=True)
        r = await sb.run_code("import socket, time\nfor _ in range(100):\n    try:\n"
                              "        socket.create_connection(('127.0.0.1', 8001), 1).close(); break\n"
                              "    except OSError:\n        time.sleep(0.1)\n'up'")
        assert r.results[0].text == "'up'"
        assert await _status(await sb.get_url(8001)) == 502
        # The pod's holder's port is Sandlot's, not a server of the code.
        assert await _status(await sb.get_url(8888)) == 502
        with pytest.raises(sandlot.InvalidRequest, match="port must be"):
            await sb.get_url(70000)
    with pytest.raises(OSError):  # the listener ends with the sandbox
        await _fetch(url, within=0)


async def test_get_url_through_a_server_of_the_tier_needs_the_tenants_key(cluster, tmp_path):
    from .serverproc import ServerProcess

    server = ServerProcess(tmp_path / "sandlot.db", "--isolations", "kubernetes", env=_server_env(cluster))
    await asyncio.to_thread(server.start)  # in a thread: the emulated cluster answers from this event loop
    try:
        key = server.key("alice")
        auth = {"Authorization": "Bearer " + key}
        async with sandlot.AsyncSandbox(api_url=server.url, api_key=key) as sb:
            assert sb.isolation == "kubernetes"
            await sb.commands.run(SERVE, background=True)
            url = await sb.get_url(8000)
            assert url.startswith(server.url) and f"/sandboxes/{sb.sandbox_id}/ports/8000/" in url
            assert await _fetch(url + "index.html", auth) == b"hi-from-the-pod\n"
            assert await _fetch(url + "big.bin", auth, within=0) == _big()  # streamed through the server
            assert await _status(url + "index.html") == 401  # the server's own key check, as on the other tiers
            assert await _status(url.replace("/ports/8000/", "/ports/8002/"), auth) == 502  # nothing listens there
    finally:
        await asyncio.to_thread(server.stop)


async def test_an_async_program_using_the_tier_ends_without_leaving_its_api_client_open(cluster):
    """`asyncio.run(main())` with sandboxes on the tier: its Kubernetes API client (an HTTP session) is closed
    when the event loop ends, not left for the interpreter to warn about ("Unclosed client session")."""
    import subprocess
    import sys

    program = ("import asyncio, sandlot\n"
               "async def main():\n"
               "    async with await sandlot.AsyncSandbox.create(isolation='kubernetes', api_url='') as sb:\n"
               "        print((await sb.run_code('6 * 7')).text, flush=True)\n"
               "asyncio.run(main())\n")
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", program], env=_server_env(cluster),
                                   capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "42\n", done.stderr
    assert "Unclosed" not in done.stderr, done.stderr
