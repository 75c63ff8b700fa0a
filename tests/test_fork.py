"""Fork of a live session: ``sb.fork()`` is a new sandbox with a copy of the session (variables, files, cwd),
independent from then on, its random state reseeded. gVisor tier (checkpoint and restore); the process tier
says it cannot. Through the SDK here; through a real server, the remote SDK, the CLI and MCP below."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from sandlot import InvalidRequest, Sandbox

from .conftest import RUNSC_MISSING, needs_sandbox

needs_runsc = pytest.mark.skipif(RUNSC_MISSING is not None, reason=str(RUNSC_MISSING))
pytestmark = [needs_sandbox]

SETUP = ("import os, random\n"
         "os.makedirs('/home/user/work', exist_ok=True)\n"
         "open('/home/user/work/notes.txt', 'w').write('from the parent')\n"
         "open('/tmp/scratch.bin', 'wb').write(bytes(range(256)) * 1000)\n"
         "os.chdir('/home/user/work')\n"
         "answer = 41\n"
         "random.seed(12345)")
LOOK = ("(answer, os.getcwd(), open('/home/user/work/notes.txt').read(), len(open('/tmp/scratch.bin', 'rb').read()))")


def leftovers(sandbox_id: str) -> list[str]:
    """What of a gVisor sandbox is still on the host: its home (tmpfs, bundle, images), cgroups, runsc state."""
    from sandlot._backends.gvisor import data_dir

    found = []
    if (data_dir() / "sandboxes" / sandbox_id).exists():
        found.append(str(data_dir() / "sandboxes" / sandbox_id))
    with open("/proc/self/mounts") as f:
        found += [line.split()[1] for line in f if sandbox_id in line.split()[1]]
    # (find, not glob: other tests' cgroups come and go while it walks)
    found += subprocess.run(["find", "/sys/fs/cgroup", "-maxdepth", "8", "-type", "d", "-name", sandbox_id],
                            capture_output=True, text=True).stdout.split()
    if (data_dir() / "runsc" / sandbox_id).exists() or list((data_dir() / "runsc").glob(f"*{sandbox_id}*")):
        found.append(f"runsc state of {sandbox_id}")
    return found


def gone(sandbox_id: str, within: float = 30.0) -> list[str]:
    """leftovers() once the background cleanup of a killed sandbox had its time."""
    deadline = time.monotonic() + within
    while (left := leftovers(sandbox_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_the_process_tier_says_which_tier_can_fork():
    with Sandbox(isolation="process") as sb:
        sb.run_code("x = 1")
        with pytest.raises(InvalidRequest, match=r"the process tier cannot fork a live session: use isolation='gvisor'"):
            sb.fork()
        assert sb.run_code("x").text == "1"  # refused without harm


@needs_runsc
def test_a_fork_copies_the_live_session_and_then_goes_its_own_way():
    with Sandbox(isolation="gvisor") as parent:
        assert parent.run_code(SETUP).error is None
        # Refused while a background command streams (its stream would be cut), fine once it is done.
        job = parent.commands.run("sleep 60", background=True)
        with pytest.raises(InvalidRequest, match="background commands running"):
            parent.fork()
        job.kill()
        job.wait()
        child = parent.fork()
        try:
            assert child.sandbox_id != parent.sandbox_id and child.isolation == "gvisor"
            assert child.limits == parent.limits
            expected = "(41, '/home/user/work', 'from the parent', 256000)"
            assert child.run_code(LOOK).text == expected
            assert parent.run_code(LOOK).text == expected
            # Random state: the parent's stream goes on from its seed; the child's was reseeded.
            draws = [sb.run_code("[random.random() for _ in range(3)]").text for sb in (parent, child)]
            assert draws[0] != draws[1]
            assert parent.run_code("random.seed(12345); random.random()").text == draws[0].strip("[").split(",")[0]
            # Independent from now on: variables, files, cwd.
            child.run_code("answer = 'child'\nos.chdir('/tmp')\nopen('/home/user/work/notes.txt', 'w').write('child')")
            parent.run_code("answer += 1\nopen('/tmp/only-parent', 'w').write('p')")
            assert parent.run_code(LOOK).text == "(42, '/home/user/work', 'from the parent', 256000)"
            assert child.run_code(LOOK).text == "('child', '/tmp', 'child', 256000)"
            assert not child.files.exists("/tmp/only-parent") and parent.files.exists("/tmp/only-parent")
            assert child.commands.run("cat work/notes.txt").stdout == "child"
        finally:
            child_id = child.sandbox_id
            child.kill()
        # Killing the fork leaves the parent whole, and nothing of the fork on the host.
        assert parent.run_code("answer").text == "42"
        assert gone(child_id) == []
        from sandlot._backends.gvisor import data_dir
        assert not list((data_dir() / "sandboxes" / parent.sandbox_id).glob("*image*"))  # no image left behind


@needs_runsc
def test_numpys_global_generator_is_reseeded_in_the_fork():
    with Sandbox(isolation="gvisor") as parent:
        assert parent.run_code("import numpy\nnumpy.random.seed(7)").error is None
        child = parent.fork()
        try:
            draws = [sb.run_code("numpy.random.random(3).tolist()").text for sb in (parent, child)]
            assert draws[0] == parent.run_code("numpy.random.seed(7); numpy.random.random(3).tolist()").text
            assert draws[0] != draws[1]
        finally:
            child.kill()


@needs_runsc
def test_a_paused_sandbox_forks_from_its_checkpoint_and_stays_paused():
    with Sandbox(isolation="gvisor") as parent:
        parent.run_code("kept = [1, 2, 3]\nopen('/home/user/f', 'w').write('on disk')")
        parent.pause()
        child = parent.fork()
        try:
            assert parent.is_paused and not child.is_paused
            assert child.run_code("(kept, open('/home/user/f').read())").text == "([1, 2, 3], 'on disk')"
            parent.resume()
            assert parent.run_code("kept.append(4); kept").text == "[1, 2, 3, 4]"
            assert child.run_code("kept").text == "[1, 2, 3]"
        finally:
            child_id = child.sandbox_id
            child.kill()
        assert gone(child_id) == []


@needs_runsc
def test_a_sandbox_with_a_network_or_mounts_says_why_it_cannot_fork(tmp_path):
    with Sandbox(isolation="gvisor", network={"allow": []}) as networked:
        with pytest.raises(InvalidRequest, match="a sandbox with a network cannot be forked"):
            networked.fork()
        assert networked.run_code("2 + 2").text == "4"
    with Sandbox(isolation="gvisor", mounts={"/data": str(tmp_path)}) as mounted:
        with pytest.raises(InvalidRequest, match="a sandbox with mounts cannot be forked"):
            mounted.fork()
        assert mounted.run_code("3 + 3").text == "6"


# -- through a real server: the remote SDK, the REST route, the CLI; and MCP -----------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from .serverproc import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("fork-server") / "sandlot.db", "--isolations", "process,gvisor",
                        env=dict(os.environ, SANDLOT_POOL_MIN="0")).start()
    yield srv
    srv.stop()


@needs_runsc
def test_fork_through_the_server_the_remote_sdk_and_the_cli(server):
    import httpx

    from sandlot.server.store import Store

    from .cli_server import COMMAND, clean_env

    key = server.key("forker", max_live=3)
    creds = {"api_url": server.url, "api_key": key}
    with Sandbox(isolation="gvisor", metadata={"job": "fork-test"}, **creds) as parent:
        assert parent.run_code(SETUP).error is None
        child = parent.fork()  # the remote SDK: POST /v1/sandboxes/{id}/fork
        try:
            assert child.sandbox_id != parent.sandbox_id and child.metadata == {"job": "fork-test"}
            assert child.run_code(LOOK).text == "(41, '/home/user/work', 'from the parent', 256000)"
            child.run_code("answer = 'child'")
            assert parent.run_code("answer").text == "41"
            draws = [sb.run_code("random.random()").text for sb in (parent, child)]
            assert draws[0] != draws[1]
            # The CLI: prints the new id (and --json says whose copy it is).
            env = clean_env(SANDLOT_API_URL=server.url, SANDLOT_API_KEY=key)
            r = subprocess.run(COMMAND + ["fork", parent.sandbox_id, "--json"], capture_output=True, text=True,
                               env=env, timeout=300)
            assert r.returncode == 0, r.stderr
            third = json.loads(r.stdout)
            assert third["parent"] == parent.sandbox_id and third["isolation"] == "gvisor"
            via_cli = Sandbox.connect(third["sandbox_id"], **creds)
            assert via_cli.run_code("answer").text == "41"
            # A fourth live sandbox is over this tenant's quota (3): 429, as for a create.
            r = httpx.post(f"{server.url}/v1/sandboxes/{parent.sandbox_id}/fork",
                           headers={"Authorization": f"Bearer {key}"}, timeout=300)
            assert r.status_code == 429, r.text
            via_cli.kill()
            # Each fork has its row (listed with the parent's metadata) and an audit row naming the parent.
            listed = {i.sandbox_id for i in Sandbox.list({"job": "fork-test"}, **creds)}
            assert listed == {parent.sandbox_id, child.sandbox_id}
            store = Store(server.db_path)
            for sandbox_id in (child.sandbox_id, third["sandbox_id"]):
                [entry] = [e for e in store.audit_log("forker", sandbox_id=sandbox_id) if e.action == "fork"]
                assert json.loads(entry.detail)["parent"] == parent.sandbox_id
        finally:
            child.kill()
    # The process tier says which tier can, through the server too.
    with Sandbox(isolation="process", **creds) as plain:
        r = httpx.post(f"{server.url}/v1/sandboxes/{plain.sandbox_id}/fork",
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 400 and "cannot fork a live session: use isolation='gvisor'" in r.text, r.text
        r = subprocess.run(COMMAND + ["fork", plain.sandbox_id], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2 and "use isolation='gvisor'" in r.stderr and r.stdout == "", (r.returncode, r.stderr)
    for sandbox_id in (child.sandbox_id, third["sandbox_id"]):
        assert gone(sandbox_id) == []


@needs_runsc
def test_fork_session_over_mcp():
    from .test_mcp import Client, server_params, texts

    client = Client(server_params(SANDLOT_ISOLATION="gvisor", SANDLOT_POOL_MIN="0"))
    try:
        sid = client.call("create_session").structured_content["session_id"]
        assert not client.call("run_code", {"code": "plan = ['a']", "session_id": sid}).is_error
        forked = client.call("fork_session", {"session_id": sid}, timeout=300)
        assert not forked.is_error, texts(forked)
        fid = forked.structured_content["session_id"]
        assert fid != sid
        client.call("run_code", {"code": "plan.append('b')", "session_id": fid})
        assert texts(client.call("run_code", {"code": "plan", "session_id": fid})).endswith("['a', 'b']")
        assert texts(client.call("run_code", {"code": "plan", "session_id": sid})).endswith("['a']")
        listed = {s["session_id"] for s in client.call("list_sessions").structured_content["result"]}
        assert listed == {sid, fid}
        missing = client.call("fork_session", {"session_id": "sb-nope"})
        assert missing.is_error and "no session" in texts(missing)
        for session_id in (sid, fid):
            client.call("close_session", {"session_id": session_id})
    finally:
        client.close()
    assert gone(fid) == []


def test_fork_session_on_the_servers_mcp_endpoint_goes_through_its_registry(tmp_path):
    """/mcp on `sandlot serve`: its sessions are the registry's process-tier sandboxes, so a fork is refused
    with the tier's reason (by the registry, as over REST), and nothing new appears in the tenant's list."""
    from .cli_server import CliServer
    from .test_mcp import http_session, texts

    srv = CliServer(tmp_path).start()
    try:
        key = srv.key("agent")

        async def scenario(s):
            sid = (await s.call_tool("create_session", {})).structured_content["session_id"]
            return sid, await s.call_tool("fork_session", {"session_id": sid})

        sid, forked = http_session(srv.url + "/mcp", key, scenario)
        assert forked.is_error and "the process tier cannot fork a live session: use isolation='gvisor'" in texts(forked)
        assert [i.sandbox_id for i in Sandbox.list(api_url=srv.url, api_key=key)] == [sid]
    finally:
        srv.stop()
