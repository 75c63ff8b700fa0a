"""The MCP server through the official `mcp` client: `sandlot mcp` over stdio, and /mcp over streamable
HTTP on a real `sandlot serve`, with API keys and tenants.

One stdio server serves the module (its zygote boots once); a loop thread holds the client session
so tests stay plain functions.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sandlot import Sandbox

from .cli_server import CliServer, clean_env
from .conftest import PROBLEM, needs_sandbox, processes_in_sandbox

pytestmark = needs_sandbox

mcp = pytest.importorskip("mcp")
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

SCRIPT = Path(sys.executable).with_name("sandlot")
TOOLS = {"run_code", "create_session", "list_sessions", "fork_session", "close_session", "run_command", "write_file",
         "read_file", "list_files"}


def server_params(**env: str) -> StdioServerParameters:
    base = clean_env(**env)  # the checkout's sandlot, not whichever the venv's script would import
    if SCRIPT.exists():
        return StdioServerParameters(command=str(SCRIPT), args=["mcp"], env=base)
    return StdioServerParameters(command=sys.executable, args=["-m", "sandlot.cli", "mcp"], env=base)


class Client:
    """A ClientSession living in its own event loop thread; ``call`` is synchronous."""

    def __init__(self, params: StdioServerParameters) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.session: ClientSession | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(params),), daemon=True)
        self.thread.start()
        if not self.ready.wait(60) or self.session is None:
            raise RuntimeError(f"the MCP server did not start: {self.error!r}")

    async def _main(self, params: StdioServerParameters) -> None:
        self.stop = asyncio.Event()
        try:
            async with stdio_client(params) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    self.session = session
                    self.ready.set()
                    await self.stop.wait()
        except BaseException as exc:  # reported by the constructor
            self.error = exc
            self.ready.set()

    def run(self, coro_fn, timeout: float = 90) -> Any:
        return asyncio.run_coroutine_threadsafe(coro_fn(self.session), self.loop).result(timeout)

    def call(self, tool: str, arguments: dict | None = None, timeout: float = 90):
        return self.run(lambda s: s.call_tool(tool, arguments or {}), timeout)

    def close(self) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def client():
    if PROBLEM:
        pytest.skip(PROBLEM)
    c = Client(server_params())
    yield c
    c.close()


def texts(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def session(client) -> str:
    result = client.call("create_session")
    assert not result.is_error, texts(result)
    return result.structured_content["session_id"]


def test_lists_the_tools(client):
    tools = {t.name: t for t in client.run(lambda s: s.list_tools()).tools}
    assert set(tools) == TOOLS
    schema = tools["run_code"].input_schema
    assert schema["required"] == ["code"] and "session_id" in schema["properties"]
    assert "ctx" not in schema["properties"]
    assert all(t.description for t in tools.values())


def test_run_code_stateless(client):
    result = client.call("run_code", {"code": "print('hello'); 6 * 7"})
    assert not result.is_error
    assert [c.text for c in result.content] == ["hello\n", "Out[1]: 42"]
    client.call("run_code", {"code": "leftover = 1"})
    result = client.call("run_code", {"code": "leftover"})  # a fresh sandbox each time
    assert result.is_error and "NameError" in texts(result)


def test_session_keeps_variables_until_closed(client):
    sid = session(client)
    assert sid.startswith("sb-")
    assert not client.call("run_code", {"code": "import math\ncounter = 40", "session_id": sid}).is_error
    client.call("run_code", {"code": "counter += 2", "session_id": sid})
    result = client.call("run_code", {"code": "counter, math.pi > 3", "session_id": sid})
    assert texts(result) == "Out[3]: (42, True)"
    assert client.call("close_session", {"session_id": sid}).content[0].text == f"session {sid} closed"
    result = client.call("run_code", {"code": "counter", "session_id": sid})
    assert result.is_error and "no session" in texts(result)
    result = client.call("close_session", {"session_id": "sb-doesnotexist"})
    assert result.is_error and "no session" in texts(result)


def test_image_result(client):
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.title('squares')\nplt.show()"
    result = client.call("run_code", {"code": code})
    assert not result.is_error, texts(result)
    images = [c for c in result.content if c.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    png = base64.b64decode(images[0].data)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_error_is_a_tool_error_with_the_traceback(client):
    result = client.call("run_code", {"code": "print('before')\ndef f():\n    return 1 / 0\nf()"})
    assert result.is_error
    assert result.content[0].text == "before\n"  # output up to the error is kept
    trace = result.content[-1].text
    assert trace.startswith("Traceback") and "ZeroDivisionError: division by zero" in trace
    assert 'line 3, in f' in trace
    result = client.call("run_code", {"code": "import time; time.sleep(10)", "timeout": 0.5})
    assert result.is_error and "timeout" in texts(result)
    result = client.call("run_code", {"session_id": None})  # missing argument: rejected by the schema
    assert result.is_error and "code" in texts(result)


def test_files_round_trip(client):
    sid = session(client)
    try:
        info = client.call("write_file", {"session_id": sid, "path": "data/notes.txt", "content": "héllo\n"})
        assert not info.is_error, texts(info)
        assert info.structured_content["path"] == "/home/user/data/notes.txt"
        blob = bytes(range(256))
        result = client.call("write_file", {"session_id": sid, "path": "/home/user/data/blob.bin",
                                            "content": base64.b64encode(blob).decode(), "encoding": "base64"})
        assert result.structured_content["size"] == 256
        assert texts(client.call("read_file", {"session_id": sid, "path": "data/notes.txt"})) == "héllo\n"
        binary = texts(client.call("read_file", {"session_id": sid, "path": "data/blob.bin"}))
        assert base64.b64decode(binary.split("\n", 1)[1]) == blob
        # The session's code sees the same files, and what it writes can be read back as an image.
        code = ("import matplotlib.pyplot as plt\nprint(open('data/notes.txt').read().strip())\n"
                "plt.plot([1, 2]); plt.savefig('data/chart.png')")
        assert texts(client.call("run_code", {"code": code, "session_id": sid})).startswith("héllo")
        image = client.call("read_file", {"session_id": sid, "path": "data/chart.png"})
        assert image.content[0].type == "image" and image.content[0].mime_type == "image/png"
        listing = client.call("list_files", {"session_id": sid, "path": "data"})
        names = {e["name"]: e for e in listing.structured_content["result"]}
        assert set(names) == {"notes.txt", "blob.bin", "chart.png"}
        assert names["blob.bin"]["size"] == 256 and names["blob.bin"]["type"] == "file"
        missing = client.call("read_file", {"session_id": sid, "path": "data/nope.txt"})
        assert missing.is_error and "nope.txt" in texts(missing)
        bad = client.call("write_file", {"session_id": sid, "path": "x", "content": "%%%", "encoding": "base64"})
        assert bad.is_error and "base64" in texts(bad)
    finally:
        client.call("close_session", {"session_id": sid})


def test_run_command(client):
    sid = session(client)
    try:
        client.call("write_file", {"session_id": sid, "path": "in.txt", "content": "a\nb\nc\n"})
        result = client.call("run_command", {"command": "wc -l < in.txt; pwd", "session_id": sid})
        assert not result.is_error
        assert texts(result) == "exit code: 0\n[stdout]\n3\n/home/user\n"
        result = client.call("run_command", {"command": "echo nope >&2; exit 3", "session_id": sid})
        assert result.is_error and texts(result) == "exit code: 3\n[stderr]\nnope\n"
        result = client.call("run_command", {"command": "ls /home/user"})  # stateless: an empty home
        assert texts(result) == "exit code: 0"
    finally:
        client.call("close_session", {"session_id": sid})


def test_sessions_end_with_the_server():
    """Closing the client ends `sandlot mcp`, and every sandbox it kept goes with it."""
    c = Client(server_params(SANDLOT_POOL_MIN="0", SANDLOT_ZYGOTE="0"))
    try:
        sid = session(c)
        assert not c.call("run_code", {"code": "x = 1", "session_id": sid}).is_error
        assert processes_in_sandbox(sid)
    finally:
        c.close()
    deadline = time.monotonic() + 15
    while processes_in_sandbox(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_in_sandbox(sid)


# -- streamable HTTP: /mcp on `sandlot serve` -------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if PROBLEM:
        pytest.skip(PROBLEM)
    srv = CliServer(tmp_path_factory.mktemp("mcp-server")).start()
    yield srv
    srv.stop()


def http_session(url: str, api_key: str | None, scenario) -> Any:
    httpx2 = pytest.importorskip("httpx2")  # the transport of the mcp SDK's HTTP client
    from mcp.client.streamable_http import streamable_http_client

    async def main():
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            async with streamable_http_client(url, http_client=http) as (read, write, *_):
                async with ClientSession(read, write) as s:
                    await s.initialize()
                    return await scenario(s)

    return asyncio.run(main())


def test_http_endpoint_of_the_server(server):
    """Same tools over streamable HTTP, same API keys; sessions are the tenant's sandboxes on the server."""
    url = server.url + "/mcp"
    alice, bob = server.key("alice"), server.key("bob")

    async def alice_creates(s):
        assert {t.name for t in (await s.list_tools()).tools} == TOOLS
        sid = (await s.call_tool("create_session", {"ttl_seconds": 600})).structured_content["session_id"]
        await s.call_tool("run_code", {"code": "secret = 'alice only'", "session_id": sid})
        return sid

    sid = http_session(url, alice, alice_creates)

    async def read_secret(s):
        return await s.call_tool("run_code", {"code": "secret", "session_id": sid})

    mine = http_session(url, alice, read_secret)  # a new MCP connection, same tenant: same session
    assert texts(mine) == "Out[2]: 'alice only'"
    theirs = http_session(url, bob, read_secret)  # another tenant cannot even tell it exists
    assert theirs.is_error and texts(theirs) == f"Error executing tool run_code: no session '{sid}': " \
                                                "create one with create_session"
    # The session is one of alice's sandboxes on the server: the REST API and the SDK see it too.
    listed = Sandbox.list(api_url=server.url, api_key=alice)
    assert [(i.sandbox_id, i.metadata) for i in listed] == [(sid, {"via": "mcp"})]
    assert Sandbox.list(api_url=server.url, api_key=bob) == []

    async def image(s):
        return await s.call_tool("run_code", {"code": "import matplotlib.pyplot as plt; plt.plot([1]); plt.show()"})

    assert [c.type for c in http_session(url, bob, image).content] == ["image"]

    async def close(s):
        return await s.call_tool("close_session", {"session_id": sid})

    assert not http_session(url, alice, close).is_error
    assert Sandbox.list(api_url=server.url, api_key=alice) == []
    with pytest.raises(BaseExceptionGroup) as refused:
        http_session(url, "sl_not_a_key", read_secret)  # the server's auth answers 401
    assert refused.group_contains(MCPError)
