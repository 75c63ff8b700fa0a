"""create_session(mounts=...) through the official MCP client: `sandlot mcp` over stdio grants host directories
only inside its --host-dir-root (none: none at all) and this machine's volumes; /mcp on `sandlot serve` grants
the tenant's volumes and host directories only inside the operator's roots."""

from __future__ import annotations

import os
import subprocess

import pytest

import sandlot

from .cli_server import COMMAND, CliServer, clean_env
from .conftest import PROBLEM, needs_sandbox
from .serverproc import wait_healthy

pytestmark = needs_sandbox
mcp = pytest.importorskip("mcp")
from mcp import StdioServerParameters  # noqa: E402

from .test_mcp import Client, http_session, texts  # noqa: E402

OWNER = 1234


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if PROBLEM:
        pytest.skip(PROBLEM)
    base = tmp_path_factory.mktemp("mcp-mounts")
    shared, outside, data = base / "shared", base / "outside", base / "data"
    for d in (shared, outside, data):
        d.mkdir()
    project = shared / "proj"
    project.mkdir()
    os.chown(project, OWNER, OWNER)
    (shared / "escape").symlink_to(outside)
    return {"base": base, "shared": shared, "outside": outside, "project": project, "data": data}


def stdio(site, *args: str) -> Client:
    env = clean_env(SANDLOT_DATA_DIR=str(site["data"]), SANDLOT_POOL_MIN="0")
    return Client(StdioServerParameters(command=COMMAND[0], args=COMMAND[1:] + ["mcp", *args], env=env))


def create(client, mounts: dict):
    return client.call("create_session", {"mounts": mounts})


def test_stdio_grants_host_dirs_inside_its_roots_and_local_volumes(site, monkeypatch):
    monkeypatch.setenv("SANDLOT_DATA_DIR", str(site["data"]))
    sandlot.Volumes(api_url="").create("mcp-cache", size="16M")
    client = stdio(site, "--host-dir-root", str(site["shared"]))
    try:
        made = create(client, {"/project": f"{site['project']}:rw", "/cache": "vol:mcp-cache"})
        assert not made.is_error, texts(made)
        sid = made.structured_content["session_id"]
        result = client.call("run_command", {"session_id": sid,
                                             "command": "echo agent > /project/out.txt && echo kept > /cache/f"})
        assert not result.is_error, texts(result)
        wrote = client.call("write_file", {"session_id": sid, "path": "/project/via-tool.txt", "content": "tool"})
        assert not wrote.is_error, texts(wrote)
        client.call("close_session", {"session_id": sid})
        for name, content in (("out.txt", "agent\n"), ("via-tool.txt", "tool")):
            path = site["project"] / name
            assert path.read_text() == content
            assert (path.stat().st_uid, path.stat().st_gid) == (OWNER, OWNER)
        # The volume outlived the session.
        again = create(client, {"/cache": "vol:mcp-cache:ro"})
        sid = again.structured_content["session_id"]
        assert texts(client.call("read_file", {"session_id": sid, "path": "/cache/f"})) == "kept\n"
        client.call("close_session", {"session_id": sid})
        # Outside the roots (directly, or through a symlink inside them), or sensitive: a clear tool error.
        for path, says in ((site["outside"], "outside the directories the operator allows"),
                           (site["shared"] / "escape", "outside the directories the operator allows"),
                           ("/etc", "sensitive location")):
            refused = create(client, {"/data": str(path)})
            assert refused.is_error and says in texts(refused), texts(refused)
        bad = create(client, {"data": "vol:mcp-cache"})
        assert bad.is_error and "absolute" in texts(bad)
    finally:
        client.close()
        sandlot.Volumes(api_url="").delete("mcp-cache")


def test_stdio_without_a_root_grants_no_host_dir_but_volumes(site, monkeypatch):
    monkeypatch.setenv("SANDLOT_DATA_DIR", str(site["data"]))
    sandlot.Volumes(api_url="").create("mcp-only", size="16M")
    client = stdio(site)
    try:
        refused = create(client, {"/project": f"{site['project']}:rw"})
        assert refused.is_error and "grants no host directories" in texts(refused)
        assert "--host-dir-root" in texts(refused)
        made = create(client, {"/cache": "vol:mcp-only"})
        assert not made.is_error, texts(made)
        client.call("close_session", {"session_id": made.structured_content["session_id"]})
    finally:
        client.close()
        sandlot.Volumes(api_url="").delete("mcp-only")


def test_hosted_mcp_follows_the_operators_roots_and_the_tenants_volumes(site, tmp_path):
    srv = CliServer(tmp_path)
    env = clean_env(SANDLOT_DATA_DIR=str(site["data"]), SANDLOT_POOL_MIN="0")
    with open(srv.log_path, "ab") as log:
        srv.proc = subprocess.Popen(COMMAND + ["serve", "--port", str(srv.port), "--db", str(srv.db), "--log-level",
                                               "warning", "--host-dir-root", str(site["shared"])],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(srv.proc, srv.url, srv.log, "sandlot serve", 60)
        key = srv.key("mcp-tenant")
        sandlot.Volumes(api_url=srv.url, api_key=key).create("tenant-vol", size="16M")

        async def scenario(s):
            made = await s.call_tool("create_session", {"mounts": {"/cache": "vol:tenant-vol",
                                                                    "/docs": str(site["project"])}})
            assert not made.is_error, texts(made)
            sid = made.structured_content["session_id"]
            ran = await s.call_tool("run_command", {"session_id": sid,
                                                    "command": "echo hosted > /cache/x && ls -d /docs"})
            await s.call_tool("close_session", {"session_id": sid})
            outside = await s.call_tool("create_session", {"mounts": {"/data": str(site["outside"])}})
            return ran, outside

        ran, outside = http_session(srv.url + "/mcp", key, scenario)
        assert not ran.is_error, texts(ran)
        assert outside.is_error and "outside the directories the operator allows" in texts(outside)
        with sandlot.Sandbox(mounts={"/cache": "vol:tenant-vol"}, api_url=srv.url, api_key=key) as sb:
            assert sb.files.read("/cache/x") == "hosted\n"
        sandlot.Volumes(api_url=srv.url, api_key=key).delete("tenant-vol")
    finally:
        srv.stop()
