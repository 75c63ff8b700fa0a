"""What an LLM driving Sandlot's MCP tools is told, and how a plain client reaches /mcp (issue #10).

The official `mcp` client over stdio (`sandlot mcp`, locally and pointed at a server with --api-url) and over
streamable HTTP on a real `sandlot serve`; a raw HTTP POST that does not follow redirects."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import sandlot
from sandlot import Sandbox

from .cli_server import CliServer
from .conftest import PROBLEM, needs_sandbox

pytestmark = needs_sandbox

mcp = pytest.importorskip("mcp")
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

SCRIPT = Path(sys.executable).with_name("sandlot")
CHECKOUT = Path(__file__).resolve().parents[1]


def stdio(*args: str, scenario) -> Any:
    """Run ``scenario(session, initialize_result)`` against a fresh `sandlot mcp ARGS` over stdio."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDLOT_API")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    command, prefix = (str(SCRIPT), []) if SCRIPT.exists() else (sys.executable, ["-m", "sandlot.cli"])
    params = StdioServerParameters(command=command, args=prefix + ["mcp", *args], env=env)

    async def main():
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as s:
                init = await s.initialize()
                return await scenario(s, init)

    return asyncio.run(asyncio.wait_for(main(), 120))


def texts(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if PROBLEM:
        pytest.skip(PROBLEM)
    srv = CliServer(tmp_path_factory.mktemp("mcp-first-hour")).start()
    yield srv
    srv.stop()


def test_tools_describe_every_field_with_bounds_and_hints():
    async def scenario(s, init):
        return init, {t.name: t for t in (await s.list_tools()).tools}

    init, tools = stdio(scenario=scenario)
    assert init.server_info.name == "sandlot" and init.server_info.version == sandlot.__version__
    assert "list_sessions" in tools
    for tool in tools.values():
        for name, field in tool.input_schema.get("properties", {}).items():
            assert field.get("description"), f"{tool.name}.{name} has no description"
        assert tool.annotations is not None, tool.name

    def field(tool: str, name: str) -> dict:
        schema = tools[tool].input_schema["properties"][name]
        return next((s for s in schema.get("anyOf", []) if s.get("type") != "null"), schema)

    for tool in ("run_code", "run_command"):
        assert (field(tool, "timeout")["minimum"], field(tool, "timeout")["maximum"]) == (0.01, 14 * 86400)
    assert (field("create_session", "ttl_seconds")["minimum"], field("create_session", "ttl_seconds")["maximum"]) \
        == (1, 14 * 86400)
    assert (field("list_files", "depth")["minimum"], field("list_files", "depth")["maximum"]) == (1, 10)
    assert field("write_file", "encoding")["enum"] == ["utf-8", "base64"]
    for name in ("read_file", "list_files", "list_sessions"):
        assert tools[name].annotations.read_only_hint is True, name
    for name in ("close_session", "write_file", "run_command"):
        assert tools[name].annotations.read_only_hint is False and tools[name].annotations.destructive_hint is True
    # What run_code says is installed is what this interpreter (the builtin template's) has.
    description = tools["run_code"].description
    for package, module in (("pandas", "pandas"), ("matplotlib", "matplotlib"), ("scikit-learn", "sklearn")):
        assert (package in description) == (importlib.util.find_spec(module) is not None), package


def test_list_sessions_shows_the_open_ones():
    async def scenario(s, init):
        first = (await s.call_tool("create_session", {})).structured_content["session_id"]
        second = (await s.call_tool("create_session", {})).structured_content["session_id"]
        both = (await s.call_tool("list_sessions", {})).structured_content["result"]
        await s.call_tool("close_session", {"session_id": first})
        left = (await s.call_tool("list_sessions", {})).structured_content["result"]
        await s.call_tool("close_session", {"session_id": second})
        return first, second, both, left

    first, second, both, left = stdio(scenario=scenario)
    assert [x["session_id"] for x in both] == [first, second] and both[0]["idle_timeout_seconds"] == 1800
    assert [x["session_id"] for x in left] == [second]


def test_schema_bounds_are_enforced():
    async def scenario(s, init):
        return (await s.call_tool("run_code", {"code": "1", "timeout": -1}),
                await s.call_tool("write_file", {"session_id": "x", "path": "p", "content": "", "encoding": "latin-1"}))

    for result in stdio(scenario=scenario):
        assert result.is_error


def test_stdio_on_a_server_tags_its_sandboxes_and_claims_no_packages(server):
    key = server.key("stdio-agent")

    async def scenario(s, init):
        tools = {t.name: t for t in (await s.list_tools()).tools}
        sid = (await s.call_tool("create_session", {})).structured_content["session_id"]
        listed = Sandbox.list(api_url=server.url, api_key=key)
        await s.call_tool("close_session", {"session_id": sid})
        return tools["run_code"].description, sid, listed

    description, sid, listed = stdio("--api-url", server.url, "--api-key", key, scenario=scenario)
    assert [(i.sandbox_id, i.metadata) for i in listed] == [(sid, {"via": "mcp"})]
    # The server's template is not this machine's to inspect: the description says how to find out.
    assert "pip list" in description and "pandas installed" not in description


def test_mcp_answers_at_its_path_without_a_redirect(server):
    """POST /mcp itself (no 307 to /mcp/): a client that does not follow redirects on POST works."""
    key = server.key("no-redirects")
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                             "clientInfo": {"name": "raw", "version": "0"}}}
    r = httpx.post(server.url + "/mcp", json=initialize, follow_redirects=False, timeout=30,
                   headers={"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"})
    assert r.status_code == 200, (r.status_code, r.headers.get("location"))
    assert "mcp-session-id" in r.headers and "sandlot" in r.text
    session_id = r.headers["mcp-session-id"]
    httpx.delete(server.url + "/mcp", headers={"Authorization": f"Bearer {key}", "mcp-session-id": session_id})
    r = httpx.post(server.url + "/mcp", json=initialize, follow_redirects=False, timeout=30)
    assert r.status_code == 401  # the bare path is behind the API keys too

    httpx2 = pytest.importorskip("httpx2")  # the transport of the mcp SDK's HTTP client
    from mcp.client.streamable_http import streamable_http_client

    async def official():
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                      follow_redirects=False) as http:
            async with streamable_http_client(server.url + "/mcp", http_client=http) as (read, write, *_):
                async with ClientSession(read, write) as s:
                    init = await s.initialize()
                    result = await s.call_tool("run_code", {"code": "6 * 7"})
                    return init, result

    init, result = asyncio.run(official())
    assert init.server_info.version == sandlot.__version__
    assert texts(result) == "Out[1]: 42"
